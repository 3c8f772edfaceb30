"""The paper's Table 1 benchmarks through EleutherAI's lm-evaluation-harness (`python eval.py benchmarks MODEL`).

One `python -m lm_eval` run per Table 1 column with the paper's few-shot settings (Table 4, those of the Open
LLM Leaderboard v1): ARC 25-shot, TruthfulQA 0-shot, Winogrande 5-shot, GSM8K 5-shot, HellaSwag 10-shot,
MMLU 5-shot. As App. C says, ARC is the average of arc_easy and arc_challenge and TruthfulQA the average of
mc1 and mc2 (the leaderboard used arc_challenge and mc2 alone). Each column's results land in OUT/<column>/
(lm_eval nests them under the model name); a column with results already there is skipped, so a rerun
resumes. The table is written to OUT/benchmarks.json. lm_eval is optional (not in requirements.txt) and
downloads the benchmark datasets from the Hugging Face Hub, so it needs network access.

Where this departs from, or fills a gap in, the paper:
1. Metric: App. C reports "normalized accuracy" for every benchmark; lm_eval has acc_norm only for ARC and
   HellaSwag, so TruthfulQA, Winogrande and MMLU use acc, and GSM8K exact_match with the strict-match filter.
2. Average: the mean of the six columns, reported only when all six exist.
"""
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np

from data import write_json
from plots import markdown_table, read_json

BENCHMARKS = [  # (Table 1 column, lm_eval tasks averaged into it, num_fewshot): App. C and Table 4
    ("ARC", ["arc_challenge", "arc_easy"], 25),
    ("TruthfulQA", ["truthfulqa_mc1", "truthfulqa_mc2"], 0),
    ("Winogrande", ["winogrande"], 5),
    ("GSM8K", ["gsm8k"], 5),
    ("HellaSwag", ["hellaswag"], 10),
    ("MMLU", ["mmlu"], 5),
]


def benchmark_commands(model_dir, out_dir, batch_size="auto", device=None, limit=None):
    """[(directory name, argv)] of lm_eval invocations, one per column. lm_eval splits --model_args at every
    "," and "=" with no quoting, so a model path holding either is refused (it could inject arguments)."""
    if any(c in str(model_dir) for c in ",="):
        raise ValueError(f"{model_dir}: lm_eval's --model_args cannot carry a model path containing ',' or '=' "
                         f"(it would be split into extra arguments); rename it or link it from a plain path")
    commands = []
    for column, tasks, shots in BENCHMARKS:
        name = column.lower()
        cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model_dir}",
               "--tasks", ",".join(tasks), "--num_fewshot", str(shots), "--batch_size", str(batch_size),
               "--output_path", str(Path(out_dir) / name)]
        cmd += ["--device", device] if device else []
        cmd += ["--limit", str(limit)] if limit else []
        commands.append((name, cmd))
    return commands


def task_metric(results, task, path):
    """acc_norm where the task reports it, else acc, else exact_match (strict-match filter)."""
    entry = results.get(task)
    if entry is None:
        raise ValueError(f"{path}: no results for task {task}")
    for metric in ("acc_norm", "acc", "exact_match"):
        for key in (f"{metric},none", f"{metric},strict-match", metric):
            if isinstance(entry.get(key), (int, float)):
                return float(entry[key])
    raise ValueError(f"{path}: task {task} has none of acc_norm, acc, exact_match")


def latest_results(out_dir):
    """Newest lm_eval results*.json under out_dir (it nests them under the model name), or None."""
    found = sorted(Path(out_dir).rglob("results*.json"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def benchmark_table(out_dir):
    """Table 1 row from the results files under out_dir/{arc,truthfulqa,...}: column -> the mean of its tasks'
    metrics (ARC: arc_easy and arc_challenge; TruthfulQA: mc1 and mc2), None if absent; and their Average."""
    row = {}
    for column, tasks, _ in BENCHMARKS:
        path = latest_results(Path(out_dir) / column.lower())
        results = read_json(path).get("results", {}) if path is not None else {}
        row[column] = float(np.mean([task_metric(results, t, path) for t in tasks])) if path is not None else None
    row["Average"] = float(np.mean(list(row.values()))) if None not in row.values() else None
    return row


def run_benchmarks(args):
    model_dir = Path(args.model)
    out_dir = Path(args.out_dir or (model_dir.parent / "benchmarks" if model_dir.is_dir() else
                                    Path("benchmarks") / args.model.replace("/", "__")))
    commands = benchmark_commands(args.model, out_dir, args.batch_size, args.device, args.limit)
    if args.dry_run:
        print("\n".join(" ".join(cmd) for _, cmd in commands))
        return commands
    if importlib.util.find_spec("lm_eval") is None:
        raise SystemExit("benchmarks need EleutherAI's lm-evaluation-harness: pip install lm-eval "
                         "(and network access to the Hugging Face Hub for the benchmark datasets)")
    for name, cmd in commands:
        if latest_results(out_dir / name) is not None:
            print(f"{name}: results already in {out_dir / name}", file=sys.stderr)
            continue
        print("+ " + " ".join(cmd), file=sys.stderr)
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit(f"lm_eval failed on {name}; its datasets come from the Hugging Face Hub, "
                             "so it needs network access (see the lm_eval output above)")
    row = benchmark_table(out_dir)
    write_json(out_dir / "benchmarks.json", row)
    print(markdown_table(["model"] + list(row), [[args.model] + list(row.values())]))
    return row
