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
a call whose outputs exist (study.py, the driver it shares): rerun the same command to continue. Outputs:
OUT/ablation.md (tables, the DNPO-vs-SPIN check, wall times), ablation.json, ablation.png (Fig. 8's
analogue), plots/stagnation.png (Fig. 2 / 10, spin and dnpo), plots/scores.png,
{spin,dnpo}-seed{s}/plots/losses.png (Fig. 9).
OUT/ablate_config.json keeps the settings: other train/eval flags, --chain or --noise-sigma are refused.
Before anything is written (and in a dry run) every flag is checked: the train flags after `--` by train.py's
own checks on each row's command (config.parse_args, config.check_judge), the eval flags by eval.py's parser,
--seeds ≥ 0; a run directory OUT/{row}-seed{s} that another process holds (train.py on it) stops the study in
one line naming the holder, and ablate.py writes into run directories (plots, α-SPIN's link) only while it
holds their locks itself (`study.row_locks`).

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
import shlex
import sys
from pathlib import Path

import numpy as np

import config
import data
import eval as ev
import judge as judges
import plots
import study
from demo import check_answer

HERE = Path(__file__).resolve().parent
ROWS = {"spin": ["--no-dsl", "--noise", "none"], "dsl": ["--noise", "none"], "npo": ["--no-dsl"], "dnpo": [],
        "fixed": ["--no-dsl", "--noise", "fixed"], "alpha_spin": ["--no-dsl", "--noise", "none", "--history", "2"]}
OWNED = {"--run-dir", "--iter", "--seed", "--start-model", "--dsl", "--no-dsl", "--noise", "--history", "--preset"}



# ----------------------------------------------------------------------------- the layout of OUT, and the table from the files its runs left
LABELS = {"spin": "SPIN", "dsl": "+DSL", "npo": "+NPO", "dnpo": "+DNPO (DSL + NPO)", "fixed": "+fixed noise (no DSL)",
          "alpha_spin": "α-SPIN (own chain)"}


def run_dir(opts, row, seed) -> Path:
    return Path(opts.out) / f"{row}-seed{seed}"


def row_seeds(opts, row):
    return opts.seeds if row in opts.seeds_rows else opts.seeds[:1]


def own_iters(opts, row):
    """The iterations a row trains itself (non-SPIN rows share SPIN's iteration 0)."""
    return range(0 if row == "spin" else 1, opts.iters + 1)


def settings_of(opts) -> dict:
    keys = ("preset", "train_flags", "chain", "noise_sigma", "eval_judge", "eval_judge_model", "eval_judge_base_url",
            "eval_data", "eval_max_prompts", "logps_n")
    return {key: getattr(opts, key) for key in keys}


def metric_cell(path, text_key="generated", score_key="generated_score"):
    """Held-out accuracy (demo.check_answer) with its 95% Wilson interval, or None when path is missing.
    Records without a checkable answer: the mean judge score with a normal 95% interval."""
    if not Path(path).is_file():
        return None
    judged = data.read_jsonl(path)
    row, n = ev.score_row(judged, text_key, score_key), sum(r.get("answer") is not None for r in judged)
    if row["accuracy"] is not None:
        correct = round(row["accuracy"] * n)
        return dict(metric="accuracy", value=row["accuracy"], correct=correct, n=n, ci=ev.wilson_interval(correct, n))
    scores = np.array([r[score_key] for r in judged if r.get(score_key) is not None], dtype=float)
    half = ev.Z95 * scores.std(ddof=1) / np.sqrt(len(scores)) if len(scores) > 1 else 0.0
    return dict(metric="mean score", value=float(scores.mean()), n=len(scores),
                ci=(float(scores.mean() - half), float(scores.mean() + half)))


def judged(opts, row, seed, name):
    return run_dir(opts, row, seed) / "eval" / f"{name}_judged.jsonl"


def per_family(path, family_of) -> dict:
    """{family: [correct, n]} of one judged eval file (demo records; the family comes from the demo task)."""
    out = {}
    for r in data.read_jsonl(path):
        if r.get("answer") is not None and r["id"] in family_of:
            counts = out.setdefault(family_of[r["id"]], [0, 0])
            counts[0] += check_answer(r["generated"], r["answer"], r["prompt"])
            counts[1] += 1
    return out


def collect(opts) -> dict:
    """Every number of ablation.md/json, from the judged files of `eval.py score` and summary.json files."""
    base = judged(opts, "spin", opts.seeds[0], "base")  # the base model is scored once (module docstring)
    out = dict(settings=settings_of(opts), rows=opts.rows, seeds=opts.seeds, iters=opts.iters, chain=opts.chain,
               base=metric_cell(base), human=metric_cell(base, "human", "human_score"), cells=[], summary=[],
               dnpo_vs_spin=[], times=[], families={})
    family_of = ({r["id"]: r["family"] for r in data.load_prompts("demo", "eval", max_prompts=opts.eval_max_prompts)}
                 if opts.eval_data in (None, "demo") else {})
    if family_of and base.is_file():
        out["families"]["base"] = per_family(base, family_of)
    for row in opts.rows:
        for seed in row_seeds(opts, row):
            for k in own_iters(opts, row):
                cell = dict(row=row, seed=seed, k=k, **(metric_cell(judged(opts, row, seed, f"iter{k}")) or {}))
                if cell.get("metric") == "accuracy" and base.is_file():  # the study's target: iter k vs the base model
                    cell["vs_base"] = ev.accuracy_vs(judged(opts, row, seed, f"iter{k}"), base)
                spin = judged(opts, "spin", seed, f"iter{k}")
                if row != "spin" and "value" in cell and spin.is_file():
                    c = ev.compare(judged(opts, row, seed, f"iter{k}"), spin)
                    cell["vs_spin"] = dict(win=c["win"], tie=c["tie"], loss=c["loss"], n=c["n"],
                                           win_minus_loss=c["rates"]["win_minus_loss"],
                                           ci=c["bootstrap_95"]["win_minus_loss"])
                out["cells"].append(cell)
                if family_of and seed == opts.seeds[0] and judged(opts, row, seed, f"iter{k}").is_file():
                    out["families"][f"{row} iter{k}"] = per_family(judged(opts, row, seed, f"iter{k}"), family_of)
                summary = run_dir(opts, row, seed) / f"iter{k}" / "summary.json"
                if summary.is_file():
                    s = data.read_json(summary)
                    out["times"].append(dict(stage=f"train {row}-seed{seed} iter{k}", train_s=s.get("train_s"),
                                             wall_s=s.get("wall_s")))
    for row in opts.rows:
        for k in own_iters(opts, row):
            values = [c["value"] for c in out["cells"] if (c["row"], c["k"]) == (row, k) and "value" in c]
            if values:
                out["summary"].append(dict(row=row, k=k, seeds=len(values), mean=float(np.mean(values)),
                                           min=min(values), max=max(values)))
    if "dnpo" in opts.rows:
        out["dnpo_vs_spin"] = [seed_check(out, k) for k in range(1, opts.iters + 1)]
    times_path = Path(opts.out) / "ablate_times.json"
    measured = data.read_json(times_path) if times_path.is_file() else {}
    out["times"] += [dict(stage=label, wall_s=s) for label, s in measured.items() if label.startswith("eval")]
    return out


def seed_check(result, k) -> dict:
    """DNPO − SPIN at iteration k per seed, and whether it exceeds the seed-to-seed spread (departure 2)."""
    value = {(c["row"], c["seed"]): c["value"] for c in result["cells"] if c["k"] == k and "value" in c}
    seeds = [s for s in result["seeds"] if ("dnpo", s) in value and ("spin", s) in value]
    diffs = [value["dnpo", s] - value["spin", s] for s in seeds]
    if not diffs:
        return dict(k=k, diffs=[], sentence=f"Iteration {k}: no seed has both DNPO and SPIN results yet.")
    mean = float(np.mean(diffs))
    head = f"Iteration {k}: DNPO − SPIN = {mean:+.3f}"
    if len(diffs) < 2:
        return dict(k=k, diffs=diffs, mean=mean, sentence=f"{head} (one seed: the seed-to-seed spread is unknown, "
                                                         f"so no claim; run with --seeds 0 1).")
    spread = {row: max(value[row, s] for s in seeds) - min(value[row, s] for s in seeds) for row in ("spin", "dnpo")}
    exceeds = abs(mean) > max(spread.values()) and (all(d > 0 for d in diffs) or all(d < 0 for d in diffs))
    per_seed = ", ".join(f"seed {s}: {d:+.3f}" for s, d in zip(seeds, diffs))
    verdict = "exceeds" if exceeds else "does not exceed"
    return dict(k=k, diffs=diffs, mean=mean, spread=spread, exceeds=exceeds,
                sentence=f"{head} (mean of {len(diffs)} seeds; {per_seed}); seed-to-seed spread (max − min) SPIN "
                         f"{spread['spin']:.3f}, DNPO {spread['dnpo']:.3f}: the difference {verdict} the spread.")


def fmt_cell(cell):
    return "—" if not cell or "value" not in cell else "{:.3f} [{:.3f}, {:.3f}]".format(cell["value"], *cell["ci"])


def fmt_paired(cell):
    v = (cell or {}).get("vs_spin")
    return "—" if not v else "{:+.3f} [{:+.3f}, {:+.3f}] ({}/{}/{})".format(v["win_minus_loss"], *v["ci"], v["win"],
                                                                          v["tie"], v["loss"])


def fmt_vs_base(cell):
    v = (cell or {}).get("vs_base")
    return "—" if not v else "{:+.3f} [{:+.3f}, {:+.3f}]".format(v["diff"], *v["ci"])


def markdown(opts, result) -> str:
    ks, first, out = range(opts.iters + 1), opts.seeds[0], Path(opts.out)
    metric, n = (result["base"] or {}).get("metric", "accuracy"), (result["base"] or {}).get("n", "?")
    cell = {(c["row"], c["seed"], c["k"]): c for c in result["cells"]}
    summary = {(s["row"], s["k"]): s for s in result["summary"]}

    def mean_cell(row, k):
        s = summary.get((row, k))
        if k not in own_iters(opts, row):
            return "= SPIN"
        return fmt_cell(cell.get((row, first, k))) if s is None or s["seeds"] == 1 else \
            f"{s['mean']:.3f} ({s['min']:.3f}–{s['max']:.3f})"
    main = [[name, "—", fmt_cell(c)] + [""] * len(ks) for name, c in
            [("base model", result["base"]), ("human answers (eval set)", result["human"])] if c]
    main += [[LABELS[r], len(row_seeds(opts, r)), ""] + [mean_cell(r, k) for k in ks] for r in opts.rows]
    per_seed = [[LABELS[r], s] + [fmt_cell(cell.get((r, s, k))) if k in own_iters(opts, r) else "= SPIN" for k in ks]
                for r in opts.rows for s in row_seeds(opts, r)]
    paired = [[LABELS[r], s] + [fmt_paired(cell.get((r, s, k))) for k in ks[1:]] for r in opts.rows[1:]
              for s in row_seeds(opts, r)]
    vs_base = [[LABELS[r], s] + [fmt_vs_base(cell.get((r, s, k))) if k in own_iters(opts, r) else "= SPIN" for k in ks]
               for r in opts.rows for s in row_seeds(opts, r)]
    protocol = ("every other row's iteration k starts from the SPIN model of iteration k−1 (`--chain spin`)"
                if opts.chain == "spin" else "each row chains its own models from iteration 2 on (`--chain own`)")
    figures = [("ablation.png", "held-out accuracy per iteration (Fig. 8)"),
               ("plots/stagnation.png", "log-probs of human vs own answers (Fig. 2 / 10)"),
               (f"spin-seed{first}/plots/losses.png", "SPIN loss"),
               (f"dnpo-seed{first}/plots/losses.png", "DNPO model and noise loss (Fig. 9)")]
    lines = [
        "# Ablation table (`python ablate.py`)", "",
        f"Train: `--preset {opts.preset} {shlex.join(opts.train_flags)}`, seeds {', '.join(map(str, opts.seeds))}; "
        f"iteration 0 is plain SPIN, trained once per seed and shared by every row; {protocol}; α-SPIN always "
        f"chains its own run. Held-out {metric} on {n} prompts (`eval.py score`, judge {opts.eval_judge}).", "",
        f"## Held-out {metric}", "",
        "One seed: the value and its 95% Wilson interval; several seeds: mean over seeds (min–max).", "",
        plots.markdown_table(["row", "seeds", "before training"] + [f"iter {k}" for k in ks], main), "",
        f"## Held-out {metric} per seed [95% Wilson interval]", "",
        plots.markdown_table(["row", "seed"] + [f"iter {k}" for k in ks], per_seed), "",
        f"## Paired {metric} difference vs the base model", "",
        "Row minus base model on the same held-out prompts (right where the base model was wrong, minus the "
        "reverse, over all prompts), with the paired-bootstrap 95% interval (`eval.accuracy_vs`).", "",
        plots.markdown_table(["row", "seed"] + [f"iter {k}" for k in ks], vs_base), "",
        "## Paired win − loss vs SPIN (same iteration, same seed)", "",
        "Judge-score win rate − loss rate of the row's answers vs SPIN's on the same held-out prompts, with the "
        "paired-bootstrap 95% interval (`eval.compare`); in brackets wins/ties/losses.", "",
        plots.markdown_table(["row", "seed"] + [f"iter {k}" for k in ks[1:]], paired), "",
        "## DNPO vs SPIN across seeds", ""]
    lines += [f"* {c['sentence']}" for c in result["dnpo_vs_spin"]] or ["* (no dnpo row)"]
    fams = sorted({f for counts in result["families"].values() for f in counts})
    if fams:
        lines += ["", f"## Held-out accuracy per task family (seed {first})", "",
                  "Correct / n per family of the demo task: where training gains and where it loses.", "",
                  plots.markdown_table(["model"] + fams, [[name] + ["{}/{} = {:.2f}".format(c[0], c[1], c[0] / c[1])
                                                                   if (c := counts.get(f)) else "—" for f in fams]
                                                          for name, counts in result["families"].items()])]
    lines += ["", "## Figures", ""] + [f"![{caption}]({path})" for path, caption in figures if (out / path).is_file()]
    lines += ["", "## Wall time", "", plots.markdown_table(
        ["stage", "train s", "wall s"], [[t["stage"], t.get("train_s"), t["wall_s"]] for t in result["times"]])]
    return "\n".join(lines) + "\n"


def figure(opts, result, path):
    """ablation.png: per iteration one bar per row (mean over seeds); error bars 95% Wilson (one seed) or
    min–max over seeds (then each seed a dot); the base model dashed."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * (opts.iters + 1), 4.2), layout="constrained")
    width = 0.8 / len(opts.rows)
    for i, row in enumerate(opts.rows):
        for k in own_iters(opts, row):
            cells = [c for c in result["cells"] if (c["row"], c["k"]) == (row, k) and "value" in c]
            values = [c["value"] for c in cells]
            if not values:
                continue
            x, mean = k + (i - (len(opts.rows) - 1) / 2) * width, float(np.mean(values))
            lo, hi = cells[0]["ci"] if len(cells) == 1 else (min(values), max(values))
            ax.bar(x, mean, width, yerr=[[mean - lo], [hi - mean]], capsize=3, color=f"C{i}",
                   label=LABELS[row] if k == own_iters(opts, row)[0] else None)
            if len(values) > 1:
                ax.scatter([x] * len(values), values, color="k", s=8, zorder=3)
    if result["base"]:
        ax.axhline(result["base"]["value"], color="0.3", ls="--", lw=1, label="base model")
    ax.set_xticks(range(opts.iters + 1), [f"iter {k}" for k in range(opts.iters + 1)])
    ax.set_ylabel(f"held-out {(result['base'] or {}).get('metric', 'accuracy')}")
    ax.set_title("ablation: error bars 95% Wilson (one seed) or min–max over seeds (dots: seeds)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="lower right")
    return plots._save(fig, Path(path))


def report(opts):
    out = Path(opts.out)
    figs = [run_dir(opts, r, opts.seeds[0]) for r in ("spin", "dnpo") if r in opts.rows]
    with study.row_locks(run_dirs(opts), "ablate.py"):  # plots go into run directories: none may be another's
        result = collect(opts)
        plots.make_plots(figs, out / "plots")  # Fig. 9 per run, Fig. 2 / 10 (stagnation.png) and scores for both
        figure(opts, result, out / "ablation.png")
        data.write_json(out / "ablation.json", result)
        with data.atomic_open(out / "ablation.md") as fh:
            fh.write(markdown(opts, result))
    return result


def run_dirs(opts):
    """Every run directory of the study, OUT/{row}-seed{s}."""
    return [run_dir(opts, row, seed) for row in opts.rows for seed in row_seeds(opts, row)]


def parse_args(argv=None):
    own, train_flags = study.split_argv(argv)
    p = config.Parser(prog="ablate.py", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ablate", help="one run directory per (row, seed) under it")
    p.add_argument("--preset", default="demo", help="train.py --preset for every row (demo | paper)")
    p.add_argument("--iters", type=int, default=3, help="train iterations 0..N (0: shared SPIN; 1..N: ablation)")
    p.add_argument("--seeds", type=config.COUNT, nargs="+", default=[0, 1], help="training seeds ≥ 0 (default 0 1)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows of {', '.join(ROWS)}")
    p.add_argument("--seeds-rows", default="spin,dnpo", help="rows run with every seed (others: the first seed)")
    p.add_argument("--chain", choices=["spin", "own"], default="spin",
                   help="spin: iteration k of every row starts from SPIN's iter{k-1} (paper); own: each row chains")
    p.add_argument("--noise-sigma", type=config.POSITIVE, help="σ of the fixed row (default: train.py's)")
    p.add_argument("--eval-judge", default="rule", choices=judges.KINDS, help="eval.py score --judge")
    p.add_argument("--eval-judge-model", help="eval.py score --judge-model")
    p.add_argument("--eval-judge-base-url", help="eval.py score --judge-base-url")
    p.add_argument("--eval-data", help="eval.py score --data (held-out prompts; default: the demo eval split)")
    p.add_argument("--eval-max-prompts", type=config.POSITIVE_INT,
                   help="eval.py score --max-prompts (default: all 200)")
    p.add_argument("--eval-batch-size", type=config.POSITIVE_INT,
                   help="eval.py score --gen-batch-size (prompts per generation batch)")
    p.add_argument("--logps-n", type=config.POSITIVE_INT, default=64,
                   help="eval.py logps --n for the spin and dnpo rows")
    p.add_argument("--dry-run", action="store_true", help="print the commands (# done: finished) and exit")
    args = p.parse_args(own)
    args.train_flags = train_flags
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
    first = run_dir(args, "spin", args.seeds[0])  # every flag checked before anything is written (or a dry run)
    study.check_commands([train_command(args, row, args.seeds[0], 1)[2:] for row in args.rows],
                   [["score", str(first), *eval_flags(args)], ["logps", str(first), "--n", str(args.logps_n)]],
                   (args.eval_judge, args.eval_judge_model, args.eval_judge_base_url))
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
             ("--max-prompts", opts.eval_max_prompts), ("--gen-batch-size", opts.eval_batch_size)]
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
        return dict(label=f"eval score {run.name} (to iter{upto})", done=lambda run=run, names=names: study.has_keys(
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
            steps.append(dict(label=f"eval logps {run.name}", done=lambda run=run, ks=ks: study.has_keys(
                run / "eval" / "logps_settings.json", "iterations", ks),
                cmd=[*evaluate, "logps", str(run), "--n", str(opts.logps_n)]))
    return steps


def check_settings(opts, write):
    """OUT/ablate_config.json: the settings every run under OUT used; refuse others (one line)."""
    study.keep_settings(Path(opts.out) / "ablate_config.json", settings_of(opts), write)


def execute(opts, steps):
    """Run the steps not done yet (study.execute); the seconds of each step run now go to OUT/ablate_times.json
    (ppo_study.py's budget reads them there)."""
    return study.execute(opts, steps, "ablate.py", "ablate_times.json")


def main(argv=None):
    """`python ablate.py ...`: the steps (--dry-run) or the table's numbers; Ctrl-C or a refusal of any module
    ends the process in one line naming ablate.py (study.exit_line), the one exit point of this command."""
    return cli("ablate.py", ablation, argv)


def ablation(argv=None):
    """The study of a command line, raising what the modules it calls raise (`main` is the command)."""
    opts = parse_args(argv)
    return study.run_study("ablate.py", opts, plan(opts), check_settings, execute, report, table="ablation.md",
                           run_dirs=run_dirs(opts))


def cli(prog, main, argv=None):
    """Run a study's `main(argv)` as the command `prog`: its result; Ctrl-C, or a refusal, bad input or OS error of
    any module it calls, ends the process in one line naming `prog` (study.exit_line). ppo_study.py's too."""
    try:
        return main(argv)
    except (KeyboardInterrupt, ValueError, OSError) as e:
        raise SystemExit(study.exit_line(prog, e)) from None


if __name__ == "__main__":
    main()
