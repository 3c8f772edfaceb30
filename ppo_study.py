"""Table 2's analogue in one command: the online baselines PPO and RLOO (ppo.py) against base, SPIN, α-SPIN and DNPO
(ablate.py's rows), at matched budgets, on the same held-out prompts:

    python ppo_study.py [--out runs/ablate] [--iters 3] [--seeds 0] [--rows ppo,rloo] [--eval-max-prompts 400]
                        [--eval-batch-size 32] [--dry-run] [-- PPO FLAGS]

The SPIN, α-SPIN and DNPO rows are ablate.py's own steps (`--rows spin,dnpo,alpha_spin`, the demo preset, the
paper's protocol), so pointing --out at a finished ablation study with the same settings reuses its runs; ppo.py
trains OUT/{ppo,rloo}-seed{s} (rloo: `--advantage rloo`) from the same start model on the same 64 training prompts
with the rule judge as the reward; `eval.py score` scores every model on the same held-out prompts (eval seed 0).
The budget is matched per iteration k: DNPO's iteration k model has used k + 1 generations per training prompt
(SPIN's iterations 0..k−1, then DSL's k), and so has ppo.py's iter{k}/model. Every step is skipped when its outputs
exist, so rerunning the command continues; OUT/ppo_study_config.json keeps the PPO flags (others are refused).

Outputs: OUT/ppo_study.md (accuracy with its 95% Wilson interval, the paired accuracy difference vs DNPO at the same
iteration with its paired-bootstrap 95% interval, generations, judge calls and seconds behind each model, the
per-family breakdown) and OUT/ppo_study.json (every number of it).

Where this departs from, or fills a gap in, the paper:
1. The paper's Table 2 compares benchmark averages of one run each; here the held-out demo accuracy (eval.py) of
   every row at every iteration, with intervals, at a budget of generations and judge calls the paper does not
   report for PPO. Judge calls: DNPO scores the human and the generated answer of each prompt (2 per prompt per
   iteration; the human answers are the same every iteration, and a cached judge scores them once), PPO and RLOO
   only their own answers (1 per generation).
2. Seconds are the wall time of each row's training commands (ablate_times.json: model loading, generation,
   judging, training, saving), summed over the iterations behind the model, as measured on whatever machine ran
   them; they are comparable only between runs on the same, otherwise idle, machine.
"""
import re
import shlex
import sys
from pathlib import Path

import ablate
import config
import data
import eval as ev
import plots
import ppo
import study
from cli import Parser

HERE = Path(__file__).resolve().parent
PPO_ROWS = {"ppo": [], "rloo": ["--advantage", "rloo"]}
BASELINES = ("spin", "alpha_spin", "dnpo")
LABELS = {"spin": "SPIN", "alpha_spin": "α-SPIN", "dnpo": "DNPO", "ppo": "PPO (GAE, value head)",
          "rloo": "RLOO (k = 4, no critic)"}
OWNED = {"--run-dir", "--iters", "--seed", "--advantage"}


def parse_args(argv=None):
    own, ppo_flags = study.split_argv(argv)
    p = Parser(prog="ppo_study.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/ablate", help="the ablation study's directory (default %(default)s)")
    p.add_argument("--iters", type=config.POSITIVE_INT, default=3, help="iterations 0..N (default %(default)s)")
    p.add_argument("--seeds", type=config.COUNT, nargs="+", default=[0], help="training seeds (default 0)")
    p.add_argument("--rows", default="ppo,rloo", help="online rows: ppo, rloo or both (default %(default)s)")
    p.add_argument("--eval-max-prompts", type=config.POSITIVE_INT, default=400,
                   help="held-out prompts (eval.py score --max-prompts; default %(default)s)")
    p.add_argument("--eval-batch-size", type=config.POSITIVE_INT, default=32, help="eval.py score --batch-size")
    p.add_argument("--dry-run", action="store_true", help="print the commands (# done: finished) and exit")
    args = p.parse_args(own)
    args.ppo_rows = [r for r in PPO_ROWS if r in args.rows.split(",")]
    if not args.ppo_rows or set(args.rows.split(",")) - set(PPO_ROWS):
        raise SystemExit(f"ppo_study.py: --rows takes ppo, rloo or both, got {args.rows!r}")
    if owned := [f for f in ppo_flags if f.split("=")[0] in OWNED]:
        raise SystemExit(f"ppo_study.py: {owned[0]} is set by ppo_study.py; remove it from the PPO flags")
    try:
        ppo.parse_args([*ppo_flags, "--run-dir", "x"])  # ppo.py's own checks, before anything is written
    except SystemExit as e:
        raise SystemExit(f"ppo_study.py: a PPO flag after -- is refused: {str(e.code).removeprefix('ppo.py: ')}")
    opts = ablate.parse_args(["--out", args.out, "--iters", str(args.iters), "--seeds", *map(str, args.seeds),
                              "--rows", ",".join(BASELINES), "--seeds-rows", "spin,dnpo", "--eval-max-prompts",
                              str(args.eval_max_prompts), "--eval-batch-size", str(args.eval_batch_size)]
                             + (["--dry-run"] if args.dry_run else []))
    opts.ppo_rows, opts.ppo_flags = args.ppo_rows, ppo_flags
    return opts


