"""Presenting DNPO run directories: figures (matplotlib, Agg; PNGs in RUN_DIR/plots/), Markdown tables
and RUN_DIR/report.md. The computations behind the numbers live in eval.py; this file only renders them.

    losses.png           model loss and noise loss per optimizer step, one panel per iteration (Fig. 9)
    margins.png          clean and noisy margin and reward accuracy over all steps of all iterations
    logps.png            histograms of the policy's summed log-probs of the training pairs' chosen and
                         rejected answers, per iteration, at the start and end of training
    logps_per_token.png  the same divided by the answer's token count (removes the length effect)
    stagnation.png       Fig. 2 / Fig. 10: per run (rows) and iteration (columns), log-probs under iter{k}/model
                         of the human answers and of that model's own fresh answers, and the margin
                         (mean human − mean generated) per iteration for every run in one panel
    scores.png           held-out mean score (and accuracy) per iteration for one or more runs (Fig. 6)
    noise.png            per iteration with noise (columns), per step: the Fig. 9 losses with each epoch's
                         within-epoch slope; clean vs noisy margin with the offset's spread; the DPO weights
                         σ(−m), σ(−m̃) and the weight shift; σ² on target, top-k and all entries with the KL
                         of the noisy reference (noise.py departure 9, loss.py departure 6)

Inputs (written by train.py / `eval.py score` / `eval.py logps`): iter{k}/metrics.jsonl, iter{k}/logps.jsonl,
eval/scores.json, eval/logps_iter{k}.jsonl (and, for report.md, eval/similarity.json and the lm-evaluation-harness
scores in eval/benchmarks.json from `eval.py benchmarks RUN_DIR`). Used by `python eval.py plots RUN_DIR [RUN_DIR ...]`, `python
eval.py report RUN_DIR` (write_report) and ablate.py. report.md embeds only the figures write_report has just
made from the current data (whole PNGs); a figure whose data is gone (eval/ deleted, ...) is deleted, not shown.

Where this departs from, or fills a gap in, the paper:
1. Fig. 2 / 10's "generated data" is the updated model's own answers (stagnation.png, from `eval.py
   logps`). logps.png's dashed "start model's answers" is the generated side of each training pair
   (the rejected answer when the human one was chosen, else the chosen one): answers of the iteration's
   start model, not of the model being trained, so at "end" it is not the paper's generated data.
   The paper does not say which examples its histograms use (see stagnation.py).
2. The paper's histograms are of summed sequence log-probs; the per-token versions are an addition.
3. Fig. 9 plots the recorded noise loss (−ℓ(m̃(sg θ, φ, ε₂)), a negative number) as is; its mirror
   image of the model loss is the point of the figure.
"""
import json
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from data import atomic_open, iterations, read_json, read_jsonl  # noqa: E402
from judge import dsl_flip_rate  # noqa: E402
from stagnation import read_summaries  # noqa: E402

COLORS = {"chosen": "tab:blue", "rejected": "tab:red", "generated": "black"}


def _values(rows, key):
    """Column `key` of metric rows as floats; None/missing become NaN."""
    return np.array([np.nan if r.get(key) is None else float(r[key]) for r in rows], dtype=float)


