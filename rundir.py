"""The run directory of train.py, RUN_DIR/iter{k}/ (the files and directories in WRITTEN, none of which may be a
symbolic link): which model an iteration starts from, what a killed write left behind, the metrics.jsonl rows
read back on resume, and the end-of-iteration summary (summary.json and the screen that prints it).

Every file is written atomically (data.atomic_open), so a kill at any moment leaves the old file or the new one;
what a killed write leaves behind (temporary files, half-saved model directories) is removed by
`remove_leftovers` on the next run. The resumable training state: checkpoint.py; the data order: sampler.py.

Where this departs from, or fills a gap in, the paper:
1. The paper describes no run directory; its layout and checks are ours.
"""
import collections
import math
import os
import pathlib
import shutil

import data
import errors


def start_model_of(run_dir, k, base_model, rerun_hint=""):
    """The model iteration k starts from; a one-line error naming the command to run first."""
    if pathlib.Path(run_dir).exists() and not pathlib.Path(run_dir).is_dir():
        raise errors.Refusal(f"--run-dir {run_dir} is a file, not a directory")
    if k == 0:
        return base_model
    prev = pathlib.Path(run_dir) / f"iter{k - 1}" / "model"
    if not (prev / "config.json").is_file():
        raise errors.Refusal(f"{prev} does not exist; run `python train.py --iter {k - 1} "
                             f"--run-dir {run_dir}{rerun_hint}` first")
    return str(prev)


LEFTOVER_PATTERNS = (".*.tmp", "checkpoint/.*.tmp", ".model.tmp-*", ".model.old-*")


def remove_leftovers(it_dir):
    """Delete what a killed write left in an iteration directory: temporary files of atomic writes
    (`.state.pt.*.tmp`, `.config.json.*.tmp`, ...) and half-saved model directories (`.model.tmp-*`,
    `.model.old-*`). `*.partial` files are resume state, not leftovers: they stay. Returns what it removed."""
    removed = []
    for pattern in LEFTOVER_PATTERNS:
        for path in sorted(pathlib.Path(it_dir).glob(pattern)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def prepare_iteration_dir(it_dir, rank):
    """Create it_dir (errors.Refusal when it cannot be created or written to); on rank 0 remove the
    leftovers of a killed write and cut a torn last line off metrics.jsonl (a kill mid-append)."""
    it_dir = pathlib.Path(it_dir)
    try:
        it_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise errors.Refusal(f"cannot create {it_dir} ({e.strerror or e}); choose another --run-dir") from None
    if not os.access(it_dir, os.W_OK | os.X_OK):
        raise errors.Refusal(f"{it_dir} is not writable; choose another --run-dir")
    if rank == 0:
        for path in [it_dir / name for name in WRITTEN] + [it_dir.parent / "judge_cache.jsonl"]:
            data.refuse_symlink(path)  # a ValueError naming the link
        remove_leftovers(it_dir)
        data.drop_torn_line(it_dir / "metrics.jsonl")
        read_metrics(it_dir / "metrics.jsonl")  # checked now, not after the model has loaded


# Every file and directory train.py writes in an iteration directory (none may be a symbolic link).
WRITTEN = ("config.json", "stages.json", "generated.jsonl", "generated.jsonl.partial", "judged.jsonl",
           "judged.jsonl.partial", "judged.jsonl.cache.jsonl", "pairs.jsonl", "metrics.jsonl", "logps.jsonl",
           "summary.json", "checkpoint", "checkpoint/state.pt", "model")


def read_metrics(path):
    """The rows of a metrics.jsonl ([] when there is none); errors.Refusal (one line, file:row and field) for a
    row whose step is not a positive integer or whose epoch is not an integer >= 0."""
    path = pathlib.Path(path)
    if not path.is_file():
        return []
    try:
        rows = data.read_jsonl(path)
    except ValueError as e:
        raise errors.Refusal(f"{e}; delete {path.parent} to redo the iteration") from None
    for i, row in enumerate(rows, 1):
        for key, low in (("step", 1), ("epoch", 0)):
            value = row.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise errors.Refusal(f"{path} row {i}: field {key!r} must be an integer >= {low}, got "
                                     f"{value!r}; restore the file or delete {path.parent} to redo the iteration")
    return rows


def print_summary(it_dir):
    """The one-screen summary of a finished iteration (from its summary.json)."""
    path = pathlib.Path(it_dir) / "summary.json"
    if not os.path.lexists(path):
        return
    try:
        s = data.read_json(path)
    except ValueError as e:
        raise errors.Refusal(f"{e}; delete {path} and rerun to write it again") from None
    s = collections.defaultdict(lambda: None, s)  # a missing field prints as None
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    print(f"\n=== iteration {s['iter']} done: {pathlib.Path(it_dir) / 'model'} ===")
    print(f"start model   {s['start_model']}")
    print(f"pairs         {s['pairs']}  (DSL {s['dsl']}: flips {s['dsl_flips']}, ties {s['ties']}, "
          f"missing scores {s['missing_scores']}; judge flip rate {fmt(s['flip_rate'])})")
    print(f"noise         {s['noise']}  (final σ² {fmt(s['final_sigma2'])})")
    print(f"last epoch    loss {fmt(s['final_loss'])} | margin {fmt(s['final_margin'])} | noisy margin "
          f"{fmt(s['final_noisy_margin'])} | reward acc {fmt(s['final_reward_acc'])}")
    print(f"time          train {fmt(s['train_s'])} s, wall {fmt(s['wall_s'])} s ({s['steps']} steps)")


def given_start_model(start_model, k):
    """train.py --start-model DIR (k ≥ 1): the model iteration k starts from instead of <run-dir>/iter{k-1}/model
    (ablate.py starts every row's iteration k from the SPIN model of iteration k-1); None when not given."""
    if start_model is None:
        return None
    if k == 0:
        raise errors.Refusal("--start-model is for k ≥ 1 (iteration 0 starts from --base-model)")
    path = pathlib.Path(start_model).expanduser()
    local = path.exists() or start_model.startswith(("/", ".", "~")) or start_model.count("/") > 1
    if local and not (path / "config.json").is_file():  # a hub id is "name" or "org/name"
        raise errors.Refusal(f"--start-model {start_model} has no config.json "
                             f"(expected a save_pretrained() directory or a hub id)")
    return start_model


def finite_or_none(x):
    """x, or None for a missing or NaN value (JSON has no NaN; a flip rate is NaN when no record has both scores)."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def summarize(args, pairs, stats, rows, train_s, wall_s):
    """summary.json of an iteration; final_* are means over the last epoch's optimizer steps."""
    last = [r for r in rows if r["epoch"] == rows[-1]["epoch"]] if rows else []
    mean = lambda key: sum(r[key] for r in last) / len(last) if last else None  # noqa: E731
    return dict(iter=args.iter, start_model=args.start_model, pairs=len(pairs), dsl=args.dsl, noise=args.noise,
                dsl_flips=stats.get("flips"), ties=stats.get("ties"), missing_scores=stats.get("missing"),
                identical_dropped=stats.get("identical"),
                flip_rate=finite_or_none(stats.get("flip_rate")), steps=len(rows), final_loss=mean("loss"),
                final_margin=mean("margin"), final_noisy_margin=mean("noisy_margin"),
                final_reward_acc=mean("reward_acc"), final_sigma2=mean("sigma2"), train_s=train_s, wall_s=wall_s)
