"""Tests for noise.py: the chunked Eq. 5–6 paths against plain_noisy_sequence_logps (float64, same ε), Monte Carlo."""
import pytest
import torch

from loss import sequence_logps
from noise import (DEFAULT_INIT_VARIANCE, FixedNoise, NoiseGenerator, chunk_noise, draw_base_seed,
                   make_noise, noisy_sequence_logps, plain_noisy_sequence_logps)

B, T, V, D = 3, 9, 13, 6


def make_batch(seed=0, dtype=torch.float32):
    """Random reference logits/hidden states and labels: prompt tokens, right padding, one row with no answer."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=dtype) * 2
    hidden = torch.randn(B, T, D, generator=g, dtype=dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :3] = -100  # prompt
    labels[1, 7:] = -100  # padding
    labels[2] = -100  # a row with no answer tokens
    return logits, hidden, labels


def random_generator(seed=0, dtype=torch.float32):
    """A NoiseGenerator with random (not initial) weights, so σ² varies over tokens and entries."""
    torch.manual_seed(seed)
    gen = NoiseGenerator(D, V).to(dtype)
    with torch.no_grad():
        gen.proj.weight.normal_(0, 0.5)
        gen.proj.bias.normal_(-1, 0.5)
    return gen


def naive_noisy_logps(logits, hidden, labels, gen, base_seed, chunk_size):
    """noise.plain_noisy_sequence_logps in float64 with ε at the answer positions (row-major) concatenated from
    the chunked path's per-chunk seeds, so both see the same noise."""
    answer = labels[:, 1:] != -100                                  # (B, T-1)
    n = int(answer.sum())
    eps = torch.zeros(logits.shape, dtype=torch.float64)            # (B, T, V); ε at non-answer positions is unused
    eps[:, :-1][answer] = torch.cat([chunk_noise(base_seed, k, min(chunk_size, n - s), logits.shape[-1])
                                     for k, s in enumerate(range(0, n, chunk_size))]).double()
    logps, variance_mean = plain_noisy_sequence_logps(logits.double(), hidden, labels, gen, eps)
    return logps, variance_mean.double()


def test_generator_starts_at_init_variance():
    """At initialisation σ² = init_variance for every token and vocabulary entry, whatever h is."""
    gen = NoiseGenerator(D, V, init_variance=0.03)
    variance = gen(torch.randn(4, 5, D) * 10)
    assert variance.shape == (4, 5, V)
    torch.testing.assert_close(variance, torch.full_like(variance, 0.03))
    assert NoiseGenerator(D, V)(torch.randn(2, D)).mean().item() == pytest.approx(DEFAULT_INIT_VARIANCE)


def test_fixed_noise_is_constant_and_parameterless():
    """FixedNoise(σ) returns σ² everywhere and has no parameters."""
    fixed = FixedNoise(0.3, vocab_size=V)
    assert list(fixed.parameters()) == []
    variance = fixed(torch.randn(2, 4, D))
    assert variance.shape == (2, 4, V)
    torch.testing.assert_close(variance, torch.full((2, 4, V), 0.09))


def test_make_noise_kinds():
    """make_noise maps trainable/fixed/none to NoiseGenerator/FixedNoise/None and rejects others."""
    assert isinstance(make_noise("trainable", D, V, alpha=0.5), NoiseGenerator)
    assert make_noise("trainable", D, V, alpha=0.5).alpha == 0.5
    assert isinstance(make_noise("fixed", D, V, sigma=0.2), FixedNoise)
    assert make_noise("none", D, V) is None
    with pytest.raises(ValueError, match="unknown noise kind"):
        make_noise("gaussian", D, V)
    with pytest.raises(ValueError, match="alpha"):
        make_noise("trainable", D, V, alpha=-1.0)


def test_zero_variance_is_clean_reference():
    """σ = 0 reproduces the clean reference log-probs exactly (to float rounding)."""
    logits, hidden, labels = make_batch()
    noisy = noisy_sequence_logps(logits, hidden, labels, FixedNoise(0.0), False, chunk_size=4)
    torch.testing.assert_close(noisy, sequence_logps(logits, labels), rtol=0, atol=1e-5)
    assert noisy[2].item() == 0.0  # the row without answer tokens


