"""bf16 body, fp32 head (loss.py departure 7, --fp32-head): under bf16 autocast lm_head and the log-softmax run in
float32 from the body's states; against float64 / fp32 references computed another way, on the tiny model."""
import copy

import pytest
import torch

import data
import noise as noises
import packing
import step as steps
from conftest import make_tiny_model
from loss import chunked_answer_logps
from test_step import _pairs

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def _answer_inputs(seed=0, N=37, d=48, V=300, num=4, scale=3.0):
    """States of a bf16 body (rounded to bf16), an fp32 head whose logits reach magnitude ~20, targets, seq ids."""
    g = torch.Generator().manual_seed(seed)
    states = (torch.randn(N, d, generator=g) * scale).to(torch.bfloat16)
    weight = torch.randn(V, d, generator=g) * 0.5
    targets = torch.randint(0, V, (N,), generator=g)
    seq_ids = torch.sort(torch.randint(0, num, (N,), generator=g)).values
    return states, weight, targets, seq_ids, num


def test_fp32_head_under_autocast_is_the_float64_head_of_the_bf16_states():
    """Under bf16 autocast, fp32_head gives the summed log-probs of the (bf16) states through the fp32 weight as
    float64 computes them, to fp32 rounding (1e-5 relative); the all-bf16 head is off by far more: its logits of
    magnitude ~20 are rounded to steps of 0.125."""
    states, weight, targets, seq_ids, num = _answer_inputs()
    z = states.double() @ weight.double().T
    assert z.abs().max() > 16  # logits where bf16's step is 0.125
    exact = torch.zeros(num, dtype=torch.float64).index_add(
        0, seq_ids, z.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(z, -1))
    with torch.autocast(**BF16):
        head32 = chunked_answer_logps(states, targets, seq_ids, num, weight, chunk_size=8)
        head16 = chunked_answer_logps(states, targets, seq_ids, num, weight, chunk_size=8, fp32_head=False)
    assert head32.dtype == torch.float32
    torch.testing.assert_close(head32.double(), exact, rtol=1e-5, atol=1e-4)
    err32, err16 = (head32.double() - exact).abs().max(), (head16.double() - exact).abs().max()
    assert err16 > 20 * err32 and err16 > 0.05


def test_fp32_head_gradients_match_float64():
    """The gradients reach the bf16 states (in bf16) and the fp32 weight as float64 computes them."""
    states, weight, targets, seq_ids, num = _answer_inputs(seed=1)
    s = states.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    with torch.autocast(**BF16):
        out = chunked_answer_logps(s, targets, seq_ids, num, w, chunk_size=5)
    (out * torch.arange(1.0, num + 1)).sum().backward()
    s64, w64 = states.double().requires_grad_(True), weight.double().requires_grad_(True)
    z = s64 @ w64.T
    ref = torch.zeros(num, dtype=torch.float64).index_add(
        0, seq_ids, z.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(z, -1))
    (ref * torch.arange(1.0, num + 1, dtype=torch.float64)).sum().backward()
    assert s.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-2, atol=1e-2)  # bf16-rounded gradient


def test_fp32_path_is_unchanged():
    """Without autocast and with fp32 inputs the flag changes nothing (bit for bit): the fp32 path of the TRL
    equality test and the README's runs."""
    states, weight, targets, seq_ids, num = _answer_inputs(seed=2)
    states = states.float()
    a = chunked_answer_logps(states, targets, seq_ids, num, weight, chunk_size=8)
    b = chunked_answer_logps(states, targets, seq_ids, num, weight, chunk_size=8, fp32_head=False)
    assert torch.equal(a, b)


