"""The ablation table of ablate.py, from the files its runs left: held-out accuracy per row, seed and
iteration with 95% Wilson intervals, the paired accuracy difference against the base model and the paired
win − loss against SPIN (paired bootstrap, eval.py), the DNPO-vs-SPIN seed check, ablation.md /
ablation.json / ablation.png and the per-run figures (plots.py).

Where this departs from, or fills a gap in, the paper: see ablate.py's docstring (its items "held-out
accuracy instead of benchmarks" and "seed-to-seed spread" are computed here).
"""
import json
import shlex
from pathlib import Path

import numpy as np

import data
import eval as ev
import plots
from demo import check_answer

# ----------------------------------------------------------------------------- the layout of OUT (shared with ablate.py)
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
                    s = json.loads(summary.read_text())
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
    measured = json.loads(times_path.read_text()) if times_path.is_file() else {}
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
    result = collect(opts)
    out = Path(opts.out)
    figs = [run_dir(opts, r, opts.seeds[0]) for r in ("spin", "dnpo") if r in opts.rows]
    plots.make_plots(figs, out / "plots")  # Fig. 9 per run, Fig. 2 / 10 (stagnation.png) and scores for both
    figure(opts, result, out / "ablation.png")
    data.write_json(out / "ablation.json", result)
    with data.atomic_open(out / "ablation.md") as fh:
        fh.write(markdown(opts, result))
    return result
