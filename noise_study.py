"""What the trainable noise does: the NPO mechanism study in one resumable command.

    python noise_study.py [--out runs/noise_study] [--groups optimizer,saturation,grid,chain]
                          [--eval-max-prompts 400] [--eval-batch-size 32] [--dry-run] [-- TRAIN FLAGS]

Protocol (the paper's for its ablations): OUT/start is SPIN's iteration 0 (`train.py --iter 0 TRAIN
FLAGS`); every cell is an iteration 1 from that model (`--start-model OUT/start/iter0/model`), with the
training prompts' answers generated and judged once (the first cell's, copied to the others: same start,
same generation flags, so `stages.json` accepts them). A cell is a (group, row): row spin = `--no-dsl
--noise none`, npo = `--no-dsl` (trainable noise), fixed = `--no-dsl --noise fixed --noise-sigma σ` with σ²
the npo cell's mean σ² over its training (matched), dnpo = DSL + noise. Groups (GROUPS below):

    optimizer   AdamW 3e-6 (the study's; with the fixed row), plain SGD 2e-3 (the gradient's scale is not
                normalised), RMSprop 1e-6 (the paper's Table 3 optimizer at the demo preset's lr)
    saturation  AdamW 3e-6 at β = 1: the margins and loss saturate (reward accuracy 1, loss ≲ 0.1)
    mechanism   fixed noise of σ = MECHANISM_SIGMA under AdamW and under SGD: a large offset of every pair's
                margin, which raises every DPO weight alike (loss.py departure 6): a normalising
                optimizer should undo it, SGD should not
    clipping    the test of that prediction with nothing that normalises: plain SGD 2e-3 with
                --max-grad-norm 0 (no clipping), rows spin, npo, fixed σ = MECHANISM_SIGMA and npo at
                --noise-lr SGD_NOISE_LR, against their own SPIN (clipping at norm 1, like AdamW, removes a
                common factor of the pairs' weights)
    grid        AdamW: --noise-lr × --noise-alpha × --noise-init-variance (3 × 2 × 2), each trained one epoch
                (PROBE_STEPS), pruned by its diagnostics: only the KEEP with the largest weight shift (and
                at least MIN_SHIFT) finish and are evaluated
    chain       the saturation group's spin and npo continued to iterations 2 and 3 on their own
                (--chain own), for the stagnation table

Every cell is scored by `eval.py score` on the same held-out prompts (OUT/start is scored with the base
model). Outputs: OUT/noise_study.md and .json (the sweep table, the iteration table), OUT/{cell}/plots/noise.png
(noise.py departure 9). train.py and eval.py resume; a finished call is skipped: rerun the same command to
continue. OUT/study_config.json keeps the settings; others are refused. Every flag is checked before anything
is written (train.py's own checks on the start's and each cell's command, eval.py's on the eval command), and
a run directory another process holds stops the study in one line (the driver: study.py, `row_locks`).

Where this departs from, or fills a gap in, the paper:
1. The paper gives no noise learning rate, α or initial variance and no sweep of them; the grid, the
   optimizer comparison and the saturation regime are ours, chosen to find where the noise can change
   the policy's update (loss.py departure 6: only through the per-pair DPO weights).
2. "Fixed noise at a matched σ": App. H does not give its σ; here σ² = the trainable noise's own mean σ²
   over V entries and steps, so the two differ in where the variance sits, not how much there is.
"""
import math
import shutil
import sys
from pathlib import Path

import numpy as np

import config
import data
import eval as ev
import plots
import study

HERE = Path(__file__).resolve().parent
ROWS = {"spin": ["--no-dsl", "--noise", "none"], "npo": ["--no-dsl", "--noise", "trainable"],
        "fixed": ["--no-dsl", "--noise", "fixed"], "dnpo": ["--dsl", "--noise", "trainable"]}