def test_chunked_equals_naive_full_tensor():
    """Chunked (chunk 4 not dividing N = 10) equals a naive full-(N, V) float64 computation for the same ε."""
    logits, hidden, labels = make_batch()
    gen = random_generator()
    rng = torch.Generator().manual_seed(5)
    base_seed = draw_base_seed(torch.Generator().manual_seed(5))
    assert (labels[:, 1:] != -100).sum().item() % 4 != 0
    noisy, variance_mean = noisy_sequence_logps(logits, hidden, labels, gen, False, chunk_size=4, rng=rng,
                                                return_variance=True)
    expected, expected_variance = naive_noisy_logps(logits, hidden, labels, gen, base_seed, chunk_size=4)
    torch.testing.assert_close(noisy.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(variance_mean.double(), expected_variance, rtol=1e-5, atol=1e-7)
    assert noisy[2].item() == 0.0


def test_checkpointed_gradient_equals_naive_gradient():
    """With generator_grad=True the checkpointed chunks give the naive computation's generator gradient."""
    logits, hidden, labels = make_batch()
    gen = random_generator()
    base_seed = draw_base_seed(torch.Generator().manual_seed(7))
    noisy, variance_mean = noisy_sequence_logps(logits, hidden, labels, gen, True, chunk_size=3,
                                                rng=torch.Generator().manual_seed(7), return_variance=True)
    (noisy.sum() + variance_mean).backward()
    got = [p.grad.clone() for p in gen.parameters()]
    gen.zero_grad()
    expected, expected_variance = naive_noisy_logps(logits, hidden, labels, gen, base_seed, chunk_size=3)
    (expected.sum() + expected_variance).backward()
    for g, p in zip(got, gen.parameters()):
        torch.testing.assert_close(g.double(), p.grad.double(), rtol=1e-4, atol=1e-5)


def test_gradcheck_float64_through_checkpoint():
    """Finite differences in float64 agree with autograd through the checkpointed, chunked noise path."""
    logits, hidden, labels = make_batch(dtype=torch.float64)
    gen = random_generator(dtype=torch.float64)

    class WithParams(torch.nn.Module):  # the generator evaluated at the tensors gradcheck perturbs
        def __init__(self, weight, bias):
            super().__init__()
            self.gen, self.values = gen, {"proj.weight": weight, "proj.bias": bias}

        def forward(self, h):
            return torch.func.functional_call(self.gen, self.values, (h,))

    def f(weight, bias):
        return noisy_sequence_logps(logits, hidden, labels, WithParams(weight, bias), True, chunk_size=4,
                                    rng=torch.Generator().manual_seed(3), return_variance=True)

    weight = gen.proj.weight.detach().clone().requires_grad_()
    bias = gen.proj.bias.detach().clone().requires_grad_()
    assert f(weight, bias)[0].dtype == torch.float64
    assert torch.autograd.gradcheck(f, (weight, bias), eps=1e-6, atol=1e-5)


def test_positive_variance_lowers_expected_logp():
    """Monte Carlo: E[log π̃(y)] < log π(y) for σ² > 0 (lse convex), matching −σ²/2·Σ_t(1 − Σ_v p²) to 4 SE."""
    g = torch.Generator().manual_seed(11)
    logits1 = torch.randn(1, T, V, generator=g) * 2
    labels1 = torch.randint(0, V, (1, T), generator=g)
    labels1[:, :3] = -100
    samples = 4000  # the same sequence repeated: every row draws its own ε
    logits, labels = logits1.expand(samples, T, V), labels1.expand(samples, T)
    hidden = torch.zeros(samples, T, D)
    variance = 0.05
    noisy = noisy_sequence_logps(logits, hidden, labels, FixedNoise(variance ** 0.5), False, chunk_size=512,
                                 rng=torch.Generator().manual_seed(0)).double()
    clean = sequence_logps(logits1, labels1).double().item()
    gap, se = clean - noisy.mean().item(), noisy.std().item() / samples ** 0.5
    assert gap > 4 * se  # direction: strictly lower, at 4 standard errors
    p = torch.softmax(logits1[0, :-1].double(), -1)[labels1[0, 1:] != -100]  # (N, V)
    taylor = variance / 2 * (1 - (p ** 2).sum(-1)).sum().item()  # second-order expansion of E[lse]
    assert abs(gap - taylor) < 4 * se + 0.1 * taylor


def test_same_seed_same_numbers():
    """The same rng state gives identical numbers; consecutive calls (ε₁, ε₂) differ."""
    logits, hidden, labels = make_batch()
    gen = random_generator()
    a = noisy_sequence_logps(logits, hidden, labels, gen, True, chunk_size=4, rng=torch.Generator().manual_seed(1))
    b = noisy_sequence_logps(logits, hidden, labels, gen, True, chunk_size=4, rng=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    rng = torch.Generator().manual_seed(1)
    eps1 = noisy_sequence_logps(logits, hidden, labels, gen, False, chunk_size=4, rng=rng)
    eps2 = noisy_sequence_logps(logits, hidden, labels, gen, False, chunk_size=4, rng=rng)
    assert torch.equal(eps1, a.detach()) and not torch.equal(eps1[:2], eps2[:2])
    torch.manual_seed(4)
    c = noisy_sequence_logps(logits, hidden, labels, gen, False)
    torch.manual_seed(4)
    assert torch.equal(c, noisy_sequence_logps(logits, hidden, labels, gen, False))


def test_gradient_routing_and_detaching():
    """generator_grad=False gives no graph; reference logits and hidden states never receive a gradient."""
    logits, hidden, labels = make_batch()
    logits.requires_grad_(), hidden.requires_grad_()
    gen = random_generator()
    off, variance_off = noisy_sequence_logps(logits, hidden, labels, gen, False, return_variance=True)
    assert not off.requires_grad and not variance_off.requires_grad
    on, variance_on = noisy_sequence_logps(logits, hidden, labels, gen, True, return_variance=True)
    assert on.requires_grad and variance_on.requires_grad
    (on.sum() + variance_on).backward()
    assert logits.grad is None and hidden.grad is None
    assert gen.proj.bias.grad.abs().sum() > 0


def saved_bytes(fn, *inputs):
    """Bytes of new storage autograd keeps for backward while fn runs (views of `inputs` count 0)."""
    known = {t.untyped_storage().data_ptr() for t in inputs}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in known:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


def test_memory_saved_for_backward_is_per_chunk():
    """With checkpointing, storage kept for backward is O(N) indices, not O(N·V) like the naive computation."""
    g = torch.Generator().manual_seed(0)
    n_rows, length, vocab, chunk = 4, 64, 500, 16
    logits, hidden = torch.randn(n_rows, length, vocab, generator=g), torch.randn(n_rows, length, D, generator=g)
    labels = torch.randint(0, vocab, (n_rows, length), generator=g)
    gen = NoiseGenerator(D, vocab)
    chunked, (out, variance) = saved_bytes(
        lambda: noisy_sequence_logps(logits, hidden, labels, gen, True, chunk_size=chunk, return_variance=True),
        logits, hidden)
    naive, _ = saved_bytes(lambda: naive_noisy_logps(logits, hidden, labels, gen, 0, chunk), logits, hidden)
    block = (n_rows * (length - 1)) * vocab * 4  # one (N, V) float32 tensor
    assert naive > block and chunked < block / 20
    (out.sum() + variance).backward()
    assert gen.proj.weight.grad.abs().sum() > 0


def test_bad_shapes_raise():
    """Mismatched shapes and a non-positive chunk size are user errors with a clear message."""
    logits, hidden, labels = make_batch()
    with pytest.raises(ValueError, match="disagree"):
        noisy_sequence_logps(logits, hidden[:, :-1], labels, FixedNoise(0.1), False)
    with pytest.raises(ValueError, match="chunk_size"):
        noisy_sequence_logps(logits, hidden, labels, FixedNoise(0.1), False, chunk_size=0)
