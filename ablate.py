"""The paper's ablation table in one command (Fig. 8, App. G, App. H, and α-SPIN of Sec. 5.3):

    python ablate.py [--out runs/ablate] [--iters 3] [--seeds 0 1] [--rows spin,dsl,npo,dnpo,fixed,alpha_spin]
                     [--seeds-rows spin,dnpo] [--chain spin|own] [--preset demo] [--dry-run] [-- TRAIN FLAGS]

One run directory per (row, seed), OUT/{row}-seed{s}; row = `train.py --iter k --preset P --run-dir
OUT/{row}-seed{s} --seed s TRAIN FLAGS` plus: spin `--no-dsl --noise none` (the baseline); dsl `--noise
none` (DSL only); npo `--no-dsl` (trainable noise only); dnpo nothing (train.py's defaults: DSL + noise);
fixed `--no-dsl --noise fixed [--noise-sigma S]` (App. H: NPO-style, no DSL); alpha_spin `--no-dsl
--noise none --history 2` (α-SPIN: the pairs of iterations k-1 and k).

Protocol. --iters N trains iterations 0..N. Iteration 0 is plain SPIN for every row, hence identical: it
is trained once per seed, as the spin row's iter0; iterations 1..N are the ablation iterations (the
paper's "Iter. 1..3" for N = 3). --chain spin (default; Sec. 5.4: "the SPIN-iteration model is used as
the baseline for each iteration"): every other row's iteration k starts from the SPIN model of iteration
k-1 (`--start-model OUT/spin-seed{s}/iter{k-1}/model`), so a row and SPIN at iteration k share their start
model and differ only in that iteration's recipe. --chain own: iteration 1 starts from SPIN's iter0,
k ≥ 2 from the row's own iter{k-1}/model (whole runs compared, as Fig. 6). alpha_spin chains its own run
whatever --chain says: α-SPIN mixes its own previous iteration's pairs and Table 2 compares it as a whole
method; its iter0 is a symlink to the spin row's iter0 (whose pairs --history 2 reads at k = 1), k = 1
starts from SPIN's iter0 model, k ≥ 2 from its own. Rows in --seeds-rows run with every seed, the others
with the first; spin always runs, with every seed.

Evaluation: `eval.py score` on every run directory, all on the same held-out prompts (eval seed 0: the
seed varies training only); the base model is scored once, in the spin row of the first seed (`--skip
base` elsewhere), alpha_spin's linked iter0 is not scored again (`--skip iter0`); `eval.py logps` on the
spin and dnpo rows (Fig. 2 / 10). train.py and eval.py resume or skip finished work, and ablate.py skips
a call whose outputs exist: rerun the same command to continue. Outputs: OUT/ablation.md (tables, the
DNPO-vs-SPIN check, wall times), ablation.json, ablation.png (Fig. 8's analogue), plots/stagnation.png
(Fig. 2 / 10, spin and dnpo), plots/scores.png, {spin,dnpo}-seed{s}/plots/losses.png (Fig. 9).
OUT/ablate_config.json keeps the settings: other train/eval flags, --chain or --noise-sigma are refused.

Where this departs from, or fills a gap in, the paper:
1. The paper's ablation reports benchmark averages of one run each; here the held-out accuracy of
   `eval.py score` (demo.check_answer; the mean judge score where records have no checkable answer) with
   a 95% Wilson interval (a normal interval for mean scores), the paired win − loss vs SPIN at the same
   iteration and seed with eval.py's paired-bootstrap 95% interval, and several seeds for spin and dnpo.
2. Seed-to-seed spread = max − min of a row's accuracy over seeds. "DNPO − SPIN exceeds the spread"
   means |mean over seeds of (DNPO − SPIN)| is larger than both rows' spreads and every seed's
   difference has the same sign; with one seed no such claim is made.
3. Whether ablation rows start from SPIN's model or chain their own is not stated; --chain spin is our
   reading of Sec. 5.4, --chain own the other. The fixed-noise σ of App. H is lost: train.py's default.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path


import ablate_table
import data
from ablate_table import own_iters, row_seeds, run_dir, settings_of

HERE = Path(__file__).resolve().parent
ROWS = {"spin": ["--no-dsl", "--noise", "none"], "dsl": ["--noise", "none"], "npo": ["--no-dsl"], "dnpo": [],
        "fixed": ["--no-dsl", "--noise", "fixed"], "alpha_spin": ["--no-dsl", "--noise", "none", "--history", "2"]}
OWNED = {"--run-dir", "--iter", "--seed", "--start-model", "--dsl", "--no-dsl", "--noise", "--history", "--preset"}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise SystemExit(f"ablate.py: {message} (see --help)")


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ablate", help="one run directory per (row, seed) under it")
    p.add_argument("--preset", default="demo", help="train.py --preset for every row (demo | paper)")
    p.add_argument("--iters", type=int, default=3, help="train iterations 0..N (0: shared SPIN; 1..N: ablation)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (default 0 1)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows of {', '.join(ROWS)}")
    p.add_argument("--seeds-rows", default="spin,dnpo", help="rows run with every seed (others: the first seed)")
    p.add_argument("--chain", choices=["spin", "own"], default="spin",
                   help="spin: iteration k of every row starts from SPIN's iter{k-1} (paper); own: each row chains")
    p.add_argument("--noise-sigma", type=float, help="σ of the fixed row (default: train.py's)")
    p.add_argument("--eval-judge", default="rule", choices=["rule", "openai", "hf"], help="eval.py score --judge")
    p.add_argument("--eval-judge-model", help="eval.py score --judge-model")
    p.add_argument("--eval-judge-base-url", help="eval.py score --judge-base-url")
    p.add_argument("--eval-data", help="eval.py score --data (held-out prompts; default: the demo eval split)")
    p.add_argument("--eval-max-prompts", type=int, help="eval.py score --max-prompts (default: all 200)")
    p.add_argument("--eval-batch-size", type=int, help="eval.py score --batch-size (prompts per generation batch)")
    p.add_argument("--logps-n", type=int, default=64, help="eval.py logps --n for the spin and dnpo rows")
    p.add_argument("--dry-run", action="store_true", help="print the commands (# done: finished) and exit")
    args = p.parse_args(argv[:cut])
    args.train_flags = argv[cut + 1:]
    rows, seeds_rows = args.rows.split(","), args.seeds_rows.split(",")
    unknown = [r for r in rows + seeds_rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"ablate.py: unknown row {unknown[0]!r} (rows: {', '.join(ROWS)})")
    args.rows = [r for r in ROWS if r in rows or r == "spin"]  # spin: iteration 0, start models, the baseline
    args.seeds_rows = {"spin", *seeds_rows}
    if args.iters < 1 or len(set(args.seeds)) != len(args.seeds):
        raise SystemExit("ablate.py: --iters must be ≥ 1 and --seeds distinct")
    owned = [f for f in args.train_flags if f.split("=")[0] in OWNED]
    if owned:
        raise SystemExit(f"ablate.py: {owned[0]} is set by ablate.py (see --help); remove it from the train flags")
    return args


# ----------------------------------------------------------------------------- the plan
def start_model(opts, row, seed, k):
    """--start-model of a row's iteration k; None: train.py's own <run-dir>/iter{k-1}/model."""
    if row == "spin" or not (k == 1 or (opts.chain == "spin" and row != "alpha_spin")):
        return None
    return str(run_dir(opts, "spin", seed) / f"iter{k - 1}" / "model")


def train_command(opts, row, seed, k):
    sigma = ["--noise-sigma", str(opts.noise_sigma)] if row == "fixed" and opts.noise_sigma is not None else []
    cmd = [sys.executable, str(HERE / "train.py"), "--iter", str(k), "--preset", opts.preset,
           "--run-dir", str(run_dir(opts, row, seed)), "--seed", str(seed), *opts.train_flags, *ROWS[row], *sigma]
    start = start_model(opts, row, seed, k)
    return cmd + (["--start-model", start] if start else [])


def eval_flags(opts):
    pairs = [("--judge", opts.eval_judge), ("--judge-model", opts.eval_judge_model),
             ("--judge-base-url", opts.eval_judge_base_url), ("--data", opts.eval_data),
             ("--max-prompts", opts.eval_max_prompts), ("--batch-size", opts.eval_batch_size)]
    return [str(x) for flag, value in pairs if value is not None for x in (flag, value)]


def plan(opts):
    """Every step in run order: dict(label, cmd or link=(target, path), done=callable). Each iteration's
    models are scored as soon as that iteration is trained, so an interrupted study has a table so far."""
    steps = []
    evaluate = [sys.executable, str(HERE / "eval.py")]

    def score(row, seed, upto):
        run = run_dir(opts, row, seed)
        skip = ([] if (row, seed) == ("spin", opts.seeds[0]) else ["base"]) + (["iter0"] if row == "alpha_spin" else [])
        names = [n for n in ["base", *(f"iter{k}" for k in own_iters(opts, row) if k <= upto)] if n not in skip]
        return dict(label=f"eval score {run.name} (to iter{upto})", done=lambda run=run, names=names: has_keys(
            run / "eval" / "scores.json", "models", names), cmd=[*evaluate, "score", str(run), *eval_flags(opts)]
            + (["--skip", *skip] if skip else []))
    for k in range(opts.iters + 1):
        for row in opts.rows:
            for seed in row_seeds(opts, row):
                run = run_dir(opts, row, seed)
                if k == 0 and row == "alpha_spin":  # α-SPIN's history reads the shared iteration 0's pairs
                    link = run / "iter0"
                    steps.append(dict(label=f"link {link}", link=(Path("..") / f"spin-seed{seed}" / "iter0", link),
                                      done=lambda link=link: link.is_symlink() or link.exists()))
                elif k in own_iters(opts, row):
                    model = run / f"iter{k}" / "model" / "config.json"
                    steps.append(dict(label=f"train {run.name} iter{k}", cmd=train_command(opts, row, seed, k),
                                      done=model.is_file))
                    steps.append(score(row, seed, k))
    for row in [r for r in ("spin", "dnpo") if r in opts.rows]:
        for seed in row_seeds(opts, row):
            run, ks = run_dir(opts, row, seed), [str(k) for k in own_iters(opts, row)]
            steps.append(dict(label=f"eval logps {run.name}", done=lambda run=run, ks=ks: has_keys(
                run / "eval" / "logps_settings.json", "iterations", ks),
                cmd=[*evaluate, "logps", str(run), "--n", str(opts.logps_n)]))
    return steps


def has_keys(path, field, keys) -> bool:
    return Path(path).is_file() and set(keys) <= set(json.loads(Path(path).read_text()).get(field, {}))


def run_command(cmd) -> int:
    """Run one train.py / eval.py command as a subprocess; its exit status."""
    return subprocess.run(cmd).returncode


def check_settings(opts, write):
    """OUT/ablate_config.json: the settings every run under OUT used; refuse others (one line)."""
    path, now = Path(opts.out) / "ablate_config.json", settings_of(opts)
    if path.is_file():
        was = json.loads(path.read_text())
        changed = [key for key in now if was.get(key) != now[key]]
        if changed:
            raise SystemExit(f"ablate.py: {opts.out} was run with " + ", ".join(f"{k}={was.get(k)!r}" for k in changed)
                             + " (now " + ", ".join(f"{now[k]!r}" for k in changed) + "); rerun with those or use another --out")
    elif write:
        data.write_json(path, now)


def execute(opts, steps):
    """Run the steps not done yet; seconds of each step run now go to OUT/ablate_times.json."""
    times_path = Path(opts.out) / "ablate_times.json"
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}
    for i, step in enumerate(steps, 1):
        if step["done"]():
            print(f"[{i}/{len(steps)} done] {step['label']}", flush=True)
            continue
        t0 = time.time()
        if "link" in step:
            target, link = step["link"]
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, link, target_is_directory=True)
        else:
            print(f"[{i}/{len(steps)}] {shlex.join(step['cmd'])}", flush=True)
            rc = run_command(step["cmd"])
            if rc != 0:
                raise SystemExit(f"ablate.py: {step['label']} failed (exit status {rc}); fix the cause and rerun "
                                 f"ablate.py (finished work is kept)")
        times[step["label"]] = time.time() - t0
        data.write_json(times_path, times)
    return times


def main(argv=None):
    opts = parse_args(argv)
    steps = plan(opts)
    check_settings(opts, write=not opts.dry_run)
    if opts.dry_run:
        for step in steps:
            text = f"ln -s {step['link'][0]} {step['link'][1]}" if "link" in step else shlex.join(step["cmd"])
            print(("# done: " if step["done"]() else "") + text)
        return steps
    execute(opts, steps)
    result = ablate_table.report(opts)
    print(Path(opts.out, "ablation.md").read_text())
    return result


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("ablate.py: interrupted; rerun the same command to continue")
    except ValueError as e:
        raise SystemExit(f"ablate.py: {e}")