def _save(fig, path: Path) -> Path:
    """Save a figure atomically (a unique temporary file in the same directory, then os.replace) and close it."""
    try:
        with atomic_open(path, binary=True) as fh:  # a unique temporary file beside path, then os.replace
            fig.savefig(fh, format=path.suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _grid(n, ncols=3, w=5.0, h=3.6):
    ncols = max(1, min(n, ncols))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False, layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def plot_losses(run_dir, out_dir) -> Path | None:
    """Fig. 9: model loss and noise loss vs step, one panel per iteration; epoch boundaries dotted."""
    run_dir = Path(run_dir)
    runs = [(k, read_jsonl(run_dir / f"iter{k}" / "metrics.jsonl")) for k in iterations(run_dir)
            if (run_dir / f"iter{k}" / "metrics.jsonl").is_file()]
    runs = [(k, rows) for k, rows in runs if rows]
    if not runs:
        return None
    fig, axes = _grid(len(runs))
    for ax, (k, rows) in zip(axes, runs):
        steps = _values(rows, "step")
        ax.plot(steps, _values(rows, "model_loss"), color="tab:blue", label="model loss (Eq. 9, term 1)")
        noise = _values(rows, "noise_loss")
        if np.any(np.nan_to_num(noise) != 0):
            ax.plot(steps, noise, color="tab:orange", label="noise loss (Eq. 9, term 2)")
            ax.plot(steps, _values(rows, "loss"), color="0.6", lw=0.8, label="total loss")
        epochs = _values(rows, "epoch")
        for i in np.flatnonzero(np.diff(epochs) != 0):
            ax.axvline((steps[i] + steps[i + 1]) / 2, color="0.5", ls=":", lw=1)
        ax.set_title(f"iteration {k}: losses per step" + ("" if np.any(np.nan_to_num(noise) != 0) else " (no noise term)"))
        ax.set_xlabel("optimizer step (dotted: new epoch)")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, Path(out_dir) / "losses.png")


def epoch_slopes(rows, key):
    """Least-squares slope per step of `key` within each epoch ({epoch: slope}; epochs of < 3 steps skipped):
    Fig. 9's claim is model loss rising and noise loss falling within an epoch."""
    out = {}
    epochs, steps, values = _values(rows, "epoch"), _values(rows, "step"), _values(rows, key)
    for e in np.unique(epochs[~np.isnan(epochs)]):
        sel = (epochs == e) & ~np.isnan(values)
        if sel.sum() >= 3:
            out[int(e)] = float(np.polyfit(steps[sel], values[sel], 1)[0])
    return out


def plot_noise(run_dir, out_dir) -> Path | None:
    """noise.png (module docstring): the noise diagnostics per step, one column per iteration with noise."""
    run_dir = Path(run_dir)
    runs = [(k, read_jsonl(run_dir / f"iter{k}" / "metrics.jsonl")) for k in iterations(run_dir)
            if (run_dir / f"iter{k}" / "metrics.jsonl").is_file()]
    runs = [(k, rows) for k, rows in runs if rows and "kl_noise" in rows[0] and np.nansum(_values(rows, "sigma2")) > 0]
    if not runs:
        return None
    fig, axes = plt.subplots(4, len(runs), figsize=(5.5 * len(runs), 12), squeeze=False, layout="constrained")
    for col, (k, rows) in enumerate(runs):
        x, ax = _values(rows, "step"), axes[:, col]
        epochs = _values(rows, "epoch")
        for a in ax:
            for i in np.flatnonzero(np.diff(epochs) != 0):
                a.axvline((x[i] + x[i + 1]) / 2, color="0.5", ls=":", lw=1)
            a.grid(alpha=0.3)
        slopes = {key: epoch_slopes(rows, key) for key in ("model_loss", "noise_loss")}
        fmt_slopes = lambda d: ", ".join(f"{v:+.3f}" for v in d.values()) or "–"  # noqa: E731
        ax[0].plot(x, _values(rows, "model_loss"), color="tab:blue", label="model loss (Eq. 9, term 1); "
                   f"slope/step per epoch {fmt_slopes(slopes['model_loss'])}")
        ax[0].plot(x, _values(rows, "noise_loss"), color="tab:orange", label="noise loss (term 2); "
                   f"slope {fmt_slopes(slopes['noise_loss'])}")
        ax[0].set_title(f"iteration {k}: Fig. 9 losses (dotted: new epoch)")
        margin, noisy = _values(rows, "margin"), _values(rows, "noisy_margin")
        spread = _values(rows, "margin_offset_std")
        ax[1].plot(x, margin, color="tab:blue", label="clean margin m")
        ax[1].plot(x, noisy, color="tab:orange", label="noisy margin m̃ (ε₁)")
        ax[1].fill_between(x, noisy - spread, noisy + spread, color="tab:orange", alpha=0.2,
                           label="± std of m − m̃ over the step's pairs")
        ax[1].set_title("margins")
        ax[2].plot(x, _values(rows, "dpo_weight"), color="tab:blue", label="mean DPO weight σ(−m)")
        ax[2].plot(x, _values(rows, "dpo_weight_noisy"), color="tab:orange", label="mean σ(−m̃)")
        ax[2].plot(x, _values(rows, "weight_shift"), color="tab:green",
                   label="weight shift ½Σ|share(w̃) − share(w)|")
        ax[2].set_ylim(0, 1)
        ax[2].set_title("per-pair DPO weights (what the noise changes in the update)")
        for key, color, label in (("sigma2", "black", "mean σ² over all V entries"),
                                  ("sigma2_topk", "tab:purple", "σ² on the top-10 reference entries"),
                                  ("sigma2_target", "tab:red", "σ² on the rejected answer's own tokens"),
                                  ("kl_noise", "tab:gray", "KL(p_ref ‖ p̃_ref) per rejected token")):
            values = _values(rows, key)
            if np.all(np.nan_to_num(values) > 0):
                ax[3].plot(x, values, color=color, label=label, ls="--" if key == "kl_noise" else "-")
        ax[3].set_yscale("log")
        ax[3].set_title("where the noise is (log scale)")
        ax[3].set_xlabel("optimizer step")
        for a in ax:
            a.legend(fontsize=7)
    return _save(fig, Path(out_dir) / "noise.png")


