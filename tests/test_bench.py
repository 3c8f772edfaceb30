"""The demo-workload benchmarks (bench/training.py, bench/perf.py) on the tiny fixture model: their arithmetic,
that OurRun is train.py's step, that TRL would see our token ids, and that each benchmark returns its
documented keys. Wall times are never checked; TRL parts are skipped when trl is not installed."""
import copy
import math
import types

import pytest
import torch

from bench import perf, training
from bench import run as benches
import data
import model as models
import train

CPU = torch.device("cpu")
TRL = pytest.mark.skipif(not training.trl_available(), reason="trl not installed (requirements-bench.txt)")


@pytest.fixture(scope="module")
def spec(tiny_model_dir, tmp_path_factory):
    """8 demo pairs (rejected = the tiny model's 6-token answers, generated once), batch 4, 2 epochs, 1 round."""
    return dict(model=tiny_model_dir, pairs=8, batch_size=4, epochs=2, max_new_tokens=6, gen_batch_size=4, rounds=1,
                cache_dir=str(tmp_path_factory.mktemp("bench-cache")))


@pytest.fixture(scope="module")
def w(spec):
    return training.workload(CPU, spec)


def test_workload_pairs_and_token_counts(w, spec):
    assert len(w.pairs) == 8 and w.steps_per_epoch == 2
    assert all(p["chosen"] and isinstance(p["rejected"], str) for p in w.pairs)
    assert w.tokens == sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in w.examples)
    assert w.n_params == sum(p.numel() for p in w.model.parameters())
    again = training.Workload(spec, CPU)  # the generated answers come back from the cache, unchanged
    assert again.pairs == w.pairs


def test_step_flops_by_hand():
    """6·N per token (policy) + 2·N per token once per iteration of 2 epochs = 7·N per token per epoch."""
    assert perf.step_flops(10, 7, 2) == 6 * 10 * 7 + 2 * 10 * 7 / 2 == 490
    assert perf.step_flops(10, 7, 1) == 8 * 10 * 7


def test_padding_fractions_by_hand():
    """One micro-batch per epoch: grouping cannot change it; 1 - real / (2B × longest row)."""
    lengths = [(4, 2), (3, 3), (6, 1)]  # rows of a 1-token prompt + answer: packed rows of 5, 5, 6
    examples = [dict(chosen_input_ids=[0] * c, rejected_input_ids=[0] * r, chosen_labels=[-100] + [1] * (c - 1),
                     rejected_labels=[-100] + [1] * (r - 1)) for c, r in lengths]
    fake = types.SimpleNamespace(examples=examples, spec=dict(batch_size=3, epochs=2))
    pad = perf.padding_fractions(fake)
    assert pad["random"] == pytest.approx(1 - 19 / 36) and pad["grouped"] == pytest.approx(1 - 19 / 36)
    assert pad["packed"] == pytest.approx(1 - 16 / 18) and pad["packed_positions_over_random"] == pytest.approx(0.5)


def test_padding_fractions_grouped_pads_less(w):
    pad = perf.padding_fractions(w)
    assert 0 <= pad["grouped"] <= pad["random"] < 1 and pad["packed_positions_over_random"] < 1


@pytest.mark.parametrize("fast", [True, False])
def test_our_run_is_train_steps_first_step(w, tmp_path, fast):
    """OurRun's first step sees train.train's first micro-batch and gives its loss (before any update), on
    the new path and on the old one (--no-precompute-ref --no-group-by-length)."""
    args = perf.train_args(w, tmp_path, fast=fast)
    (tmp_path / "iter0").mkdir()
    policy = copy.deepcopy(w.model)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    rows = train.train(args, policy, reference, w.tokenizer, w.pairs, tmp_path / "iter0", CPU, 0, 1)
    run = training.OurRun(w, precompute=fast, group=fast)
    out = run.step(run.micro_batches(0)[0])
    assert len(rows) == 4
    assert out["loss"].item() == pytest.approx(rows[0]["loss"], rel=1e-6)
    assert any((a != b).any() for a, b in zip(run.policy.parameters(), w.model.parameters()))  # it stepped


