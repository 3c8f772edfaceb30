"""Tests of the noise diagnostics (noise.py departure 9, loss.py departure 6): each against a value computed
another way (plain float64 formulas on whole tensors, a hand computation, a second-order Monte Carlo)."""
import math

import pytest
import torch

import noise
from loss import dpo_weights, margin_diagnostics
from noise import (DIAGNOSTIC_TOPK, FixedNoise, NoiseGenerator, chunk_noise, draw_base_seed, noisy_answer_logps,
                   noisy_answer_logps_pair)

N, V, D = 23, 37, 5


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden, head = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    seq_ids = torch.sort(torch.randint(0, 3, (N,), generator=g)).values
    gen = NoiseGenerator(D, V)
    with torch.no_grad():
        gen.proj.weight.normal_(0, 0.4, generator=g)
        gen.proj.bias.normal_(-2, 0.5, generator=g)
    return hidden, head, targets, seq_ids, gen


def plain_stats(hidden, head, targets, gen, base_seed, chunk_size):
    """The diagnostics in float64 on the whole (n, v) block, ε from the chunked path's seeds."""
    n, v = hidden.shape[0], head.shape[0]
    z = (hidden @ head.T).double()
    variance = gen(hidden).double().expand(n, v)
    eps = torch.cat([chunk_noise(base_seed, k, min(chunk_size, n - s), v) for k, s in
                     enumerate(range(0, n, chunk_size))]).double()
    noisy = z + variance.sqrt() * eps
    logp, logq = z.log_softmax(-1), noisy.log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)  # KL(p ‖ p̃) by its definition
    top = z.argsort(-1, descending=True)[:, :DIAGNOSTIC_TOPK]
    return dict(kl_noise=kl.mean().item(), sigma2_target=variance[torch.arange(n), targets].mean().item(),
                sigma2_topk=variance.gather(1, top).mean().item())


@pytest.mark.parametrize("chunk_size, tile_rows", [(4, None), (256, None), (4, 3), (256, 1), (256, 5)])
def test_token_diagnostics_equal_the_plain_float64_formulas(chunk_size, tile_rows, monkeypatch):
    """stats of the ε₁ draw, chunked, equal KL / σ²[y] / top-k σ² computed on whole tensors in float64, whatever
    the rows per tile of _diagnostic_sums (None: the default, one tile here; 3 and 5 leave a ragged last tile)."""
    if tile_rows is not None:
        monkeypatch.setattr(noise, "DIAGNOSTIC_TILE_BYTES", tile_rows * V * 4)
    hidden, head, targets, seq_ids, gen = inputs()
    rng = torch.Generator().manual_seed(5)
    base_seed = draw_base_seed(torch.Generator().manual_seed(5))
    stats = {}
    noisy_answer_logps(hidden, targets, seq_ids, 3, head, gen, generator_grad=False, chunk_size=chunk_size, rng=rng,
                       stats=stats)
    want = plain_stats(hidden, head, targets, gen, base_seed, chunk_size)
    assert set(stats) == set(noise.TOKEN_DIAGNOSTICS)
    for key in want:
        assert stats[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    assert stats["kl_noise"] > 0


def test_pair_path_reports_the_eps1_draw_and_changes_no_number():
    """noisy_answer_logps_pair's stats are those of its ε₁ (the first of the two calls' draws), with and without
    checkpointing, and asking for them changes neither the log-probs nor the gradients."""
    hidden, head, targets, seq_ids, gen = inputs(1)
    single = {}
    noisy_answer_logps(hidden, targets, seq_ids, 3, head, gen, generator_grad=False, chunk_size=8,
                       rng=torch.Generator().manual_seed(2), stats=single)
    results = []
    for budget in (2 ** 30, 0):  # graphs kept / each chunk checkpointed
        for stats in (None, {}):
            gen.zero_grad()
            e1, e2, var = noisy_answer_logps_pair(hidden, targets, seq_ids, 3, head, gen, chunk_size=8,
                                                  rng=torch.Generator().manual_seed(2), graph_budget_bytes=budget,
                                                  stats=stats)
            (e2.sum() + var).backward()
            results.append((e1, e2, var, gen.proj.weight.grad.clone()))
            if stats is not None:
                assert stats == pytest.approx(single, rel=1e-6)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b)