def plot_margins(run_dir, out_dir) -> Path | None:
    """Clean/noisy margin and reward accuracy over the concatenated steps of all iterations."""
    run_dir = Path(run_dir)
    segments, offset = [], 0  # (k, x, rows) per iteration, x continuing across iterations
    for k in iterations(run_dir):
        path = run_dir / f"iter{k}" / "metrics.jsonl"
        if path.is_file() and (rows := read_jsonl(path)):
            segments.append((k, np.arange(offset + 1, offset + len(rows) + 1), rows))
            offset += len(rows)
    if not segments:
        return None
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, layout="constrained")
    for k, x, rows in segments:
        margin, noisy = _values(rows, "margin"), _values(rows, "noisy_margin")
        ax1.plot(x, margin, color="tab:blue", label="margin m (clean reference)")
        if not np.allclose(np.nan_to_num(noisy), np.nan_to_num(margin)):
            ax1.plot(x, noisy, color="tab:orange", label="noisy margin m̃")
        ax2.plot(x, _values(rows, "reward_acc"), color="tab:green", label="reward accuracy")
        for ax in (ax1, ax2):
            ax.axvline(x[0] - 0.5, color="0.5", ls=":", lw=1)
            ax.text(x[0], 1.0, f" iter {k}", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        unique = dict(zip(*reversed(ax.get_legend_handles_labels())))  # one legend entry per label
        ax.legend(unique.values(), unique.keys(), fontsize=8, loc="lower right")
    ax1.set_title(f"{run_dir.name}: margins over training (dotted: new iteration)")
    ax1.set_ylabel("margin (β × log-ratio difference)")
    ax2.set_ylabel("fraction of pairs with m > 0")
    ax2.set_xlabel("optimizer step, all iterations")
    return _save(fig, Path(out_dir) / "margins.png")


def _logp_groups(rows, per_token):
    """{"chosen", "rejected", "generated"} -> array of (per-token) log-probs."""
    def value(row, side):
        logp = float(row[f"{side}_logp"])
        return logp / max(int(row[f"{side}_tokens"]), 1) if per_token else logp
    generated_side = {"human": "rejected", "generated": "chosen"}
    return {
        "chosen": np.array([value(r, "chosen") for r in rows]),
        "rejected": np.array([value(r, "rejected") for r in rows]),
        "generated": np.array([value(r, generated_side[r.get("chosen_source", "human")]) for r in rows]),
    }


def plot_logps(run_dir, out_dir, per_token=False) -> Path | None:
    """Fig. 2 / 10: per iteration (rows) and stage start/end (columns), histograms of log-probs."""
    run_dir = Path(run_dir)
    panels = []
    for k in iterations(run_dir):
        path = run_dir / f"iter{k}" / "logps.jsonl"
        if path.is_file():
            rows = read_jsonl(path)
            for stage in ("start", "end"):
                these = [r for r in rows if r.get("stage") == stage]
                if these:
                    panels.append((k, stage, _logp_groups(these, per_token)))
    if not panels:
        return None
    fig, axes = _grid(len(panels), ncols=2)
    everything = np.concatenate([g for _, _, groups in panels for g in groups.values()])
    bins = np.linspace(everything.min(), everything.max() + 1e-9, 31)
    unit = "mean log-prob per answer token" if per_token else "sequence log-prob (sum over answer tokens)"
    for ax, (k, stage, groups) in zip(axes, panels):
        for name in ("chosen", "rejected"):
            ax.hist(groups[name], bins=bins, alpha=0.45, color=COLORS[name], label=f"{name} (n={len(groups[name])})")
        ax.hist(groups["generated"], bins=bins, histtype="step", ls="--", lw=1.5, color=COLORS["generated"],
                label="start model's answers (pairs)")
        ax.set_title(f"iteration {k}, {stage} of training")
        ax.set_xlabel(unit)
        ax.set_ylabel("pairs")
        ax.legend(fontsize=8)
    fig.suptitle(f"{run_dir.name}: log-probs of the training pairs under the policy")
    return _save(fig, Path(out_dir) / ("logps_per_token.png" if per_token else "logps.png"))


def plot_stagnation(run_dirs, out_path, per_token=False) -> Path | None:
    """Fig. 2 / 10: per run (rows) and iteration (columns), histograms of the log-probs under iter{k}/model of
    the human answers and of the model's own fresh answers; bottom panel: margin per iteration per run."""
    series = [(Path(d).name, s) for d in run_dirs if (s := read_summaries(d, per_token))]
    if not series:
        return None
    ks = sorted({k for _, s in series for k in s})
    fig = plt.figure(figsize=(3.6 * max(len(ks), 2), 2.8 * (len(series) + 1.2)), layout="constrained")
    grid = fig.add_gridspec(len(series) + 1, len(ks), height_ratios=[1] * len(series) + [1.2])
    values = np.concatenate([v for _, s in series for x in s.values() for v in (x["human"], x["generated"])])
    bins = np.linspace(values.min(), values.max() + 1e-9, 31)
    unit = "mean log-prob per answer token" if per_token else "sequence log-prob"
    for i, (name, s) in enumerate(series):
        for j, k in enumerate(ks):
            if k not in s:
                continue
            ax = fig.add_subplot(grid[i, j])
            ax.hist(s[k]["human"], bins=bins, alpha=0.5, color=COLORS["chosen"], label="human answers")
            ax.hist(s[k]["generated"], bins=bins, histtype="step", lw=1.5, color=COLORS["generated"],
                    label=f"iter{k} model's own answers")
            ax.set_title(f"{name}, iter{k}/model (n={s[k]['n']})", fontsize=9)
            ax.set_xlabel(unit, fontsize=8)
            ax.legend(fontsize=7)
    ax = fig.add_subplot(grid[-1, :])
    for name, s in series:
        x, m = sorted(s), np.array([s[k]["margin"] for k in sorted(s)])
        ci = np.array([s[k]["margin_95"] or (s[k]["margin"], s[k]["margin"]) for k in x])  # (iterations, 2)
        ax.errorbar(x, m, yerr=[m - ci[:, 0], ci[:, 1] - m], marker="o", capsize=3, label=name)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xticks(ks, [f"iter{k}" for k in ks])
    ax.set_ylabel(f"margin: mean human − mean generated\n({unit}; 95% CI)", fontsize=8)
    ax.set_title("margin between the human answers and the model's own answers, per iteration")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, Path(out_path))


