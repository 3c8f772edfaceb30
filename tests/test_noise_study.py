"""Tests of noise_study.py's plan and tables on synthetic run directories (no model is trained here): the pruning
of the grid by its probes, the order of the plan, the shared generation, and the table's numbers by hand."""
import json
import pathlib
import shutil

import pytest

import data
import demo
import noise_study as ns


def opts_for(tmp_path, *groups):
    return ns.parse_args(["--out", str(tmp_path), "--groups", ",".join(groups)])


def write_metrics(opts, cell, rows, k=1):
    out = pathlib.Path(opts.out)
    data.write_jsonl(out / cell / f"iter{k}" / "metrics.jsonl", rows)
    return out


def row(step, **values):
    base = dict(step=step, epoch=(step - 1) // 8, margin=0.3, noisy_margin=0.1, sigma2=0.04)
    base.update({key: 0.0 for key in ns.END_KEYS if key not in base})
    return {**base, **values}


def test_plan_runs_every_probe_before_any_grid_cell_finishes(tmp_path):
    opts = opts_for(tmp_path, "optimizer", "grid")
    labels = [s["label"] for s in ns.plan(opts)]
    probes = [i for i, label in enumerate(labels) if label.startswith("probe")]
    grid_full = [i for i, label in enumerate(labels) if label.startswith("train grid")]
    assert len(probes) == len(ns.grid_cells()) == len(grid_full) == 12
    assert max(probes) < min(grid_full) and labels[0].startswith("train start")
    assert labels.index("train adamw-spin iter1") < min(probes)


def test_grid_keeps_the_largest_weight_shifts(tmp_path):
    """kept() waits for every probe, then keeps the KEEP cells of largest probe shift at least MIN_SHIFT."""
    opts = opts_for(tmp_path, "grid")
    cells = list(ns.grid_cells())
    shifts = dict(zip(cells, [0.001, 0.05, 0.03, 0.2, 0.019, 0.025] + [0.0] * 6))
    for cell in cells[:-1]:
        write_metrics(opts, cell, [row(s, weight_shift=shifts[cell]) for s in range(1, ns.PROBE_STEPS + 1)])
    assert ns.kept(opts) is None  # one probe is missing
    write_metrics(opts, cells[-1], [row(s, weight_shift=0.0) for s in range(1, ns.PROBE_STEPS + 1)])
    assert ns.kept(opts) == {cells[3], cells[1], cells[2]}


def test_fixed_cells_get_the_matched_or_their_own_sigma(tmp_path):
    opts = opts_for(tmp_path, "optimizer", "mechanism")
    out = write_metrics(opts, "adamw-npo", [row(1, sigma2=0.01), row(2, sigma2=0.03)])
    (out / "adamw-npo" / "iter1" / "model").mkdir()
    (out / "adamw-npo" / "iter1" / "model" / "config.json").write_text("{}")
    cmd = ns.train_cmd(opts, "adamw-fixed", 1)
    assert cmd[cmd.index("--noise-sigma") + 1] == str(float(f"{0.02 ** 0.5:.4g}"))  # sqrt of the mean σ²
    cmd = ns.train_cmd(opts, "sgd-fixed-s3", 1)
    assert cmd[cmd.index("--noise-sigma") + 1] == "3.0" and "sgd" in cmd and "--start-model" in cmd


def test_clipping_cells_train_sgd_unclipped_against_their_own_spin(tmp_path):
    """The clipping group alone: its four cells, SGD with --max-grad-norm 0, compared with sgd-noclip-spin."""
    opts = opts_for(tmp_path, "clipping")
    assert list(opts.cells) == ["sgd-noclip-spin", "sgd-noclip-npo", "sgd-noclip-fixed-s3", "sgd-noclip-npo-nlr10"]
    assert {spec["baseline"] for spec in opts.cells.values()} == {"sgd-noclip-spin"}
    last = lambda cmd, name: cmd[len(cmd) - 1 - cmd[::-1].index(name) + 1]  # the value argparse keeps
    for cell in opts.cells:
        cmd = ns.train_cmd(opts, cell, 1)
        assert last(cmd, "--optimizer") == "sgd" and last(cmd, "--max-grad-norm") == "0"
    cmd = ns.train_cmd(opts, "sgd-noclip-fixed-s3", 1)
    assert cmd[cmd.index("--noise") + 1] == "fixed" and cmd[cmd.index("--noise-sigma") + 1] == "3.0"
    cmd = ns.train_cmd(opts, "sgd-noclip-npo-nlr10", 1)
    assert last(cmd, "--noise") == "trainable" and last(cmd, "--noise-lr") == "10"
    labels = [s["label"] for s in ns.plan(opts)]
    assert labels[:3] == ["train start iter0 (SPIN)", "eval start (base, iter0)", "train sgd-noclip-spin iter1"]
    assert not any("adamw" in label for label in labels)  # it needs no other group's baseline


def test_seed_generation_copies_answers_and_their_records(tmp_path):
    opts = opts_for(tmp_path, "optimizer")
    src = tmp_path / "adamw-spin" / "iter1"
    src.mkdir(parents=True)
    for name in ("generated.jsonl", "judged.jsonl"):
        (src / name).write_text('{"id": "a"}\n')
    records = {"generate": {"flags": {}, "output": {"generated.jsonl": "x"}}, "judge": {"flags": {}, "output": {}}}
    data.write_json(src / "stages.json", records)
    assert not ns.seed_generation(opts, "adamw-spin", "adamw-npo")  # the judge stage has not finished
    records["judge"]["output"] = {"judged.jsonl": "y"}
    data.write_json(src / "stages.json", {**records, "label": {}})
    assert ns.seed_generation(opts, "adamw-spin", "adamw-npo")
    dst = tmp_path / "adamw-npo" / "iter1"
    assert (dst / "judged.jsonl").read_text() == '{"id": "a"}\n'
    assert set(json.loads((dst / "stages.json").read_text())) == {"generate", "judge"}
    assert not ns.seed_generation(opts, "adamw-spin", "adamw-npo")  # never over a cell's own files


def judged(path, records, right):
    data.write_jsonl(path, [dict(r, generated=str(r["answer"]) if ok else "zzz", generated_score=5.0, human="h",
                                 human_score=7.0) for r, ok in zip(records, right)])


def test_cell_table_by_hand(tmp_path):
    """Accuracy, paired Δ vs SPIN, the share of answers that differ and the end-of-training diagnostics."""
    opts = opts_for(tmp_path, "optimizer")
    records = data.load_prompts("demo", "eval", max_prompts=4)
    assert all(demo.check_answer(str(r["answer"]), r["answer"], r["prompt"]) for r in records)
    judged(tmp_path / "start" / "eval" / "base_judged.jsonl", records, [1, 0, 0, 0])
    judged(tmp_path / "adamw-spin" / "eval" / "iter1_judged.jsonl", records, [1, 1, 0, 0])
    judged(tmp_path / "adamw-npo" / "eval" / "iter1_judged.jsonl", records, [1, 1, 1, 0])
    write_metrics(opts, "adamw-npo", [row(s, margin_offset=0.1 * s, weight_shift=0.02) for s in range(1, 17)])
    res = ns.cell_result(opts, "adamw-npo")
    assert res["accuracy"] == 0.75 and res["vs_spin"]["diff"] == 0.25 and res["differ_from_spin"] == 0.25
    assert res["vs_base"]["diff"] == 0.5 and res["steps"] == 16
    assert res["end"]["margin_offset"] == pytest.approx(0.1 * sum(range(9, 17)) / 8)  # the last epoch's mean
    md = ns.markdown(ns.collect(opts))
    assert "| adamw-npo | 16 | 0.750 | +0.500" in md and "25.0%" in md and md.startswith("Base model 0.250")


def test_run_directory_held_by_another_process_is_never_written(tmp_path):
    """train.py holding OUT/start (or a cell): noise_study.py stops in one line naming it, writing nothing."""
    from test_ablate import hold_elsewhere
    out = tmp_path / "ns"
    for held in (out / "start", out / "sgd-noclip-npo"):
        child = hold_elsewhere(held)
        try:
            with pytest.raises(SystemExit, match=rf"^noise_study.py: {held} is in use by pid {child.pid} on "):
                ns.main(["--out", str(out), "--groups", "clipping"])
            assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [held.name, f"{held.name}/.lock"]
            with pytest.raises(ValueError, match="in use by"):
                ns.report(opts_for(out, "clipping"))
            assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [held.name, f"{held.name}/.lock"]
        finally:
            child.stdin.close()
            child.wait()
        shutil.rmtree(out)
