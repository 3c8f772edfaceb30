"""EleutherAI's lm-evaluation-harness: the paper's Table 1 benchmarks (`python eval.py benchmarks MODEL|RUN_DIR`)
and a local task that runs offline (`--local-task`), through one command builder and one results parser.

One `python -m lm_eval` run per Table 1 column with the paper's few-shot settings (Table 4, those of the Open
LLM Leaderboard v1): ARC 25-shot, TruthfulQA 0-shot, Winogrande 5-shot, GSM8K 5-shot, HellaSwag 10-shot,
MMLU 5-shot. As App. C says, ARC is the average of arc_easy and arc_challenge and TruthfulQA the average of
mc1 and mc2 (the leaderboard used arc_challenge and mc2 alone). Each column's results land in OUT/<column>/
(lm_eval nests them under the model name); a column with results already there, made from the same model
(OUT/<column>/dnpo_key.json: the weights' identity, the tasks, shots and --limit, the local task's files), is
skipped, so a rerun resumes; results made from anything else are deleted and lm_eval runs again, with one line
saying why. The directory written is held with runlock (one writer). The table is written to
OUT/benchmarks.json. lm_eval is optional (requirements-harness.txt) and downloads the Table 1 datasets from the
Hugging Face Hub, so they need network access.

The local task `dnpo_demo_eval` needs none: the demo's held-out split (data.load_prompts, eval split, seed 0)
written as OUT/task/demo_eval.jsonl beside its lm-eval task file OUT/task/dnpo_demo_eval.yaml (JSON, which
YAML reads), loaded by lm_eval's own `json` dataset builder (--include_path OUT/task) with
HF_DATASETS_OFFLINE=1 and HF_HUB_OFFLINE=1. The prompt is the question in the model's chat template (as
in training, --apply_chat_template), greedy generation up to the first newline (at most 48 tokens), scored
by exact match (case and punctuation ignored) under two filters: `first-line`, the whole answer line, and
`last-word`, its last word or number (the demo's correct answers end with the answer: "67 + 21 = 88.").
A run directory evaluates its base model (an embedded GGUF base is the HF directory model.py converted it
to once) and every iter{k}/model into RUN_DIR/eval/benchmarks/{base,iter{k}}/, and the scores of all of
them into RUN_DIR/eval/benchmarks.json, which `eval.py report` tabulates.

Where this departs from, or fills a gap in, the paper:
1. Metric: App. C reports "normalized accuracy" for every benchmark; lm_eval has acc_norm only for ARC and
   HellaSwag, so TruthfulQA, Winogrande and MMLU use acc, and GSM8K exact_match with the strict-match filter.
2. Average: the mean of the six columns, reported only when all six exist.
3. The local task is ours (the paper evaluates on Table 1 and GPT-4o-mini scores). Its exact match is not
   demo.check_answer (`eval.py score`'s accuracy): "No, 248 is smaller than 892." is right there and wrong
   under both filters here; it shows what lm-eval's own scoring makes of the same held-out questions.
"""
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

import errors
import runlock
from data import atomic_open, iterations, load_prompts, read_json, write_json, write_jsonl
from plots import markdown_table

BENCHMARKS = [  # (Table 1 column, lm_eval tasks averaged into it, num_fewshot): App. C and Table 4
    ("ARC", ["arc_challenge", "arc_easy"], 25),
    ("TruthfulQA", ["truthfulqa_mc1", "truthfulqa_mc2"], 0),
    ("Winogrande", ["winogrande"], 5),
    ("GSM8K", ["gsm8k"], 5),
    ("HellaSwag", ["hellaswag"], 10),
    ("MMLU", ["mmlu"], 5),
]


LOCAL_TASK = "dnpo_demo_eval"
LOCAL = [("Demo", [LOCAL_TASK], 0)]  # the local task, in BENCHMARKS' shape: one lm_eval run
LOCAL_FILTERS = ("first-line", "last-word")  # its filters: one score each, from the one generation
LOCAL_MAX_TOKENS = 48  # a demo answer's first line fits (the demo preset generates 32 tokens in training)


def local_task_config(data_file):
    """The lm-eval task (its YAML file's content) over a JSONL file of {"id", "prompt", "answer"} records."""
    exact = dict(metric="exact_match", aggregation="mean", higher_is_better=True, ignore_case=True,
                 ignore_punctuation=True)
    return dict(task=LOCAL_TASK, dataset_path="json", dataset_kwargs=dict(data_files=dict(test=str(data_file))),
                test_split="test", num_fewshot=0, output_type="generate_until", doc_to_text="{{prompt}}", doc_to_target="{{answer}}",
                generation_kwargs=dict(until=["\n"], do_sample=False, max_gen_toks=LOCAL_MAX_TOKENS),
                filter_list=[dict(name="first-line", filter=[dict(function="take_first")]),
                             dict(name="last-word", filter=[dict(function="regex", regex_pattern="[A-Za-z0-9]+",
                                                                 group_select=-1, fallback=""),
                                                            dict(function="take_first")])],
                metric_list=[exact], metadata=dict(version=1))