@pytest.mark.parametrize("sigma, rel", [(1e-3, 1e-2), (40.0, 1e-5)])
def test_kl_keeps_its_precision_for_tiny_and_huge_noise(sigma, rel):
    """At SmolLM2's V = 49152 with logits ~ N(0, 9) (lse(z) ≈ 15): σ = 1e-3 gives KL ≈ 5e-7 per token, about
    float32's ulp(lse), which lse(z̃) − lse(z) − Σ p δ cannot resolve (2.4 % off here) and log Σ p e^δ − Σ p δ does (0.3 %);
    σ = 40 makes e^δ overflow float32 (δ > 88), where the lse form takes over."""
    g = torch.Generator().manual_seed(0)
    n, v = 8, 49152
    hidden, head = torch.randn(n, D, generator=g), torch.randn(v, D, generator=g) * (3 / math.sqrt(D))
    targets = torch.randint(0, v, (n,), generator=g)
    fixed, stats = FixedNoise(sigma, v), {}
    noisy_answer_logps(hidden, targets, torch.zeros(n, dtype=torch.long), 1, head, fixed, generator_grad=False,
                       rng=torch.Generator().manual_seed(3), stats=stats)
    want = plain_stats(hidden, head, targets, fixed, draw_base_seed(torch.Generator().manual_seed(3)), 256)
    assert stats["kl_noise"] == pytest.approx(want["kl_noise"], rel=rel)


def test_diagnostics_run_once_per_chunk_under_checkpointing(monkeypatch):
    """A checkpointed chunk is recomputed in backward, its diagnostics are not (the forward's stay in the sink);
    the graph path's stats equal the no-graph draw's with the same ε, and asking for them changes no gradient."""
    calls, real = [], noise._diagnostic_sums
    monkeypatch.setattr(noise, "_diagnostic_sums", lambda *a: calls.append(1) or real(*a))
    hidden, head, targets, seq_ids, gen = inputs(2)
    chunks = math.ceil(N / 8)
    want = {}
    noisy_answer_logps(hidden, targets, seq_ids, 3, head, gen, generator_grad=False, chunk_size=8,
                       rng=torch.Generator().manual_seed(4), stats=want)
    assert len(calls) == chunks
    calls.clear()
    grads = []
    for stats in (None, {}):
        gen.zero_grad()
        out, var = noisy_answer_logps(hidden, targets, seq_ids, 3, head, gen, generator_grad=True, chunk_size=8,
                                      rng=torch.Generator().manual_seed(4), return_variance=True, stats=stats)
        (out.sum() + var).backward()
        grads.append(gen.proj.weight.grad.clone())
    assert len(calls) == chunks and stats == pytest.approx(want, rel=1e-6)
    torch.testing.assert_close(*grads)
    calls.clear()
    stats = {}
    e1, e2, var = noisy_answer_logps_pair(hidden, targets, seq_ids, 3, head, gen, chunk_size=8,
                                          rng=torch.Generator().manual_seed(4), graph_budget_bytes=0, stats=stats)
    (e2.sum() + var).backward()
    assert len(calls) == chunks and stats == pytest.approx(want, rel=1e-6)

def test_kl_matches_its_second_order_expectation_by_monte_carlo():
    """E_ε KL(p ‖ softmax(z + σε)) ≈ ½ Σ_v σ_v² p_v (1 − p_v) for small σ (the Fisher form), over many tokens."""
    g = torch.Generator().manual_seed(0)
    n = 4000
    hidden, head = torch.randn(n, D, generator=g), torch.randn(V, D, generator=g) * 0.7
    targets = torch.randint(0, V, (n,), generator=g)
    sigma = 0.05
    stats = {}
    noisy_answer_logps(hidden, targets, torch.zeros(n, dtype=torch.long), 1, head, FixedNoise(sigma, V),
                       generator_grad=False, rng=torch.Generator().manual_seed(1), stats=stats)
    p = (hidden @ head.T).double().softmax(-1)
    expected = (0.5 * sigma ** 2 * (p * (1 - p)).sum(-1)).mean().item()
    assert stats["kl_noise"] == pytest.approx(expected, rel=0.05)
    assert stats["sigma2_target"] == pytest.approx(sigma ** 2) and stats["sigma2_topk"] == pytest.approx(sigma ** 2)