def test_lockstep_agreement_is_exact_for_the_same_dtype_and_not_for_bf16(w):
    same, _ = perf.lockstep_agreement(w, steps=2, dtype="fp32")
    assert same == dict(reference_logps=0.0, policy_logps=0.0, margin=0.0, loss=0.0)
    for fp32_head in (True, False):
        bf16, scale = perf.lockstep_agreement(w, steps=2, dtype="bf16", fp32_head=fp32_head)
        assert bf16["policy_logps"] > 0 and bf16["reference_logps"] > 0 and scale > 0


def test_profile_parts_add_up(w):
    out = perf.bench_profile(CPU, w.spec, steps=2)
    assert set(out) == {f"{p}_fraction" for p in perf.PARTS}
    assert sum(out.values()) == pytest.approx(1.0)
    assert out["noise_forward_fraction"] > 0 and out["policy_forward_fraction"] > 0
    spin = perf.bench_profile(CPU, w.spec, steps=1, noise="none")
    assert spin["noise_forward_fraction"] == 0


def test_noise_diagnostics_switch_changes_no_number_and_is_timed(w):
    """OurRun with and without the diagnostics gives the same loss (they only read), and only the first has them."""
    on, off = (training.OurRun(w, noise="trainable", diagnostics=d) for d in (True, False))
    idx = on.micro_batches(0)[0]
    a, b = on.step(idx), off.step(idx)
    assert a["loss"].item() == b["loss"].item()
    assert "kl_noise" in a and a["kl_noise"] > 0 and "kl_noise" not in b
    out = perf.bench_noise_diagnostics(CPU, w.spec)
    assert set(out) == {"time_ratio_with_over_without", "cpu_time_ratio_with_over_without"}
    assert all(math.isfinite(v) and v > 0 for v in out.values())


def test_benchmarks_return_their_keys(w):
    assert set(perf.bench_iteration_speedup(CPU, w.spec)) == {
        "speedup_old_over_new", "loop_speedup_old_over_new", "padding_fraction_random", "padding_fraction_grouped",
        "padding_fraction_packed", "positions_ratio_packed_over_random"}
    assert set(perf.bench_memory_and_noise(CPU, w.spec, memory=False)) == {"time_ratio_dnpo_over_spin"}
    flops = perf.bench_flop_utilization(CPU, w.spec, mm_size=64)
    assert set(flops) == {"fp32_fraction_of_matmul_peak", "bf16_fraction_of_matmul_peak", "bf16_matmul_peak_over_fp32"}
    assert all(v > 0 for v in flops.values())
    gen = perf.bench_generation(CPU, w.spec, prompts=4, batch=2, new_tokens=3)
    assert set(gen) == {"tokens_per_s_batch2_over_batch1", "identical_answer_fraction"}

@pytest.mark.parametrize("native", [True, False])
def test_cpu_bf16_keys_with_and_without_native_bf16(w, native, monkeypatch):
    """With native bf16 the step timing and agreement; without (an AVX2 CPU: PyTorch's reference GEMM) only
    the mm ratio, the rest skipped. Either way decided by model.cpu_bf16_native, forced here."""
    monkeypatch.setattr(models, "cpu_bf16_native", lambda: native)
    bf16 = perf.bench_cpu_bf16(CPU, w.spec, agree_steps=1, compile=False)
    agreement = {"max_abs_diff_reference_logps", "max_abs_diff_policy_logps", "max_abs_diff_margin",
                 "max_abs_diff_loss", "max_rel_diff_reference_logps", "max_rel_diff_policy_logps"}
    if native:
        assert set(bf16) == {"cpu_native_bf16", "time_ratio_bf16_over_fp32", "time_ratio_allbf16_over_fp32",
                             *agreement, *(f"allbf16_{k}" for k in agreement)}
    else:
        assert set(bf16) == {"cpu_native_bf16", "time_ratio_bf16_mm_over_fp32_mm"} and bf16["cpu_native_bf16"] == 0
        assert bf16["time_ratio_bf16_mm_over_fp32_mm"] > 0