def read_scores(run_dir) -> dict | None:
    """RUN_DIR/eval/scores.json as written by `eval.py score`, or None when absent."""
    path = Path(run_dir) / "eval" / "scores.json"
    return read_json(path) if path.is_file() else None


def plot_scores(run_dirs, out_path) -> Path | None:
    """Fig. 6: held-out mean score (and accuracy when recorded) per model for one or more runs."""
    series = [(Path(d).name, s) for d in run_dirs if (s := read_scores(d))]
    if not series:
        return None
    names = []
    for _, s in series:
        names += [n for n in s["models"] if n not in names]
    order = sorted(names, key=model_order)
    has_acc = any(r.get("accuracy") is not None for _, s in series for r in s["models"].values())
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(11 if has_acc else 6, 4), squeeze=False, layout="constrained")
    for col, (key, label) in enumerate([("mean_score", "mean judge score"), ("accuracy", "accuracy")][: 1 + has_acc]):
        ax = axes[0][col]
        for run, s in series:
            xs = [i for i, n in enumerate(order) if n in s["models"] and s["models"][n].get(key) is not None]
            ax.plot(xs, [s["models"][order[i]][key] for i in xs], marker="o", label=f"{run} ({s['settings']['judge']})")
        human = series[0][1].get("human") or {}
        if human.get(key) is not None:
            ax.axhline(human[key], color="0.4", ls="--", lw=1, label="human answers (SFT data)")
        ax.set_xticks(range(len(order)), order)
        ax.set_xlabel("model (base: before training; iter k: after iteration k)")
        ax.set_ylabel(label)
        ax.set_title(f"held-out {label} per iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, Path(out_path))


def make_plots(run_dirs, out_dir=None) -> list[Path]:
    """Every figure for every run into RUN_DIR/plots/; the multi-run score and stagnation figures into out_dir
    (default: the first run's plots/). Returns the paths written."""
    written = []
    for run_dir in run_dirs:
        plots_dir = Path(run_dir) / "plots"
        written += [plot_losses(run_dir, plots_dir), plot_margins(run_dir, plots_dir), plot_noise(run_dir, plots_dir),
                    plot_logps(run_dir, plots_dir), plot_logps(run_dir, plots_dir, per_token=True)]
    first = Path(out_dir) if out_dir else Path(run_dirs[0]) / "plots"
    written += [plot_scores(run_dirs, first / "scores.png"), plot_stagnation(run_dirs, first / "stagnation.png"),
                plot_stagnation(run_dirs, first / "stagnation_per_token.png", per_token=True)]
    return [p for p in written if p is not None]


# ----------------------------------------------------------------------------- tables and report.md

def model_order(name):
    """Sort key for scores.json model names: base, iter0, iter1, ..., then anything else."""
    return -1 if name == "base" else int(name[4:]) if re.fullmatch(r"iter\d+", name) else 10**6


def fmt(x, digits=3):
    if isinstance(x, bool):
        return "yes" if x else "no"
    return "—" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows])