ADAMW = ["--optimizer", "adamw", "--lr", "3e-6"]
SGD = ["--optimizer", "sgd", "--lr", "2e-3"]
NOCLIP = [*SGD, "--max-grad-norm", "0"]
GROUPS = ("optimizer", "saturation", "mechanism", "clipping", "grid", "chain")
PROBE_STEPS, KEEP, MIN_SHIFT = 8, 3, 0.02
SGD_NOISE_LR = 10.0  # plain SGD moves the generator by lr × its gradient, which Eq. 9's mean over V makes ~1/V
# per weight: 1e-3 leaves σ² at its start; one-epoch probes (docs/noise.md) gave a live noise at 10, not at 1
MECHANISM_SIGMA = 3.0  # σ² = 9: the σ² the live trainable noise of the grid puts on the answers' own tokens
GRID = dict(noise_lr=(1e-3, 1e-2, 1e-1), noise_alpha=(0.0, 1.0), noise_init_variance=(1e-2, 1e-1))
END_KEYS = ("margin", "noisy_margin", "margin_offset", "margin_offset_std", "dpo_weight", "dpo_weight_ratio",
            "weight_shift", "kl_noise", "sigma2", "sigma2_target", "sigma2_topk", "model_loss", "reward_acc")


def grid_cells():
    """The grid's cells: name -> train flags (AdamW; npo rows only: spin and fixed do not depend on them)."""
    cells = {}
    for lr in GRID["noise_lr"]:
        for alpha in GRID["noise_alpha"]:
            for var in GRID["noise_init_variance"]:
                cells[f"grid-lr{lr:g}-a{alpha:g}-v{var:g}"] = [*ADAMW, *ROWS["npo"], "--noise-lr", f"{lr:g}",
                                                              "--noise-alpha", f"{alpha:g}",
                                                              "--noise-init-variance", f"{var:g}"]
    return cells


def cells_of(groups):
    """{cell name: dict(group, row, flags, iters)} for the groups asked for, in run order."""
    out = {}
    if "optimizer" in groups:
        for opt, flags in (("adamw", ADAMW), ("sgd", SGD), ("rmsprop", ["--optimizer", "rmsprop", "--lr", "1e-6"])):
            for row in ("spin", "npo", "fixed") if opt == "adamw" else ("spin", "npo"):
                out[f"{opt}-{row}"] = dict(group="optimizer", row=row, flags=[*flags, *ROWS[row]], iters=[1],
                                           baseline=f"{opt}-spin", matched=f"{opt}-npo")
    if "saturation" in groups or "chain" in groups:
        iters = [1, 2, 3] if "chain" in groups else [1]
        for row in ("spin", "npo", "fixed", "dnpo"):
            out[f"sat-{row}"] = dict(group="saturation", row=row, flags=[*ADAMW, "--beta", "1.0", *ROWS[row]],
                                     iters=iters if row in ("spin", "npo") else [1], baseline="sat-spin",
                                     matched="sat-npo")
    if "mechanism" in groups:  # a large fixed σ under AdamW and under SGD: does a normalising optimizer undo it?
        for opt, flags in (("adamw", ADAMW), ("sgd", SGD)):
            out[f"{opt}-fixed-s{MECHANISM_SIGMA:g}"] = dict(group="mechanism", row="fixed", flags=[*flags, *ROWS["fixed"]],
                                                          iters=[1], baseline=f"{opt}-spin", sigma=MECHANISM_SIGMA)
    if "clipping" in groups:  # SGD with no clipping: a common factor on the weights reaches the update
        for suffix, row, extra in (("spin", "spin", []), ("npo", "npo", []),
                                   (f"fixed-s{MECHANISM_SIGMA:g}", "fixed", []),
                                   (f"npo-nlr{SGD_NOISE_LR:g}", "npo", ["--noise-lr", f"{SGD_NOISE_LR:g}"])):
            out[f"sgd-noclip-{suffix}"] = dict(group="clipping", row=row, flags=[*NOCLIP, *ROWS[row], *extra],
                                               iters=[1], baseline="sgd-noclip-spin",
                                               **(dict(sigma=MECHANISM_SIGMA) if row == "fixed" else {}))
    if "grid" in groups:
        for name, flags in grid_cells().items():
            out[name] = dict(group="grid", row="npo", flags=flags, iters=[1], baseline="adamw-spin", probe=True)
    return out