def test_compile_failure_is_reported_in_one_line(w, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no compiler here\nsecond line")
    monkeypatch.setattr(torch, "compile", broken)
    assert perf.compile_timing(w) == "RuntimeError: no compiler here"


def test_peak_rss_counts_a_new_allocation():
    rss = training.PeakRSS().start()
    block = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, touched
    out = rss.stop()
    del block
    assert out["extra"] >= 60 * 2 ** 20 and out["peak"] == out["base"] + out["extra"]


def test_memory_child_in_its_own_process(w):
    peaks = training.child_peaks(("ours",), w)
    assert set(peaks["ours"]) == {"peak", "base", "extra"} and peaks["ours"]["extra"] > 0


def test_trl_rows_rebuild_our_rows(w):
    """prompt_ids + chosen_ids / rejected_ids are exactly data.tokenize_pair's ids."""
    for e, r in zip(w.examples, training.trl_rows(w.examples)):
        assert r["prompt_ids"] + r["chosen_ids"] == e["chosen_input_ids"]
        assert r["prompt_ids"] + r["rejected_ids"] == e["rejected_input_ids"]
        assert len(r["prompt_ids"]) == e["rejected_labels"].count(-100)


@TRL
def test_trl_collator_sees_our_batch(w):
    """TRL's collator on our rows gives collate_pairs' input ids, mask, and answer positions."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    pad = w.tokenizer.pad_token_id
    ours = data.collate_pairs(w.examples[:4], pad)
    theirs = DataCollatorForPreference(pad_token_id=pad)(training.trl_rows(w.examples[:4]))
    assert torch.equal(theirs["input_ids"], ours["input_ids"])
    assert torch.equal(theirs["attention_mask"], ours["attention_mask"])
    assert torch.equal(theirs["completion_mask"].bool(), ours["labels"] != -100)


@TRL
def test_train_step_vs_trl_keys(w):
    out = perf.bench_train_step_vs_trl(CPU, w.spec, memory=False)
    assert set(out) == {"step_time_ratio_ours_over_trl_off", "step_time_ratio_ours_over_trl_on",
                        "amortised_step_time_ratio_ours_over_trl_on", "step_time_ratio_ours_random_order_over_trl_on",
                        "step_time_ratio_ours_unpacked_over_trl_on"}
    peaks = training.memory_child("trl_on", dict(w.spec, pairs_file=None), CPU)
    assert peaks["extra"] > 0


def test_trl_missing_is_a_skip_not_an_error(w, monkeypatch):
    monkeypatch.setattr(perf, "trl_available", lambda: False)
    assert perf.bench_train_step_vs_trl(CPU, w.spec) == {}


def test_bench_registers_the_workload_benchmarks():
    assert set(benches.WORKLOAD_BENCHMARKS) <= set(benches.BENCHMARKS)
    for name in benches.WORKLOAD_BENCHMARKS:
        assert "spec" in benches.BENCHMARKS[name].__code__.co_varnames


def test_child_peak_is_not_the_parents_size(w):
    """A parent far larger than the child (here +1 GiB, touched) does not become the child's peak."""
    ballast = torch.ones(2 ** 28)  # 1 GiB
    peaks = training.child_peaks(("ours",), w)
    del ballast
    assert peaks["ours"]["peak"] < peaks["ours"]["base"] + 2 ** 29  # the tiny model's epoch needs far less


def test_finite_check_bench_returns_its_ratios(w):
    """bench finite_check times train.py's per-step check (distributed.all_finite) against a step: ratios ≥ 1 / > 0."""
    out = perf.bench_finite_check(CPU, w.spec)
    assert set(out) == {"time_ratio_step_with_check_over_without", "checkpoint_state_check_over_step"}
    assert out["time_ratio_step_with_check_over_without"] >= 1 and out["checkpoint_state_check_over_step"] > 0


def test_dnpo_step_bench_times_train_pys_own_step():
    """bench dnpo_step runs train.optimizer_step (through OurRun) for SPIN and DNPO on synthetic pairs: its ratios."""
    out = benches.bench_dnpo_step(CPU, pairs=2, length=16, prompt=4, repeats=1)
    assert set(out) == {"time_ratio_dnpo_over_spin", "generator_params_over_policy_params"}
    assert out["time_ratio_dnpo_over_spin"] > 0 and 0 < out["generator_params_over_policy_params"] < 1