def write_local_task(task_dir):
    """task_dir/demo_eval.jsonl (the demo's held-out split) and task_dir/dnpo_demo_eval.yaml; the directory
    lm_eval's --include_path reads."""
    task_dir = Path(task_dir).resolve()
    records = [{"id": r["id"], "prompt": r["prompt"], "answer": str(r["answer"])}
               for r in load_prompts(None, split="eval", seed=0)]
    write_jsonl(task_dir / "demo_eval.jsonl", records)
    with atomic_open(task_dir / f"{LOCAL_TASK}.yaml") as fh:  # JSON is YAML: no YAML writer needed
        fh.write(json.dumps(local_task_config(task_dir / "demo_eval.jsonl"), indent=1) + "\n")
    return task_dir


def benchmark_commands(model_dir, out_dir, batch_size="auto", device=None, limit=None, local_task_dir=None):
    """[(directory name, argv)] of lm_eval invocations, one per Table 1 column, or the one of the local task
    (from local_task_dir, write_local_task's directory). lm_eval splits --model_args at every "," and "=" with
    no quoting, so a model path holding either is refused (it could inject arguments)."""
    if any(c in str(model_dir) for c in ",="):
        raise ValueError(f"{model_dir}: lm_eval's --model_args cannot carry a model path containing ',' or '=' "
                         f"(it would be split into extra arguments); rename it or link it from a plain path")
    commands = []
    for column, tasks, shots in LOCAL if local_task_dir else BENCHMARKS:
        name = column.lower()
        cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model_dir}",
               "--tasks", ",".join(tasks), "--num_fewshot", str(shots), "--batch_size", str(batch_size),
               "--output_path", str(Path(out_dir) / name)]
        cmd += ["--device", device] if device else []
        cmd += ["--limit", str(limit)] if limit else []
        cmd += ["--include_path", str(local_task_dir), "--apply_chat_template", "--log_samples"] if local_task_dir else []
        commands.append((name, cmd))
    return commands


def task_metric(results, task, path, filters=("none", "strict-match")):
    """acc_norm where the task reports it, else acc, else exact_match (strict-match filter); under one of
    `filters` (the local task: one of LOCAL_FILTERS)."""
    entry = results.get(task)
    if entry is None:
        raise ValueError(f"{path}: no results for task {task}")
    for metric in ("acc_norm", "acc", "exact_match"):
        for key in (*(f"{metric},{f}" for f in filters), metric):
            if isinstance(entry.get(key), (int, float)):
                return float(entry[key])
    raise ValueError(f"{path}: task {task} has none of acc_norm, acc, exact_match under {', '.join(filters)}")


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


def local_table(out_dir):
    """{"Demo first-line": exact match, "Demo last-word": ...} from the local task's results under
    out_dir/demo (None when absent)."""
    path = latest_results(Path(out_dir) / LOCAL[0][0].lower())
    results = read_json(path).get("results", {}) if path is not None else {}
    return {f"{LOCAL[0][0]} {f}": task_metric(results, LOCAL_TASK, path, (f,)) if path is not None else None
            for f in LOCAL_FILTERS}


def targets(model, resolve):
    """[(name, model path or hub id, results directory)]: a run directory's base model (resolved by
    `resolve`: the embedded GGUF becomes its converted directory) and every iter{k}/model, or one model."""
    path = Path(model)
    if not (path.is_dir() and iterations(path)):
        return [("model", model, path.parent / "benchmarks" if path.is_dir() else
                 Path("benchmarks") / model.replace("/", "__"))]
    config_path = path / f"iter{iterations(path)[0]}" / "config.json"
    base = read_json(config_path).get("base_model") if config_path.is_file() else None
    if base is None:
        raise ValueError(f"{config_path}: no base_model")
    found = [("base", resolve(base))] + [(f"iter{k}", str(path / f"iter{k}" / "model")) for k in iterations(path)
                                          if (path / f"iter{k}" / "model" / "config.json").is_file()]
    return [(name, m, path / "eval" / "benchmarks" / name) for name, m in found]


KEY_FILE = "dnpo_key.json"  # beside lm_eval's results in OUT/<column>/: what they were made from