def parse_args(argv=None):
    own, train_flags = study.split_argv(argv)
    p = config.Parser(prog="noise_study.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/noise_study", help="OUT: start/ and one run directory per cell")
    p.add_argument("--groups", default=",".join(GROUPS), help="comma-separated of " + ", ".join(GROUPS)
                   + " (run in that order within each iteration)")
    p.add_argument("--eval-max-prompts", type=config.POSITIVE_INT, default=400, help="held-out prompts per evaluation")
    p.add_argument("--eval-batch-size", type=config.POSITIVE_INT, default=32,
                   help="prompts per evaluation generation batch")
    p.add_argument("--dry-run", action="store_true", help="print the plan (# done: finished) and exit")
    opts = p.parse_args(own)
    opts.train_flags = train_flags or ["--max-prompts", "64", "--epochs", "3", "--max-new-tokens", "32", *ADAMW]
    opts.groups = opts.groups.split(",")
    unknown = [g for g in opts.groups if g not in GROUPS]
    if unknown:
        raise SystemExit(f"noise_study.py: unknown group {unknown[0]!r}")
    if {"grid", "mechanism"} & set(opts.groups) and "optimizer" not in opts.groups:
        opts.groups.insert(0, "optimizer")  # their baselines: adamw-spin, sgd-spin
    owned = [f for f in opts.train_flags if f.split("=")[0] in ("--run-dir", "--iter", "--start-model", "--noise",
                                                                 "--dsl", "--no-dsl", "--stop-after-steps")]
    if owned:
        raise SystemExit(f"noise_study.py: {owned[0]} is set per cell; remove it from the train flags")
    opts.cells = cells_of(opts.groups)
    check_flags(opts)
    return opts


def check_flags(opts):
    """train.py's checks on the start's and every cell's train command, eval.py's on the eval command, before
    anything is written (study.check_commands); a fixed cell whose σ is matched later is checked with σ 1."""
    out = Path(opts.out)
    argvs = [["--iter", "0", "--run-dir", str(out / "start"), *opts.train_flags]]
    for cell, spec in opts.cells.items():
        sigma = ["--noise-sigma", str(spec.get("sigma") or 1.0)] if spec["row"] == "fixed" else []
        argvs.append(["--iter", "1", "--run-dir", str(out / cell), *opts.train_flags, *spec["flags"], *sigma,
                      "--start-model", str(out / "start" / "iter0" / "model")])
    study.check_commands(argvs, [eval_cmd(opts, out / "start", skip_base=False)[2:]])


def run_dirs(opts):
    """Every run directory of the study: OUT/start and one per cell."""
    return [Path(opts.out) / "start"] + [Path(opts.out) / cell for cell in opts.cells]


# ----------------------------------------------------------------------------- reading a cell's files
def metrics(opts, cell, k=1):
    path = Path(opts.out) / cell / f"iter{k}" / "metrics.jsonl"
    return data.read_jsonl(path) if path.is_file() else []


def finished(opts, cell, k=1) -> bool:
    return (Path(opts.out) / cell / f"iter{k}" / "model" / "config.json").is_file()