def test_margin_diagnostics_by_hand():
    """Offsets, DPO weights, their ratio and the weights' share shift on three pairs, computed by hand."""
    m, mt = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([-1.0, 1.0, 0.0])
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    w, wt = [s(-0.0), s(-1.0), s(-2.0)], [s(1.0), s(-1.0), s(0.0)]
    shift = 0.5 * sum(abs(a / sum(wt) - b / sum(w)) for a, b in zip(wt, w))
    d = margin_diagnostics(m, mt)
    assert d["margin_offset"] == pytest.approx(1.0) and d["margin_offset_std"] == pytest.approx(1.0)
    assert d["dpo_weight"] == pytest.approx(sum(w) / 3) and d["dpo_weight_noisy"] == pytest.approx(sum(wt) / 3)
    assert d["dpo_weight_ratio"] == pytest.approx(sum(wt) / sum(w))
    assert d["weight_shift"] == pytest.approx(shift)


def test_margin_diagnostics_limits():
    """No noise: offset 0, ratio 1, shift 0. A saturated batch shifted uniformly: the weights grow by one factor
    (ratio e^c) and their shares stay (shift ≈ 0): the case an adaptive optimizer cannot tell from no noise."""
    m = torch.tensor([5.0, 6.0, 7.0, 9.0])
    same = margin_diagnostics(m, m)
    assert (same["margin_offset"], same["dpo_weight_ratio"], same["weight_shift"]) == (0.0, 1.0, 0.0)
    shifted = margin_diagnostics(m, m - 1.0)
    assert shifted["dpo_weight_ratio"] == pytest.approx(math.e, rel=0.01)
    assert shifted["weight_shift"] < 5e-3 and shifted["margin_offset_std"] == pytest.approx(0.0)
    spread = margin_diagnostics(torch.tensor([0.0, 8.0]), torch.tensor([0.0, 0.0]))  # one pair pulled out of saturation
    w8 = 1 / (1 + math.exp(8))
    assert spread["weight_shift"] == pytest.approx(0.5 - w8 / (0.5 + w8))  # shares (1, 0)·… -> (½, ½)
    hinge = dpo_weights(torch.tensor([0.5, 1.5]), "hinge")
    assert hinge.tolist() == [1.0, 0.0]
    assert margin_diagnostics(torch.tensor([2.0, 3.0]), torch.tensor([2.0, 3.0]), "hinge")["weight_shift"] == 0.0


def test_epoch_slopes_and_noise_figure(tmp_path):
    """epoch_slopes fits each epoch's line (a sawtooth: +0.1 per step within, reset across epochs); noise.png is
    drawn for an iteration with noise and not for one without."""
    import plots
    rows = []
    for step in range(1, 13):
        epoch = (step - 1) // 4
        rows.append(dict(iter=1, step=step, epoch=epoch, model_loss=1.0 - 0.2 * epoch + 0.1 * ((step - 1) % 4),
                         noise_loss=-0.5 - 0.05 * ((step - 1) % 4), loss=0.4, margin=0.3, noisy_margin=0.1,
                         margin_offset=0.2, margin_offset_std=0.05, dpo_weight=0.4, dpo_weight_noisy=0.45,
                         dpo_weight_ratio=1.1, weight_shift=0.02, sigma2=0.01, sigma2_target=0.02,
                         sigma2_topk=0.03, kl_noise=0.004))
    slopes = plots.epoch_slopes(rows, "model_loss")
    assert slopes == {0: pytest.approx(0.1), 1: pytest.approx(0.1), 2: pytest.approx(0.1)}
    assert plots.epoch_slopes(rows, "noise_loss")[1] == pytest.approx(-0.05)
    for k, sigma2 in ((0, 0.0), (1, 0.01)):
        (tmp_path / f"iter{k}").mkdir()
        (tmp_path / f"iter{k}" / "metrics.jsonl").write_text(
            "".join(__import__("json").dumps({**r, "iter": k, "sigma2": sigma2}) + "\n" for r in rows))
    path = plots.plot_noise(tmp_path, tmp_path / "plots")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    (tmp_path / "iter1" / "metrics.jsonl").unlink()
    assert plots.plot_noise(tmp_path, tmp_path / "plots2") is None  # iteration 0 alone: no noise to draw