def column_key(identity, cmd, task_dir):
    """What one column's results depend on: the model's identity (eval.model_identity: its files' sha256), the
    lm_eval tasks, shots and --limit of its command, and the local task's files (their sha256)."""
    flag = lambda name: cmd[cmd.index(name) + 1] if name in cmd else None  # noqa: E731
    key = {"model": identity, "tasks": flag("--tasks"), "num_fewshot": flag("--num_fewshot"), "limit": flag("--limit")}
    if task_dir is not None:
        key["task_files"] = {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
                             for f in sorted(Path(task_dir).iterdir()) if f.is_file() and not f.name.startswith(".")}
    return key


def key_reason(cached, key):
    """Why results keyed `cached` are not those `key` asks for, or None."""
    if not isinstance(cached, dict):
        return "no model identity recorded (made by an older eval.py)"
    if cached.get("model") != key["model"]:
        return "weights changed since cached"
    return None if cached == key else "task, shots or --limit changed since cached"


def run_benchmarks(args, resolve=str, identify=None):
    """`eval.py benchmarks`: Table 1 (or --local-task) on one model or on every model of a run directory. Each
    column's results are keyed by `identify(model)` (the weights' identity), the command's tasks and --limit and
    the local task's files (OUT/<column>/dnpo_key.json): results made from anything else are deleted and made
    again, never reported."""
    found = targets(args.model, resolve)
    run_dir = Path(args.model) if found[0][0] == "base" else None
    if args.out_dir:  # a run directory's models in OUT/{base,iter{k}}, one model in OUT
        found = [(name, m, Path(args.out_dir) / name if run_dir else Path(args.out_dir)) for name, m, _ in found]
    task_dir = (found[0][2].parent if run_dir else found[0][2]) / "task" if args.local_task else None
    found = [t for t in found if t[0] not in args.skip]
    if not found:
        raise ValueError(f"{args.model}: every model skipped (--skip {' '.join(args.skip)})")
    commands = {name: benchmark_commands(m, out, args.batch_size, args.device, args.limit, task_dir)
                for name, m, out in found}
    if args.dry_run:
        print("\n".join(" ".join(cmd) for cmds in commands.values() for _, cmd in cmds))
        return commands
    if importlib.util.find_spec("lm_eval") is None:
        raise errors.Refusal("EleutherAI's lm-evaluation-harness is not installed: pip install lm-eval (or pip install "
                             "-r requirements-harness.txt)"
                             + ("" if args.local_task else " (and network access to the Hugging Face Hub for the "
                                                           "benchmark datasets)"))
    identify = identify or (lambda model: {"name": str(model)})
    identities = {name: identify(model) for name, model, _ in found}  # before anything is written
    roots = {found[0][2].parent if run_dir else out for _, _, out in found}  # every directory results go to
    if run_dir is not None:
        roots.add(run_dir / "eval" / "benchmarks")  # also guards RUN_DIR/eval/benchmarks.json
    for root in sorted(roots):
        runlock.hold(root, "eval.py benchmarks")
    env = dict(os.environ)
    if task_dir is not None:  # the local task reads only local files: never the Hub
        write_local_task(task_dir)
        env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    table = {}
    for name, model, out_dir in found:
        for column, cmd in commands[name]:
            key, key_path = column_key(identities[name], cmd, task_dir), out_dir / column / KEY_FILE
            if latest_results(out_dir / column) is not None:
                reason = key_reason(read_json(key_path) if key_path.is_file() else None, key)
                if reason is None:
                    print(f"{name} {column}: results already in {out_dir / column}", file=sys.stderr)
                    continue
                print(f"{name} {column}: {reason}; re-running lm_eval", file=sys.stderr)
                shutil.rmtree(out_dir / column)  # never mixed with, or reported as, the new model's results
            write_json(key_path, key)
            print("+ " + " ".join(cmd), file=sys.stderr)
            if subprocess.run(cmd, env=env).returncode != 0:
                raise errors.Refusal(f"lm_eval failed on {name} {column}" + (
                    " (see its output above)" if args.local_task else "; its datasets come from the Hugging Face "
                    "Hub, so it needs network access (see the lm_eval output above)"))
        row = {**benchmark_table(out_dir), **local_table(out_dir)}
        write_json(out_dir / "benchmarks.json", row)
        table[name] = {"model": str(model), **row, "identity": identities[name]}
    columns = [c for c in next(iter(table.values())) if c not in ("model", "identity")
               and any(r[c] is not None for r in table.values())]
    if run_dir is not None:  # all models of the run, for `eval.py report`
        path = run_dir / "eval" / "benchmarks.json"
        old = read_json(path)["models"] if path.is_file() else {}
        write_json(path, {"models": {**old, **table}})
    print(markdown_table(["model"] + columns, [[name if run_dir else r["model"]] + [r[c] for c in columns]
                                               for name, r in table.items()]))
    return table
