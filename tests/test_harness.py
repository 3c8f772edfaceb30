"""harness.py: a model path cannot smuggle extra lm-eval model_args; Table 1 columns average as App. C says;
the offline local task goes through the same command builder and parser, and runs on the tiny model."""
import importlib.util
import json
import shutil

import numpy as np
import pytest

import data
import eval as ev
import harness


@pytest.mark.parametrize("model", ["runs/a,trust_remote_code=True/model", "runs/a=b/model"])
def test_comma_or_equals_in_the_model_path_is_refused(model, tmp_path):
    with pytest.raises(ValueError, match="cannot carry a model path containing ',' or '='") as err:
        harness.benchmark_commands(model, "out")
    assert "\n" not in str(err.value)
    with pytest.raises(SystemExit, match="eval.py benchmarks: .*rename it"):
        ev.main(["benchmarks", model, "--dry-run", "--out-dir", str(tmp_path)])


def test_plain_model_path_is_one_model_arg():
    cmd = harness.benchmark_commands("runs/demo/iter2/model", "out")[0][1]
    assert cmd[cmd.index("--model_args") + 1] == "pretrained=runs/demo/iter2/model"


def test_arc_and_truthfulqa_average_as_the_paper_says(tmp_path):
    """App. C: ARC is the mean of easy and challenge (acc_norm), TruthfulQA the mean of mc1 and mc2, not the
    leaderboard's challenge-only / mc2-only; the columns come in Table 1's order."""
    results = {"arc": {"arc_challenge": {"acc,none": 0.1, "acc_norm,none": 0.58}, "arc_easy": {"acc_norm,none": 0.82}},
               "truthfulqa": {"truthfulqa_mc1": {"acc,none": 0.26}, "truthfulqa_mc2": {"acc,none": 0.42}}}
    for name, res in results.items():
        data.write_json(tmp_path / name / "m" / "results_1.json", {"results": res})
    row = harness.benchmark_table(tmp_path)
    assert list(row) == ["ARC", "TruthfulQA", "Winogrande", "GSM8K", "HellaSwag", "MMLU", "Average"]
    assert row["ARC"] == pytest.approx(0.70) and row["TruthfulQA"] == pytest.approx(0.34)
    assert row["Winogrande"] is None and row["Average"] is None


# ----------------------------------------------------------------------------- the offline local task
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval not installed (pip install -r requirements-harness.txt)")


def test_local_task_files_are_the_demo_eval_split(tmp_path):
    """The JSONL is the demo's held-out split; the task file is JSON (read as YAML) over it, with both filters."""
    task_dir = harness.write_local_task(tmp_path / "task")
    rows = data.read_jsonl(task_dir / "demo_eval.jsonl")
    assert rows == [{"id": r["id"], "prompt": r["prompt"], "answer": str(r["answer"])}
                    for r in data.load_prompts(None, split="eval")] and len(rows) == 200
    task = json.loads((task_dir / "dnpo_demo_eval.yaml").read_text())
    assert task["dataset_kwargs"]["data_files"]["test"] == str(task_dir / "demo_eval.jsonl")
    assert [f["name"] for f in task["filter_list"]] == list(harness.LOCAL_FILTERS)
    assert task["output_type"] == "generate_until" and task["generation_kwargs"]["until"] == ["\n"]


def test_local_task_command_and_results_use_the_table1_code_path(tmp_path):
    """One lm_eval command (Table 1's builder) with the include path and the chat template; its two filter
    scores parsed by Table 1's parser, each under its own filter name."""
    [(name, cmd)] = harness.benchmark_commands("runs/x/iter0/model", tmp_path, 4, limit=5, local_task_dir="T")
    assert name == "demo" and cmd[cmd.index("--tasks") + 1] == harness.LOCAL_TASK
    assert cmd[cmd.index("--include_path") + 1] == "T" and "--apply_chat_template" in cmd
    assert harness.local_table(tmp_path) == {"Demo first-line": None, "Demo last-word": None}
    results = {harness.LOCAL_TASK: {"exact_match,first-line": 0.25, "exact_match,last-word": 0.5}}
    data.write_json(tmp_path / "demo" / "m" / "results_1.json", {"results": results})
    assert harness.local_table(tmp_path) == {"Demo first-line": 0.25, "Demo last-word": 0.5}


