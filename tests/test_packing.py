"""Shared-prompt packing (packing.py) against two padded rows per pair: the same answer log-probs, gradients,
reference cache and loss; the layout checked by hand."""
import copy

import pytest
import torch

import data
import noise as noises
import packing
import step as steps
from conftest import make_tiny_model

OFF = torch.autocast("cpu", enabled=False)


def _pairs(n):
    return [dict(id=f"p{i}", prompt=f"What is {i} + {i}?" + " please" * (i % 4), chosen=f"{i} + {i} = {2 * i}." * (1 + i % 3),
                 rejected="I do not know." * (1 + i % 2)) for i in range(n)]


def test_layout_by_hand():
    """Prompt [5 6 7], chosen [8 9], rejected [10 11 12]: one row, positions restart for y⁻, y⁻ blind to y⁺,
    the first token of y⁻ read from the last prompt state; the second, shorter pair is padded."""
    a = dict(chosen_input_ids=[5, 6, 7, 8, 9], chosen_labels=[-100] * 3 + [8, 9],
             rejected_input_ids=[5, 6, 7, 10, 11, 12], rejected_labels=[-100] * 3 + [10, 11, 12])
    b = dict(chosen_input_ids=[5, 4], chosen_labels=[-100, 4], rejected_input_ids=[5, 3], rejected_labels=[-100, 3])
    batch = packing.pack_pairs([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12], [5, 4, 3, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5], [0, 1, 1, 0, 0, 0, 0, 0]]
    assert batch["state_index"].tolist() == [2, 3, 2, 5, 6, 8 + 0, 8 + 0]
    assert batch["targets"].tolist() == [8, 9, 10, 11, 12, 4, 3]
    assert batch["seq_ids"].tolist() == [0, 0, 2, 2, 2, 1, 3]
    assert int(batch["tokens"]) == 8 + 3
    m = batch["attention_mask"][0, 0].int()
    assert m[5].tolist() == [1, 1, 1, 0, 0, 1, 0, 0]  # y⁻'s first token: the prompt and itself, not y⁺
    assert m[4].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]  # y⁺: causal
    assert m[7].tolist() == [1, 1, 1, 0, 0, 1, 1, 1]
    assert batch["attention_mask"][1, 0, 5].int().tolist() == [1, 0, 0, 0, 0, 0, 0, 0]  # padding: position 0 only
    assert not batch["attention_mask"][1, 0, :3, 3:].any()  # no real token looks at padding


def test_pairs_that_do_not_share_a_prompt_are_refused():
    a = dict(chosen_input_ids=[5, 6, 8], chosen_labels=[-100, -100, 8], rejected_input_ids=[5, 7, 8],
             rejected_labels=[-100, -100, 8])
    with pytest.raises(ValueError, match="share their prompt"):
        packing.pack_pairs([a], 0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logps_and_gradients_equal_padded(tiny_tokenizer, attn):
    """PolicyLogps on packed rows == on two padded rows per pair: log-probs and every parameter's gradient,
    fp32, to 1e-5 (float rounding of matmuls of another shape)."""
    model = make_tiny_model(tiny_tokenizer, seed=4).float()
    model.config._attn_implementation = attn
    examples = [data.tokenize_pair(tiny_tokenizer, p, 160, 96) for p in _pairs(5)]
    module = steps.PolicyLogps(model, chunk_size=5)
    results = []
    for collate in (packing.pack_pairs, data.collate_pairs):
        model.zero_grad(set_to_none=True)
        logps = module(collate(examples, tiny_tokenizer.pad_token_id))
        (logps * torch.linspace(-1, 1, len(logps))).sum().backward()
        results.append((logps.detach(), [p.grad.clone() for p in model.parameters()]))
    (packed, gp), (padded, gq) = results
    assert packed.shape == (10,)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    for a, b in zip(gp, gq):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("over_budget", [False, True])
def test_packed_cache_and_step_equal_padded(tiny_tokenizer, over_budget):
    """ReferenceCache built on packed rows == on padded rows (log-probs, rejected hidden states), and the
    DNPO loss of a packed micro-batch == of the padded one, noise trainable, the same ε."""
    policy = make_tiny_model(tiny_tokenizer, seed=5).float()
    reference = copy.deepcopy(policy).requires_grad_(False)
    examples = [data.tokenize_pair(tiny_tokenizer, p, 160, 96) for p in _pairs(6)]
    pad, cpu = tiny_tokenizer.pad_token_id, torch.device("cpu")
    gb = 0.0 if over_budget else 4.0
    caches = {pack: steps.ReferenceCache.build(steps.PolicyLogps(reference, 6), examples, pad, cpu, 4, True, OFF,
                                               max_gb=gb, progress=False, pack=pack, reference=reference)
              for pack in (True, False)}
    torch.testing.assert_close(caches[True].logps, caches[False].logps, rtol=1e-5, atol=1e-5)
    if not over_budget:
        for a, b in zip(caches[True].hidden + caches[True].targets, caches[False].hidden + caches[False].targets):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    args = steps.Objective(noise="trainable", beta=0.1, alpha=1.0, noise_sigma=0.1, loss_type="sigmoid", chunk_size=6)
    idx, outs = [4, 1, 2], {}
    for pack in (True, False):
        torch.manual_seed(3)
        generator = noises.make_noise("trainable", 32, policy.config.vocab_size)
        collate = packing.pack_pairs if pack else data.collate_pairs
        batch = collate([examples[i] for i in idx], pad)
        outs[pack] = steps.cached_batch_loss(steps.PolicyLogps(policy, 6), caches[pack], idx, batch, generator, args,
                                             torch.Generator().manual_seed(9), OFF)
    for key in ("loss", "model_loss", "noise_loss", "variance_penalty", "margin", "noisy_margin"):
        torch.testing.assert_close(outs[True][key], outs[False][key], rtol=1e-5, atol=1e-5)
    assert outs[True]["tokens"] < outs[False]["tokens"]  # the prompt once per pair


def test_supported_attention_implementations(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer)
    for impl, ok in (("sdpa", True), ("eager", True), ("flash_attention_2", False)):
        model.config._attn_implementation = impl
        assert packing.supported(model) is ok
    mask = torch.tensor([[[[True, False], [True, True]]]])
    model.config._attn_implementation = "eager"
    additive = packing.attention_mask_for(mask, model)
    assert additive[0, 0, 0, 0] == 0 and additive[0, 0, 0, 1] == torch.finfo(torch.float32).min