def mean_of(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def matched_sigma(opts, cell):
    """σ of a fixed cell: sqrt of its npo cell's mean σ² over training (departure 2), 4 significant digits."""
    rows = metrics(opts, opts.cells[cell]["matched"]) if finished(opts, opts.cells[cell]["matched"]) else []
    return float(f"{math.sqrt(mean_of(rows, 'sigma2')):.4g}") if rows else None


def probe_shift(opts, cell):
    """A grid cell's mean weight shift over its first PROBE_STEPS steps (None before it has them)."""
    rows = [r for r in metrics(opts, cell) if r["step"] <= PROBE_STEPS]
    return mean_of(rows, "weight_shift") if len(rows) == PROBE_STEPS else None


def kept(opts):
    """The grid cells that finish: the KEEP with the largest probe weight shift ≥ MIN_SHIFT (None until every
    probe is done)."""
    shifts = {c: probe_shift(opts, c) for c, s in opts.cells.items() if s.get("probe")}
    if any(v is None for v in shifts.values()):
        return None
    ranked = sorted((c for c, v in shifts.items() if v >= MIN_SHIFT), key=lambda c: -shifts[c])
    return set(ranked[:KEEP])


# ----------------------------------------------------------------------------- the plan
def train_cmd(opts, cell, k, extra=()):
    spec = opts.cells[cell]
    cmd = [sys.executable, str(HERE / "train.py"), "--iter", str(k), "--run-dir", str(Path(opts.out) / cell),
           *opts.train_flags, *spec["flags"], *extra]
    if k == 1:
        cmd += ["--start-model", str(Path(opts.out) / "start" / "iter0" / "model")]
    if spec["row"] == "fixed":
        cmd += ["--noise-sigma", str(spec.get("sigma") or matched_sigma(opts, cell))]
    return cmd


def eval_cmd(opts, run, skip_base=True):
    return [sys.executable, str(HERE / "eval.py"), "score", str(run), "--max-prompts", str(opts.eval_max_prompts),
            "--batch-size", str(opts.eval_batch_size), *(["--skip", "base"] if skip_base else [])]


def scored(run, names) -> bool:
    return study.has_keys(Path(run) / "eval" / "scores.json", "models", names)


def plan(opts):
    """Every step in run order (study.py): dict(label, cmd (a callable: built when run), done, when (run it only
    if true), prepare (iteration 1's generation copied from the first cell: `seeded`), ok_rc (exit codes that are
    not failures))."""
    out, start = Path(opts.out), Path(opts.out) / "start"
    steps = [dict(label="train start iter0 (SPIN)", done=lambda: finished(opts, "start", 0),
                  cmd=lambda: [sys.executable, str(HERE / "train.py"), "--iter", "0", "--run-dir", str(start),
                               *opts.train_flags]),
             dict(label="eval start (base, iter0)", done=lambda: scored(start, ["base", "iter0"]),
                  cmd=lambda: eval_cmd(opts, start, skip_base=False))]
    first = next(iter(opts.cells))
    probes = [c for c, spec in opts.cells.items() if spec.get("probe")]
    for cell in probes:  # every probe before any grid cell finishes: kept() needs them all
        steps.append(dict(label=f"probe {cell} ({PROBE_STEPS} steps)", ok_rc=(0, 1), prepare=seeded(opts, first, cell),
                          done=lambda c=cell: probe_shift(opts, c) is not None or finished(opts, c),
                          cmd=lambda c=cell: train_cmd(opts, c, 1, ["--stop-after-steps", str(PROBE_STEPS)])))
    at = len(steps) - len(probes)  # iteration 1 of the other cells goes before the probes
    for k in (1, 2, 3):
        for cell, spec in opts.cells.items():
            if k not in spec["iters"]:
                continue
            when = (lambda c=cell: c in (kept(opts) or ())) if spec.get("probe") else None
            pair = [dict(label=f"train {cell} iter{k}", done=lambda c=cell, k=k: finished(opts, c, k), when=when,
                         cmd=lambda c=cell, k=k: train_cmd(opts, c, k),
                         prepare=seeded(opts, first, cell) if k == 1 and cell != first else None),
                    dict(label=f"eval {cell} (to iter{k})", when=when,
                         done=lambda c=cell, k=k: scored(out / c, [f"iter{j}" for j in range(1, k + 1)]),
                         cmd=lambda c=cell: eval_cmd(opts, out / c))]
            if k == 1 and not spec.get("probe"):
                steps[at:at] = pair
                at += 2
            else:
                steps += pair
    return steps


def seed_generation(opts, source, cell):
    """Copy iteration 1's generated and judged answers (and their stage records) from `source` to `cell`: the
    same start model and generation flags give the same answers, so each cell need not regenerate them."""
    src, dst = Path(opts.out) / source / "iter1", Path(opts.out) / cell / "iter1"
    records = data.read_json(src / "stages.json") if (src / "stages.json").is_file() else {}
    if dst.exists() or not records.get("judge", {}).get("output"):
        return False
    dst.mkdir(parents=True)
    for name in ("generated.jsonl", "judged.jsonl"):
        shutil.copyfile(src / name, dst / name)
    data.write_json(dst / "stages.json", {s: records[s] for s in ("generate", "judge")})
    return True


def seeded(opts, source, cell):
    """A step's `prepare` (study.py): `cell`'s iteration 1 generation copied from `source`, under the cell's lock."""
    return Path(opts.out) / cell, lambda: seed_generation(opts, source, cell)


def check_settings(opts, write):
    """OUT/study_config.json: the settings every cell under OUT used; refuse others (one line)."""
    study.keep_settings(Path(opts.out) / "study_config.json",
                        dict(train_flags=opts.train_flags, eval_max_prompts=opts.eval_max_prompts), write)


def execute(opts, steps):
    """Run the steps not done yet (study.execute); seconds to OUT/study_times.json, the tables after every eval."""
    return study.execute(opts, steps, "noise_study.py", "study_times.json", report=report)


# ----------------------------------------------------------------------------- the tables
def judged_file(opts, cell, k):
    return Path(opts.out) / cell / "eval" / f"iter{k}_judged.jsonl"


def differ(path_a, path_b):
    """Fraction of the prompts both files answer whose generated answers differ."""
    a = {r["id"]: r["generated"] for r in data.read_jsonl(path_a)}
    b = {r["id"]: r["generated"] for r in data.read_jsonl(path_b)}
    common = [i for i in a if i in b]
    return sum(a[i] != b[i] for i in common) / len(common) if common else None


def cell_result(opts, cell, k=1):
    spec, run = opts.cells[cell], Path(opts.out) / cell
    rows = metrics(opts, cell, k)
    last = [r for r in rows if r["epoch"] == max(r["epoch"] for r in rows)] if rows else []
    res = dict(cell=cell, group=spec["group"], row=spec["row"], k=k, flags=spec["flags"], steps=len(rows),
               finished=finished(opts, cell, k), end={key: mean_of(last, key) for key in END_KEYS})
    if spec.get("probe"):
        res["probe_weight_shift"] = probe_shift(opts, cell)
    if spec["row"] == "fixed":
        res["noise_sigma"] = spec.get("sigma") or matched_sigma(opts, cell)
    mine = judged_file(opts, cell, k)
    if mine.is_file():
        res["accuracy"] = ev.score_row(data.read_jsonl(mine))["accuracy"]
        base = Path(opts.out) / "start" / "eval" / "base_judged.jsonl"
        if base.is_file():
            res["vs_base"] = ev.accuracy_vs(mine, base)
        spin = judged_file(opts, spec["baseline"], k)
        if cell != spec["baseline"] and spin.is_file():
            res["vs_spin"], res["differ_from_spin"] = ev.accuracy_vs(mine, spin), differ(mine, spin)
        prev = judged_file(opts, cell, k - 1) if k > 1 else Path(opts.out) / "start" / "eval" / "iter0_judged.jsonl"
        if prev.is_file():
            res["changed_from_previous"] = differ(mine, prev)
    logps = run / f"iter{k}" / "logps.jsonl"
    if logps.is_file():  # the human answer's log-prob at the start and end of the iteration (Fig. 2/10 analogue)
        human = {}
        for r in data.read_jsonl(logps):
            side = "chosen" if r["chosen_source"] == "human" else "rejected"
            other = "rejected" if side == "chosen" else "chosen"
            human.setdefault(r["id"], {})[r["stage"]] = (r[f"{side}_logp"], r[f"{other}_logp"])
        both = [v for v in human.values() if {"start", "end"} <= set(v)]
        if both:
            res["mean_abs_dlogp_human"] = float(np.mean([abs(v["end"][0] - v["start"][0]) for v in both]))
            res["human_minus_generated_end"] = float(np.mean([v["end"][0] - v["end"][1] for v in both]))
    return res


def fmt(x, spec="{:.3f}"):
    return "–" if x is None else spec.format(x)


def fmt_vs(v):
    return "–" if not v else f"{v['diff']:+.3f} [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]"


def collect(opts):
    start = Path(opts.out) / "start" / "eval" / "scores.json"
    scores = data.read_json(start)["models"] if start.is_file() else {}
    out = dict(base=None, start=scores.get("iter0", {}).get("accuracy"),
               cells=[cell_result(opts, c) for c in opts.cells],
               chain=[cell_result(opts, c, k) for c, s in opts.cells.items() if len(s["iters"]) > 1 for k in s["iters"]])
    base_file = Path(opts.out) / "start" / "eval" / "base_judged.jsonl"
    if base_file.is_file():
        rows = data.read_jsonl(base_file)
        n, out["base"] = sum(r.get("answer") is not None for r in rows), ev.score_row(rows)["accuracy"]
        out["base_ci"] = ev.wilson_interval(round(out["base"] * n), n)
    return out


def markdown(result):
    lines = [f"Base model {fmt(result['base'])} (95 % CI {fmt(result.get('base_ci'), '[{0[0]:.3f}, {0[1]:.3f}]')}); "
             f"SPIN iteration 0 (every cell's start) {fmt(result['start'])}.", "",
             "| cell | steps | acc | Δ vs base [95 %] | Δ vs SPIN [95 %] | differ from SPIN | end margin m / m̃ | "
             "m − m̃ (± std) | weight ratio | weight shift | KL | σ² all / target / top-10 | model loss | reward acc |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["cells"]:
        e = c["end"]
        name = c["cell"] + (f" (σ {c['noise_sigma']:.3g})" if c.get("noise_sigma") else "")
        if c.get("probe_weight_shift") is not None and not c["finished"]:
            name += f" — pruned (probe shift {c['probe_weight_shift']:.3f})"
        lines.append("| " + " | ".join([
            name, str(c["steps"]), fmt(c.get("accuracy")), fmt_vs(c.get("vs_base")), fmt_vs(c.get("vs_spin")),
            fmt(c.get("differ_from_spin"), "{:.1%}"), f"{fmt(e['margin'])} / {fmt(e['noisy_margin'])}",
            f"{fmt(e['margin_offset'])} (± {fmt(e['margin_offset_std'])})", fmt(e["dpo_weight_ratio"]),
            fmt(e["weight_shift"]), fmt(e["kl_noise"], "{:.2g}"),
            f"{fmt(e['sigma2'], '{:.3g}')} / {fmt(e['sigma2_target'], '{:.3g}')} / {fmt(e['sigma2_topk'], '{:.3g}')}",
            fmt(e["model_loss"]), fmt(e["reward_acc"], "{:.2f}")]) + " |")
    if result["chain"]:
        lines += ["", "| run | iter | acc | Δ vs SPIN [95 %] | answers changed from previous iter | mean abs Δ log π(human) "
                  "| human − generated log-prob (end) | end margin | model loss |", "|---|---|---|---|---|---|---|---|---|"]
        for c in result["chain"]:
            lines.append("| " + " | ".join([c["cell"], str(c["k"]), fmt(c.get("accuracy")), fmt_vs(c.get("vs_spin")),
                                            fmt(c.get("changed_from_previous"), "{:.1%}"),
                                            fmt(c.get("mean_abs_dlogp_human"), "{:.2f}"),
                                            fmt(c.get("human_minus_generated_end"), "{:.2f}"),
                                            fmt(c["end"]["margin"]), fmt(c["end"]["model_loss"])]) + " |")
    return "\n".join(lines) + "\n"


def report(opts):
    with study.row_locks(run_dirs(opts), "noise_study.py"):  # plots go into the cells' run directories: none another's
        result = collect(opts)
        data.write_json(Path(opts.out) / "noise_study.json", result)
        with data.atomic_open(Path(opts.out) / "noise_study.md") as fh:
            fh.write(markdown(result))
        for cell in opts.cells:
            if (Path(opts.out) / cell).is_dir():
                plots.plot_noise(Path(opts.out) / cell, Path(opts.out) / cell / "plots")
    return result


def main(argv=None):
    """`python noise_study.py ...`: the steps (--dry-run) or the tables' numbers; Ctrl-C or a refusal of any module
    ends the process in one line naming noise_study.py (study.exit_line), the one exit point of this command."""
    try:
        opts = parse_args(argv)
        return study.run_study("noise_study.py", opts, plan(opts), check_settings, execute, report,
                               table="noise_study.md", run_dirs=run_dirs(opts))
    except (KeyboardInterrupt, ValueError, OSError) as e:
        raise SystemExit(study.exit_line("noise_study.py", e)) from None


if __name__ == "__main__":
    main()
