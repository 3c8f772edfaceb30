"""The fast training path (step.py, loss.chunked_sequence_logps, noise.noisy_answer_logps, length grouping)
against the computations it replaces: full-logits log-probs, the reference inside the step, random batches."""
import copy

import pytest
import torch

import data
import noise as noises
import packing
import sampler
import step as steps
import train
from conftest import make_tiny_model
from loss import chunked_sequence_logps, sequence_logps


def _labels(B, T, prompt, lengths, V, gen):
    labels = torch.full((B, T), -100, dtype=torch.long)
    for b, n in enumerate(lengths):
        labels[b, prompt:prompt + n] = torch.randint(0, V, (n,), generator=gen)
    return labels


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunked_logps_equal_full_logits_float64(chunk):
    """chunked_sequence_logps == sequence_logps(lm_head(h)) in float64, values and gradients (1e-12)."""
    gen = torch.Generator().manual_seed(0)
    B, T, d, V = 3, 9, 5, 11
    h = torch.randn(B, T, d, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(V, d, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = _labels(B, T, 2, [4, 0, 6], V, gen)  # row 1 has no answer tokens: 0
    full = sequence_logps(h @ w.T, labels)
    grads_full = torch.autograd.grad(full.sum() + (full ** 2).sum(), (h, w))
    chunked = chunked_sequence_logps(h, w, labels, chunk_size=chunk)
    grads_chunked = torch.autograd.grad(chunked.sum() + (chunked ** 2).sum(), (h, w))
    torch.testing.assert_close(chunked, full, rtol=1e-12, atol=1e-12)
    assert chunked[1] == 0
    for a, b in zip(grads_chunked, grads_full):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_noisy_answer_logps_equal_logits_version():
    """From hidden states + lm_head, the noise path draws the same ε and gives the same numbers as
    noisy_sequence_logps on the full logits, for the same rng state (float64, 1e-12), with gradients."""
    gen = torch.Generator().manual_seed(1)
    B, T, d, V = 2, 8, 4, 7
    h = torch.randn(B, T, d, dtype=torch.float64, generator=gen)
    w = torch.randn(V, d, dtype=torch.float64, generator=gen)
    labels = _labels(B, T, 1, [5, 3], V, gen)
    g = noises.NoiseGenerator(d, V, init_std=0.3).double()
    rows, cols = (labels[:, 1:] != -100).nonzero(as_tuple=True)
    states, targets = h[:, :-1][rows, cols], labels[:, 1:][rows, cols]
    a, va = noises.noisy_sequence_logps(h @ w.T, h, labels, g, True, chunk_size=3,
                                        rng=torch.Generator().manual_seed(5), return_variance=True)
    ga = torch.autograd.grad(a.sum() + va, g.proj.weight)
    b, vb = noises.noisy_answer_logps(states, targets, rows, B, w, g, True, chunk_size=3,
                                      rng=torch.Generator().manual_seed(5), return_variance=True)
    gb = torch.autograd.grad(b.sum() + vb, g.proj.weight)
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vb, va, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb[0], ga[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("budget", [2 ** 30, 0])  # graphs kept / every chunk checkpointed
def test_noisy_pair_equals_two_calls_float64(budget):
    """noisy_answer_logps_pair == noisy_answer_logps with generator_grad False, then True, on the same rng:
    the same ε₁ and ε₂, log-probs, mean σ² and generator gradients (float64, 1e-12)."""
    gen = torch.Generator().manual_seed(2)
    N, d, V, B = 9, 4, 7, 3
    h = torch.randn(N, d, dtype=torch.float64, generator=gen)
    w = torch.randn(V, d, dtype=torch.float64, generator=gen)
    targets, seq = torch.randint(0, V, (N,), generator=gen), torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    g = noises.NoiseGenerator(d, V, init_std=0.3).double()
    rng = torch.Generator().manual_seed(4)
    e1 = noises.noisy_answer_logps(h, targets, seq, B, w, g, False, chunk_size=4, rng=rng)
    e2, v = noises.noisy_answer_logps(h, targets, seq, B, w, g, True, chunk_size=4, rng=rng, return_variance=True)
    grads = torch.autograd.grad(e2.sum() + v, list(g.parameters()))
    p1, p2, pv = noises.noisy_answer_logps_pair(h, targets, seq, B, w, g, chunk_size=4,
                                                rng=torch.Generator().manual_seed(4), graph_budget_bytes=budget)
    assert not p1.requires_grad and p2.requires_grad
    pair_grads = torch.autograd.grad(p2.sum() + pv, list(g.parameters()))
    for a, b in zip((p1, p2, pv) + pair_grads, (e1, e2, v) + grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _pairs(n):
    return [dict(id=f"p{i}", prompt=f"What is {i} + {i}?" + " please" * (i % 4), chosen=f"{i} + {i} = {2 * i}." * (1 + i % 3),
                 rejected="I do not know." * (1 + i % 2)) for i in range(n)]


@pytest.mark.parametrize("noise", ["none", "fixed", "trainable"])
def test_precomputed_reference_step_equals_reference_in_the_step(tiny_tokenizer, noise):
    """cached_batch_loss (reference once, chunked log-probs) == step.batch_loss (reference forward in the
    step, full logits): every loss term and the gradients of policy and generator, to 1e-5 (fp32: the
    margins are β × differences of log-probs of magnitude ~10², whose rounding is ~1e-5)."""
    policy = make_tiny_model(tiny_tokenizer, seed=3).float()
    reference = copy.deepcopy(policy).requires_grad_(False)
    examples = [data.tokenize_pair(tiny_tokenizer, p, 160, 96) for p in _pairs(5)]
    args = steps.Objective(noise=noise, beta=0.1, alpha=1.0, noise_sigma=0.3, loss_type="sigmoid", chunk_size=7)
    off = torch.autocast("cpu", enabled=False)
    # as train.py: the policy before its first update computes the reference's numbers
    cache = steps.ReferenceCache.build(steps.PolicyLogps(policy, 7), examples, tiny_tokenizer.pad_token_id,
                                       torch.device("cpu"), 2, noise != "none", off, progress=False)
    assert not cache.needs_reference and policy.training  # build runs in eval mode and restores the mode
    idx = [3, 0, 4]
    batch = data.collate_pairs([examples[i] for i in idx], tiny_tokenizer.pad_token_id)
    results = []
    for fast in (True, False):
        torch.manual_seed(7)
        generator = noises.make_noise(noise, 32, policy.config.vocab_size, sigma=0.3)
        policy.zero_grad(set_to_none=True)
        rng = torch.Generator().manual_seed(11)
        if fast:
            out = steps.cached_batch_loss(steps.PolicyLogps(policy, 7), cache, idx, batch, generator, args, rng, off)
        else:
            out = steps.batch_loss(policy, reference, generator, batch, args, rng, off)
        out["loss"].backward()
        grads = [p.grad.clone() for p in policy.parameters()]
        grads += [p.grad.clone() for p in (generator.parameters() if generator is not None else [])]
        results.append((out, grads))
    (fast, gf), (slow, gs) = results
    for key in ("loss", "model_loss", "noise_loss", "variance_penalty", "margin", "noisy_margin"):
        torch.testing.assert_close(fast[key], slow[key], rtol=1e-5, atol=1e-5)
    assert fast["sigma2"] == pytest.approx(slow["sigma2"], rel=1e-5)
    assert len(gf) == len(gs) and any(g.abs().sum() > 0 for g in gf)
    for a, b in zip(gf, gs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_reference_cache_over_budget_recomputes_in_the_step(tiny_tokenizer):
    """With no memory for hidden states, the cache keeps only log-probs, and the noise still sees the
    same rejected-token states (run through the reference in the step)."""
    policy = make_tiny_model(tiny_tokenizer, seed=3)
    examples = [data.tokenize_pair(tiny_tokenizer, p, 160, 96) for p in _pairs(4)]
    off = torch.autocast("cpu", enabled=False)
    build = lambda gb, ref: steps.ReferenceCache.build(  # noqa: E731
        steps.PolicyLogps(policy), examples, tiny_tokenizer.pad_token_id, torch.device("cpu"), 3, True, off,
        max_gb=gb, progress=False, reference=ref)
    kept, none = build(4.0, policy), build(0.0, policy)
    assert none.hidden is None and kept.hidden is not None
    assert none.needs_reference and not kept.needs_reference  # train.py frees the reference model only then
    with pytest.raises(ValueError, match="ref-cache-gb"):
        build(0.0, None)
    torch.testing.assert_close(none.logps, kept.logps)
    batch = data.collate_pairs([examples[i] for i in (2, 1)], tiny_tokenizer.pad_token_id)
    for a, b in zip(kept.rejected_tokens([2, 1], batch), none.rejected_tokens([2, 1], batch)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_length_grouping_is_a_seeded_permutation_that_cuts_padding(tiny_tokenizer):
    """length_grouped_order: a permutation of the epoch's order, a function of (seed, epoch) only, whose
    micro-batches pad less than the random order's; a partial last group stays last."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 300, (203,), generator=gen).tolist()
    examples = [dict(chosen_input_ids=[0] * n, rejected_input_ids=[0] * n) for n in lengths]
    order = sampler.epoch_order(203, seed=4, epoch=1)
    grouped = sampler.length_grouped_order(order, lengths, group=8, seed=4, epoch=1)
    assert sorted(grouped) == list(range(203)) and grouped != order
    assert grouped == sampler.length_grouped_order(order, lengths, group=8, seed=4, epoch=1)
    assert grouped != sampler.length_grouped_order(order, lengths, group=8, seed=4, epoch=2)
    assert set(grouped[-3:]) <= set(order[-(203 % 128):])  # the partial group of the last chunk
    before = packing.padding_fraction(sampler.rank_microbatches(order, 0, 1, 8), examples)
    after = packing.padding_fraction(sampler.rank_microbatches(grouped, 0, 1, 8), examples)
    assert after < before / 3
    # two ranks of batch 4 see exactly the groups one process of batch 8 sees
    one = sampler.rank_microbatches(grouped, 0, 1, 8)
    two = [sampler.rank_microbatches(grouped, r, 2, 4) for r in range(2)]
    assert all(sorted(one[i]) == sorted(two[0][i] + two[1][i]) for i in range(len(one) - 1))  # last: wrapped


def test_padding_fraction_by_hand():
    examples = [dict(chosen_input_ids=[0] * 4, rejected_input_ids=[0] * 2), dict(chosen_input_ids=[0] * 3, rejected_input_ids=[0] * 3)]
    assert packing.padding_fraction([[0, 1]], examples) == pytest.approx(1 - 12 / 16)
    assert packing.padding_fraction([[0], [1]], examples) == pytest.approx(1 - 12 / 14)


def test_release_frees_every_tensor_once(tiny_tokenizer):
    """steps.release empties each parameter and buffer (tied weights counted once) and returns the bytes."""
    model = make_tiny_model(tiny_tokenizer).float()
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}.values()
    expected = sum(t.numel() * t.element_size() for t in tensors)
    assert steps.release(model) == expected > 0
    assert all(p.numel() == 0 for p in model.parameters())


def test_bf16_margins_start_at_zero_when_the_policy_computes_the_reference(tiny_tokenizer):
    """Under bf16 autocast the cache computed by the fp32-master policy gives step-0 margins of ~0 (batch-shape
    rounding only), while a bf16 copy of the reference (the old way) starts visibly off zero."""
    policy = make_tiny_model(tiny_tokenizer, seed=6).float()
    examples = [data.tokenize_pair(tiny_tokenizer, p, 160, 96) for p in _pairs(6)]
    pad, cpu = tiny_tokenizer.pad_token_id, torch.device("cpu")
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    ours = steps.ReferenceCache.build(steps.PolicyLogps(policy), examples, pad, cpu, 6, False, bf16, progress=False)
    bf16_copy = steps.PolicyLogps(copy.deepcopy(policy).to(torch.bfloat16))
    old = steps.ReferenceCache.build(bf16_copy, examples, pad, cpu, 6, False, bf16, progress=False)
    idx = list(range(6))
    batch = packing.pack_pairs([examples[i] for i in idx], pad)
    args = steps.Objective(noise="none", beta=0.1, alpha=1.0, noise_sigma=0.1, loss_type="sigmoid", chunk_size=256)
    margins = {name: steps.cached_batch_loss(steps.PolicyLogps(policy), cache, idx, batch, None, args, None,
                                             bf16)["margin"].abs().max().item() for name, cache in
               (("ours", ours), ("old", old))}
    assert margins["ours"] < 1e-6 < margins["old"]