# ----------------------------------------------------------------------------- the plan
def ppo_dir(opts, row, seed) -> Path:
    return Path(opts.out) / f"{row}-seed{seed}"


def step_iteration(step) -> int:
    """The iteration a step belongs to (its label names iter{k}; a link is iteration 0's)."""
    found = re.search(r"iter(\d+)", step["label"])
    return int(found.group(1)) if found else 0


def plan(opts):
    """ablate.py's train and score steps of the baseline rows (not its log-prob figures) and, per iteration, each
    online row's ppo.py and eval.py steps after them."""
    steps = [s for s in ablate.plan(opts) if not s["label"].startswith("eval logps")]
    for row in opts.ppo_rows:
        for seed in opts.seeds:
            run = ppo_dir(opts, row, seed)
            for k in range(opts.iters + 1):
                steps.append(dict(label=f"train {run.name} iter{k}", done=(run / f"iter{k}" / "model" / "config.json").is_file,
                                  cmd=[sys.executable, str(HERE / "ppo.py"), "--run-dir", str(run), "--iters", str(k),
                                       "--seed", str(seed), *PPO_ROWS[row], *opts.ppo_flags]))
                names = [f"iter{j}" for j in range(k + 1)]
                steps.append(dict(label=f"eval score {run.name} (to iter{k})",
                                  done=lambda run=run, names=names: study.has_keys(run / "eval" / "scores.json",
                                                                                    "models", names),
                                  cmd=[sys.executable, str(HERE / "eval.py"), "score", str(run),
                                       *ablate.eval_flags(opts), "--skip", "base"]))
    return sorted(steps, key=step_iteration)  # stable: each iteration's baselines first, then the online rows


def check_settings(opts, write):
    ablate.check_settings(opts, write)
    study.keep_settings(Path(opts.out) / "ppo_study_config.json", {"ppo_flags": opts.ppo_flags}, write)


# ----------------------------------------------------------------------------- the table
def chain(row, k):
    """The (run row, iteration) list of train steps behind a row's iteration-k model (ablate.py's protocol)."""
    if row in PPO_ROWS:
        return [(row, j) for j in range(k + 1)]
    if row == "spin":
        return [("spin", j) for j in range(k + 1)]
    if row == "dnpo":
        return [("spin", j) for j in range(k)] + [("dnpo", k)]
    return [("spin", 0)] + [("alpha_spin", j) for j in range(1, k + 1)]  # α-SPIN chains its own run


def budget(opts, row, seed, k, times):
    """(generations, judge calls, seconds) behind a row's iteration-k model, or Nones where a stage is missing."""
    if row in PPO_ROWS:
        path = ppo_dir(opts, row, seed) / f"iter{k}" / "summary.json"
        s = data.read_json(path) if path.is_file() else {}
        gens, calls = s.get("generations"), s.get("judge_calls")
    else:
        gens = calls = 0
        for run, j in chain(row, k):
            path = ablate.run_dir(opts, run, seed) / f"iter{j}" / "judged.jsonl"
            if not path.is_file():
                gens = calls = None
                break
            n = len(data.read_jsonl(path))
            gens, calls = gens + n, calls + 2 * n  # the human and the generated answer of each prompt
    seconds = [times.get(f"train {run}-seed{seed} iter{j}") for run, j in chain(row, k)]
    return gens, calls, (sum(seconds) if None not in seconds else None)


def judged(opts, row, seed, k):
    return (ppo_dir(opts, row, seed) if row in PPO_ROWS else ablate.run_dir(opts, row, seed)) / "eval" / f"iter{k}_judged.jsonl"