def score_table(scores, extra=None):
    """`eval.py score` table: model | n | mean score | accuracy, plus the human answers' reference row.
    extra: {model or "human": {"ci": (lo, hi), "vs base": d, "vs previous": d}} from eval.score_extras: the
    accuracy's 95 % Wilson interval and d = eval.accuracy_vs's dict (the paired accuracy difference with its
    paired-bootstrap 95 % interval), shown beside the accuracy and as two more columns."""
    models, extra = scores["models"], extra or {}

    def accuracy(name, m):
        ci = extra.get(name, {}).get("ci")
        return fmt(m["accuracy"]) if ci is None or m["accuracy"] is None else f"{m['accuracy']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"

    def delta(name, key):
        d = extra.get(name, {}).get(key)
        return "—" if d is None else f"{d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"
    header = ["model", "n", "mean score", "accuracy (demo)" + (" [95 % CI]" if extra else "")]
    rows = [[n, models[n]["n"], models[n]["mean_score"], accuracy(n, models[n])] for n in sorted(models, key=model_order)]
    if extra:
        header += ["Δ vs base [95 % CI]", "Δ vs previous [95 % CI]"]
        rows = [r + [delta(r[0], "vs base"), delta(r[0], "vs previous")] for r in rows]
    if scores.get("human"):
        h = scores["human"]
        rows.append(["human answers", h["n"], h["mean_score"], accuracy("human", h)] + ["—", "—"] * bool(extra))
    return markdown_table(header, rows)