def test_run_dir_targets_are_the_resolved_base_and_every_iteration_model(tmp_path):
    run = tmp_path / "run"
    data.write_json(run / "iter0" / "config.json", {"base_model": "smollm2-135m"})
    data.write_json(run / "iter0" / "model" / "config.json", {})
    (run / "iter1").mkdir()  # not finished: no model yet
    found = harness.targets(str(run), lambda name: f"/cache/{name}")
    assert found == [("base", "/cache/smollm2-135m", run / "eval" / "benchmarks" / "base"),
                     ("iter0", str(run / "iter0" / "model"), run / "eval" / "benchmarks" / "iter0")]


@needs_lm_eval
def test_local_task_runs_offline_on_the_tiny_model_into_the_report(tmp_path, tiny_model_dir, monkeypatch):
    """lm_eval itself, offline, on the tiny model of a run directory; its scores are the mean of its own
    per-sample exact matches, land in eval/benchmarks.json and in report.md."""
    import plots

    run = tmp_path / "run"
    data.write_json(run / "iter0" / "config.json", {"iter": 0, "base_model": tiny_model_dir})
    shutil.copytree(tiny_model_dir, run / "iter0" / "model")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # lm_eval's dataset cache: not the user's
    table = ev.main(["benchmarks", str(run), "--local-task", "--skip", "base", "--limit", "4", "--batch-size", "4"])
    out = run / "eval" / "benchmarks" / "iter0"
    for f in harness.LOCAL_FILTERS:
        samples = [json.loads(line) for p in out.rglob("samples_*.jsonl") for line in p.read_text().splitlines()]
        mine = [s for s in samples if s["filter"] == f]
        assert [s["doc"]["prompt"] for s in mine] == [r["prompt"] for r in data.load_prompts(None, "eval", 4)]
        assert table["iter0"][f"Demo {f}"] == pytest.approx(np.mean([s["exact_match"] for s in mine]))
    assert json.loads((run / "eval" / "benchmarks.json").read_text())["models"]["iter0"]["Demo last-word"] is not None
    report = plots.write_report(run).read_text()
    assert "## lm-evaluation-harness" in report and "| iter0 |" in report.split("## lm-evaluation-harness")[1]


def test_report_tabulates_the_run_s_harness_scores(tmp_path):
    """report.md: one row per model (base first), only the columns some model has, the numbers as written."""
    import plots

    run = tmp_path / "run"
    data.write_json(run / "iter0" / "config.json", {"iter": 0, "base_model": "b"})
    row = lambda v: {"model": f"m{v}", "ARC": None, "Demo first-line": v, "Demo last-word": v / 2}  # noqa: E731
    data.write_json(run / "eval" / "benchmarks.json", {"models": {"iter0": row(0.25), "base": row(0.5)}})
    report = plots.write_report(run).read_text().split("## lm-evaluation-harness")[1]
    assert "| model | path | Demo first-line | Demo last-word |" in report and "ARC" not in report
    assert report.index("| base | m0.5 | 0.500 | 0.250 |") < report.index("| iter0 | m0.25 | 0.250 | 0.125 |")


def test_dry_run_on_a_run_dir_prints_one_local_command_per_model(tmp_path, tiny_model_dir, capsys):
    run = tmp_path / "run"
    data.write_json(run / "iter0" / "config.json", {"iter": 0, "base_model": tiny_model_dir})
    shutil.copytree(tiny_model_dir, run / "iter0" / "model")
    ev.main(["benchmarks", str(run), "--local-task", "--dry-run"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and f"pretrained={tiny_model_dir} " in lines[0] and "iter0/model" in lines[1]
    assert all(f"--include_path {run / 'eval' / 'benchmarks' / 'task'}" in line for line in lines)