def collect(opts):
    times_path = Path(opts.out) / "ablate_times.json"
    times = data.read_json(times_path) if times_path.is_file() else {}
    base = ablate.judged(opts, "spin", opts.seeds[0], "base")
    family_of = {r["id"]: r["family"] for r in data.load_prompts("demo", "eval", max_prompts=opts.eval_max_prompts)}
    out = dict(settings=dict(ablate.settings_of(opts), ppo_flags=opts.ppo_flags, ppo_rows=opts.ppo_rows),
               base=ablate.metric_cell(base), human=ablate.metric_cell(base, "human", "human_score"), cells=[],
               families={"base": ablate.per_family(base, family_of)} if base.is_file() else {})
    for seed in opts.seeds:
        for k in range(opts.iters + 1):
            for row in (*BASELINES, *opts.ppo_rows):
                if row in ("dnpo", "alpha_spin") and k == 0:
                    continue  # = SPIN's iteration 0
                path = judged(opts, row, seed, k)
                dnpo = judged(opts, "dnpo" if k else "spin", seed, k)  # DNPO's iteration 0 is SPIN's
                gens, calls, seconds = budget(opts, row, seed, k, times)
                cell = dict(row=row, seed=seed, k=k, generations=gens, judge_calls=calls, seconds=seconds,
                            **(ablate.metric_cell(path) or {}))
                if "value" in cell and row not in ("dnpo", "spin" if k == 0 else "dnpo") and dnpo.is_file():
                    cell["vs_dnpo"] = ev.accuracy_vs(path, dnpo)
                if "value" in cell and base.is_file():
                    cell["vs_base"] = ev.accuracy_vs(path, base)
                out["cells"].append(cell)
                if path.is_file() and seed == opts.seeds[0]:
                    out["families"][f"{LABELS[row]} iter{k}"] = ablate.per_family(path, family_of)
    return out


def markdown(opts, result) -> str:
    def paired(v):
        return "—" if not v else "{:+.3f} [{:+.3f}, {:+.3f}]".format(v["diff"], *v["ci"])
    rows = []
    for c in result["cells"]:
        rows.append([c["k"], LABELS[c["row"]], c["seed"], ablate.fmt_cell(c), paired(c.get("vs_dnpo")),
                     paired(c.get("vs_base")), c["generations"] if c["generations"] is not None else "—",
                     c["judge_calls"] if c["judge_calls"] is not None else "—",
                     f"{c['seconds']:.0f}" if c["seconds"] is not None else "—"])
    fams = sorted({f for counts in result["families"].values() for f in counts})
    lines = ["# Table 2's analogue: online PPO / RLOO vs SPIN, α-SPIN and DNPO (`python ppo_study.py`)", "",
             f"PPO flags: `{shlex.join(opts.ppo_flags) or '(defaults)'}`; baselines: ablate.py's rows (demo preset, "
             f"`--chain spin`). Held-out accuracy on {opts.eval_max_prompts} prompts with its 95% Wilson interval; "
             "Δ = paired accuracy difference on the same prompts with its paired-bootstrap 95% interval "
             "(`eval.accuracy_vs`); at iteration 0, DNPO is SPIN. Budget behind each model: generations, judge calls and "
             "the seconds of the training commands, summed over the iterations behind it.", "",
             f"Base model: {ablate.fmt_cell(result['base'])}; human answers: {ablate.fmt_cell(result['human'])}.", "",
             plots.markdown_table(["iter", "row", "seed", "accuracy [95% CI]", "Δ vs DNPO (same iter)", "Δ vs base",
                                   "generations", "judge calls", "train s"], rows)]
    if fams:
        lines += ["", f"## Held-out accuracy per task family (seed {opts.seeds[0]})", "",
                  plots.markdown_table(["model"] + fams, [[name] + ["{}/{} = {:.2f}".format(c[0], c[1], c[0] / c[1])
                                                                   if (c := counts.get(f)) else "—" for f in fams]
                                                          for name, counts in result["families"].items()])]
    return "\n".join(lines) + "\n"


def report(opts):
    result = collect(opts)
    data.write_json(Path(opts.out) / "ppo_study.json", result)
    with data.atomic_open(Path(opts.out) / "ppo_study.md") as fh:
        fh.write(markdown(opts, result))
    return result


def main(argv=None):
    opts = parse_args(argv)
    dirs = ablate.run_dirs(opts) + [ppo_dir(opts, r, s) for r in opts.ppo_rows for s in opts.seeds]
    return study.run_study("ppo_study.py", opts, plan(opts), check_settings, ablate.execute, report,
                            describe=lambda step: f"ln -s {step['link'][0]} {step['link'][1]}" if "link" in step
                            else shlex.join(step["cmd"]), table="ppo_study.md", run_dirs=dirs)


if __name__ == "__main__":
    ablate.cli("ppo_study.py", main)