def test_policy_logps_under_bf16_agree_with_fp32_on_the_tiny_model(tiny_tokenizer):
    """The fixture model's summed answer log-probs, bf16 body + fp32 head vs all fp32: within 0.5 % of their mean
    magnitude (the bench's target), and closer than the all-bf16 path."""
    policy = make_tiny_model(tiny_tokenizer, seed=4).float().eval()
    with torch.no_grad():  # logits of the magnitude of a trained model's (~20), where bf16 rounding bites
        policy.lm_head.weight.mul_(60)
    examples = [data.tokenize_pair(tiny_tokenizer, p, 160, 96) for p in _pairs(6)]
    batch = packing.pack_pairs(examples, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        fp32 = steps.PolicyLogps(policy)(batch).double()
        with torch.autocast(**BF16):
            head32 = steps.PolicyLogps(policy)(batch).double()
            head16 = steps.PolicyLogps(policy, fp32_head=False)(batch).double()
    scale = fp32.abs().mean()
    rel32, rel16 = ((head32 - fp32).abs().max() / scale).item(), ((head16 - fp32).abs().max() / scale).item()
    assert rel32 <= 0.005 and rel32 < rel16, (rel32, rel16)


@pytest.mark.parametrize("noise", ["trainable", "fixed"])
def test_noise_terms_are_fp32_whatever_the_autocast(tiny_tokenizer, noise):
    """Eq. 5–6 run in fp32 from the cache under bf16 autocast too: the noisy reference log-probs and σ² of a step
    under bf16 equal those of the same step without autocast, given the same cache, generator and ε."""
    policy = make_tiny_model(tiny_tokenizer, seed=5).float()
    examples = [data.tokenize_pair(tiny_tokenizer, p, 160, 96) for p in _pairs(4)]
    pad, cpu = tiny_tokenizer.pad_token_id, torch.device("cpu")
    off = torch.autocast("cpu", enabled=False)
    cache = steps.ReferenceCache.build(steps.PolicyLogps(policy), examples, pad, cpu, 4, True, off, progress=False)
    objective = steps.Objective(noise=noise, beta=0.1, alpha=1.0, noise_sigma=0.3, loss_type="sigmoid", chunk_size=5)
    idx = [2, 0, 3]
    batch = packing.pack_pairs([examples[i] for i in idx], pad)
    torch.manual_seed(3)
    generator = noises.make_noise(noise, 32, policy.config.vocab_size, sigma=0.3)
    outs = []
    for autocast in (off, torch.autocast(**BF16)):
        seen = {}
        real = noises.noisy_answer_logps_pair if noise == "trainable" else noises.noisy_answer_logps

        def spy(*a, **k):
            seen["out"] = real(*a, **k)
            return seen["out"]
        name = real.__name__
        setattr(noises, name, spy)
        try:
            out = steps.cached_batch_loss(steps.PolicyLogps(copy.deepcopy(policy)), cache, idx, batch, generator,
                                          objective, torch.Generator().manual_seed(9), autocast)
        finally:
            setattr(noises, name, real)
        outs.append((seen["out"], out["sigma2"]))
    (a, sa), (b, sb) = outs
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        assert x.dtype == torch.float32 and torch.equal(x, y)
    assert sa == sb


# ----------------------------------------------------------------------------- bf16 on a CPU without native bf16
def test_slow_bf16_note_only_for_bf16_on_a_cpu_without_native_bf16(monkeypatch):
    """On an AVX2-only CPU PyTorch multiplies bf16 matrices in its reference GEMM (7–53× the fp32 time measured
    on an AMD EPYC): --dtype bf16 says so in one line; fp32, CUDA and a native-bf16 CPU say nothing."""
    import model as models
    monkeypatch.setattr(models, "cpu_bf16_native", lambda: False)
    note = models.slow_bf16_note("cpu", "bf16")
    assert note and "\n" not in note and "--dtype fp32 is faster here" in note
    assert models.slow_bf16_note("cpu", "fp32") is None and models.slow_bf16_note("cpu", None) is None
    assert models.slow_bf16_note("cuda", "bf16") is None
    monkeypatch.setattr(models, "cpu_bf16_native", lambda: True)
    assert models.slow_bf16_note("cpu", "bf16") is None


def test_train_says_when_bf16_is_emulated(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """train.py --dtype bf16 prints the note before the model loads (and trains: the note is not a refusal)."""
    import model as models
    import train
    from test_ablate import tiny_train_flags
    monkeypatch.setattr(models, "cpu_bf16_native", lambda: False)
    train.main(["--iter", "0", "--run-dir", str(tmp_path / "run"), "--dtype", "bf16", "--device", "cpu",
                *tiny_train_flags(tiny_model_dir)])
    out = capsys.readouterr()
    assert "note: --dtype bf16 on this CPU" in out.out + out.err
    assert (tmp_path / "run" / "iter0" / "model" / "config.json").is_file()