def similarity_table(rows):
    """`eval.py similarity` table (App. F, Table 5)."""
    return markdown_table(["iter t", "generated by", "reference", "n", "BLEU", "ROUGE-L", "embedding cos"],
                          [[r["iter"], r["generated_by"], r["reference"], r["n"], r["bleu"], r["rougeL"], r["embedding"]] for r in rows])


def iteration_rows(run_dir, scores=None):
    """One dict per iteration: summary.json numbers, observed flip rate (judged.jsonl), held-out score."""
    run_dir, rows = Path(run_dir), []
    models = (scores or {}).get("models", {})
    for k in iterations(run_dir):
        it = run_dir / f"iter{k}"
        summary = read_json(it / "summary.json") if (it / "summary.json").is_file() else {}
        config = read_json(it / "config.json") if (it / "config.json").is_file() else {}
        judged = read_jsonl(it / "judged.jsonl") if (it / "judged.jsonl").is_file() else None
        pairs, flips = summary.get("pairs"), summary.get("dsl_flips")
        rows.append({
            "iter": k, "dsl": config.get("dsl"), "noise": config.get("noise"), "pairs": pairs, "dsl_flips": flips,
            "flip_rate_applied": flips / pairs if pairs and flips is not None else None,
            "generated_beats_human": dsl_flip_rate(judged) if judged else None,
            "ties": summary.get("ties"), "missing_scores": summary.get("missing_scores"),
            "final_margin": summary.get("final_margin"), "final_reward_acc": summary.get("final_reward_acc"),
            "wall_s": summary.get("wall_s"),
            "eval_mean_score": models.get(f"iter{k}", {}).get("mean_score"),
            "eval_accuracy": models.get(f"iter{k}", {}).get("accuracy"),
        })
    return rows


RUN_FIGURES = {"losses.png", "margins.png", "noise.png", "logps.png", "logps_per_token.png", "scores.png",
               "stagnation.png", "stagnation_per_token.png"}  # what make_plots([run_dir]) can write into plots/
PNG_SIGNATURE, PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"


def is_png(path) -> bool:
    """A whole PNG file: its signature first and its IEND chunk last (a truncated or foreign file is not)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            fh.seek(0, 2)
            if fh.tell() < 8 + len(PNG_END):
                return False
            fh.seek(-len(PNG_END), 2)
            return head == PNG_SIGNATURE and fh.read() == PNG_END
    except OSError:
        return False


def write_report(run_dir) -> Path:
    """RUN_DIR/report.md: flags, per-iteration table, DSL flip rates, scores, similarity, figures. The figures are
    remade from the current data first; only those made in this call (and whole PNGs) are embedded, and a
    figure of RUN_DIR/plots/ whose data no longer exists is deleted."""
    run_dir = Path(run_dir)
    ks = iterations(run_dir)
    if not ks:
        raise ValueError(f"{run_dir}: no iter*/ directory (is this a run directory?)")
    plots_dir = run_dir / "plots"
    made = {p.name for p in make_plots([run_dir])}  # cheap (a few seconds): every figure from the current data
    for name in RUN_FIGURES - made:  # a figure whose data is gone (eval/ deleted, ...) is stale: removed, not shown
        if (plots_dir / name).is_file():
            (plots_dir / name).unlink()
    scores = read_scores(run_dir)
    configs = {k: read_json(p) for k in ks if (p := run_dir / f"iter{k}" / "config.json").is_file()}
    out = [f"# DNPO run report: `{run_dir.name}`", "",
           f"Run directory `{run_dir.resolve()}`, iterations {', '.join(map(str, ks))}. "
           "Written by `python eval.py report`; numbers from each iteration's summary.json, judged.jsonl and eval/."]
    if configs:
        last = configs[max(configs)]
        changing = sorted({key for c in configs.values() for key in c if any(c.get(key) != o.get(key) for o in configs.values())})
        out += ["", "## Flags", "", f"From iter{max(configs)}/config.json"
                + ("; flags that change between iterations are listed after it." if changing else "."), "",
                markdown_table(["flag", "value"], [[key, json.dumps(last[key])] for key in sorted(last) if key not in changing])]
        if changing:
            out += ["", markdown_table(["flag"] + [f"iter{k}" for k in configs],
                                       [[key] + [json.dumps(c.get(key)) for c in configs.values()] for key in changing])]
    rows = iteration_rows(run_dir, scores)
    out += ["", "## Per iteration", "",
            "Training pairs, DSL flips applied (pairs whose generated answer was labelled chosen), the last "
            "step's margin and reward accuracy, and the held-out score of the model this iteration produced.", "",
            markdown_table(["iter", "DSL", "noise", "pairs", "DSL flips", "final margin", "final reward acc",
                            "wall s", "held-out mean score", "held-out accuracy"],
                           [[r["iter"], r["dsl"], r["noise"], r["pairs"], r["dsl_flips"], r["final_margin"],
                             r["final_reward_acc"], r["wall_s"], r["eval_mean_score"], r["eval_accuracy"]] for r in rows]),
            "", "## DSL flip rates", "",
            "Fraction of training prompts (with both scores and two different answers) on which the judge scored "
            "the model's answer above the human answer (observed, from judged.jsonl), and the fraction of pairs "
            "DSL actually flipped (applied, from summary.json; 0 when DSL is off, e.g. iteration 0); both counted "
            "by data.dsl_outcome.", "",
            markdown_table(["iter", "generated > human (observed)", "flipped (applied)", "ties", "missing scores"],
                           [[r["iter"], r["generated_beats_human"], r["flip_rate_applied"], r["ties"], r["missing_scores"]] for r in rows])]
    if scores:
        out += ["", "## Held-out scores (`eval.py score`)", "", f"Settings: `{json.dumps(scores['settings'])}`.", "", score_table(scores)]
    if (sim := run_dir / "eval" / "similarity.json").is_file():
        out += ["", "## Similarity to the previous chosen answers (`eval.py similarity`, App. F)", "", similarity_table(read_json(sim, kind=list))]
    if (bench := run_dir / "eval" / "benchmarks.json").is_file():
        models = read_json(bench)["models"]
        columns = [c for c in next(iter(models.values()), {}) if c not in ("model", "identity")
                   and any(m.get(c) is not None for m in models.values())]
        out += ["", "## lm-evaluation-harness (`eval.py benchmarks`)", "",
                "Table 1 columns where run (harness.py); `Demo first-line` / `Demo last-word`: exact match of the "
                "offline local task on the demo's held-out questions (`--local-task`), the whole answer line / its "
                "last word.", "",
                markdown_table(["model", "path"] + columns, [[name, models[name]["model"]] + [models[name].get(c) for c in columns]
                                                             for name in sorted(models, key=model_order)])]
    figures = [("losses.png", "Model loss and noise loss per step (Fig. 9)"), ("margins.png", "Margins and reward accuracy"),
               ("logps.png", "Sequence log-probs of the training pairs' chosen / rejected answers"),
               ("logps_per_token.png", "The same per answer token"),
               ("stagnation.png", "Human answers vs the model's own answers, per iteration (Fig. 2 / 10)"),
               ("scores.png", "Held-out score per iteration (Fig. 6)")]
    present = [(f, caption) for f, caption in figures if f in made and is_png(plots_dir / f)]
    if present:
        out += ["", "## Figures"]
        out += [line for f, caption in present for line in ("", f"### {caption}", "", f"![{caption}](plots/{f})")]
    path = run_dir / "report.md"
    with atomic_open(path) as fh:
        fh.write("\n".join(out) + "\n")
    return path
