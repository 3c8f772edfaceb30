"""Tests of ablate.py (the plan's start-model wiring, the table by hand, a tiny end-to-end run and its resume)
and of train.py --start-model, on the tiny random model of conftest.py."""
import json
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

import ablate
import eval as ev
import study
import train
from data import read_jsonl, write_jsonl


def tiny_train_flags(base_model):
    """One fast iteration on the tiny model: 6 demo prompts, 6 new tokens, 1 epoch of 3 steps."""
    return ["--base-model", base_model, "--max-prompts", "6", "--max-new-tokens", "6", "--max-length", "160",
            "--max-prompt-length", "96", "--batch-size", "2", "--epochs", "1", "--save-every", "1", "--lr", "1e-3",
            "--noise-lr", "1e-2", "--logp-examples", "2", "--gen-batch-size", "6"]


def flag(cmd, name):
    return cmd[cmd.index(name) + 1] if name in cmd else None


# ----------------------------------------------------------------------------- the plan
def test_dry_run_wires_start_models_and_writes_nothing(tmp_path, capsys):
    """Iteration 0 is trained once per seed (spin); row k starts from SPIN's k−1; base scored once; α-SPIN chains."""
    out = tmp_path / "abl"
    steps = ablate.main(["--out", str(out), "--iters", "2", "--seeds", "0", "1", "--rows", "dnpo,dsl,alpha_spin",
                         "--dry-run", "--", "--max-prompts", "8"])
    assert not out.exists()
    assert len(capsys.readouterr().out.strip().splitlines()) == len(steps)
    cmds = {s["label"]: s.get("cmd") for s in steps}
    labels = [s["label"] for s in steps]
    assert [label for label in labels if label.startswith("train") and label.endswith("iter0")] == \
        ["train spin-seed0 iter0", "train spin-seed1 iter0"]
    spin = cmds["train spin-seed1 iter2"]
    assert spin[spin.index("--run-dir"):] == ["--run-dir", str(out / "spin-seed1"), "--seed", "1", "--max-prompts", "8",
                                              "--no-dsl", "--noise", "none"]  # own chain: no --start-model
    for seed in (0, 1):
        for k in (1, 2):
            dnpo = cmds[f"train dnpo-seed{seed} iter{k}"]
            assert flag(dnpo, "--start-model") == str(out / f"spin-seed{seed}" / f"iter{k - 1}" / "model")
            assert "--no-dsl" not in dnpo and "--noise" not in dnpo and flag(dnpo, "--seed") == str(seed)
            assert labels.index(f"train spin-seed{seed} iter{k - 1}") < labels.index(f"train dnpo-seed{seed} iter{k}")
    assert "train dsl-seed1 iter1" not in cmds and flag(cmds["train dsl-seed0 iter2"], "--noise") == "none"
    assert f"link {out / 'alpha_spin-seed0' / 'iter0'}" in cmds
    assert flag(cmds["train alpha_spin-seed0 iter1"], "--start-model") == str(out / "spin-seed0" / "iter0" / "model")
    alpha2 = cmds["train alpha_spin-seed0 iter2"]
    assert flag(alpha2, "--start-model") is None and flag(alpha2, "--history") == "2"
    assert "--skip" not in cmds["eval score spin-seed0 (to iter2)"]
    assert cmds["eval score spin-seed1 (to iter2)"][-2:] == ["--skip", "base"]
    assert cmds["eval score alpha_spin-seed0 (to iter2)"][-3:] == ["--skip", "base", "iter0"]
    # each iteration is scored as soon as it is trained (an interrupted study has its table so far)
    assert labels[labels.index("train dnpo-seed1 iter1") + 1] == "eval score dnpo-seed1 (to iter1)"
    assert {label for label in labels if "logps" in label} == {f"eval logps {r}-seed{s}" for r in ("spin", "dnpo")
                                                                for s in (0, 1)}
    own = {s["label"]: s.get("cmd") for s in ablate.plan(ablate.parse_args(
        ["--out", str(out), "--iters", "2", "--rows", "dnpo", "--chain", "own"]))}
    assert flag(own["train dnpo-seed0 iter1"], "--start-model") == str(out / "spin-seed0" / "iter0" / "model")
    assert flag(own["train dnpo-seed0 iter2"], "--start-model") is None


@pytest.mark.parametrize("argv, message", [
    (["--rows", "spin,dpo"], "unknown row 'dpo'"),
    (["--iters", "0"], "--iters must be"),
    (["--", "--seed", "3"], "--seed is set by ablate.py"),
    (["--", "--no-dsl"], "--no-dsl is set by ablate.py"),
    (["--", "--run-dir=x"], "--run-dir=x is set by ablate.py"),
])
def test_bad_flags_are_one_line_errors(argv, message):
    with pytest.raises(SystemExit, match=message) as err:
        ablate.parse_args(argv)
    assert "\n" not in str(err.value)


def hold_elsewhere(directory):
    """Another process holding `directory` as train.py does (runlock.hold), until its stdin closes."""
    child = subprocess.Popen([sys.executable, "-c", "import runlock, sys; runlock.hold(sys.argv[1], 'train.py'); "
                              "print('held', flush=True); sys.stdin.read()", str(directory)],
                             cwd=pathlib.Path(ablate.__file__).parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline() == "held\n"
    return child


def test_run_directory_held_by_another_process_is_never_written(tmp_path):
    """train.py holding OUT/spin-seed0: ablate.py stops in one line naming the holder before it writes anything
    (no config, table, figure or plots in the held directory); its report refuses too; once released, it may."""
    out = tmp_path / "abl"
    held = out / "spin-seed0"
    child = hold_elsewhere(held)
    argv = ["--out", str(out), "--iters", "1", "--seeds", "0", "--rows", "spin,dnpo", "--", "--max-prompts", "2"]
    try:
        with pytest.raises(SystemExit, match=rf"^ablate.py: {held} is in use by pid {child.pid} on .*ablate.py writes "
                                             rf"into its run directories") as err:
            ablate.main(argv)
        assert "\n" not in str(err.value)
        assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["spin-seed0", "spin-seed0/.lock"]
        with pytest.raises(ValueError, match=f"{held} is in use by pid {child.pid}"):
            ablate.report(ablate.parse_args(argv))
        assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["spin-seed0", "spin-seed0/.lock"]
    finally:
        child.stdin.close()
        child.wait()
    with study.row_locks([held, out / "dnpo-seed0"], "ablate.py"):  # free now (dnpo-seed0: never run, no lock)
        pass


def test_rerun_with_other_settings_is_refused(tmp_path):
    """OUT remembers the train/eval flags; another set is refused (one line), not mixed into the same runs."""
    opts = ablate.parse_args(["--out", str(tmp_path), "--", "--max-prompts", "8"])
    ablate.check_settings(opts, write=True)
    ablate.main(["--out", str(tmp_path), "--iters", "1", "--dry-run", "--", "--max-prompts", "8"])  # same: fine
    with pytest.raises(SystemExit, match=r"was run with train_flags=\['--max-prompts', '8'\]") as err:
        ablate.main(["--out", str(tmp_path), "--dry-run", "--", "--max-prompts", "9"])
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- the table, by hand
def fake_judged(path, correct_ids, human_correct=range(7), n=10):
    """n eval records "What is (i+2) + (i+3)?"; the listed ids answered right (score 10), others wrong (1)."""
    rows = [{"id": f"q{i}", "prompt": f"What is {i + 2} + {i + 3}?", "answer": str(2 * i + 5),
             "human": f"It is {2 * i + 5}." if i in human_correct else "It is 99.",
             "generated": f"It is {2 * i + 5}." if i in correct_ids else "It is 99.",
             "human_score": 10.0 if i in human_correct else 1.0,
             "generated_score": 10.0 if i in correct_ids else 1.0, "judge": "rule"} for i in range(n)]
    write_jsonl(path, rows)


def test_table_by_hand(tmp_path):
    """Accuracy + Wilson, paired win − loss + bootstrap, seed means, and the spread sentence from fake judged files."""
    out = tmp_path
    fake_judged(out / "spin-seed0" / "eval" / "base_judged.jsonl", range(3))
    fake_judged(out / "spin-seed0" / "eval" / "iter0_judged.jsonl", range(4))
    fake_judged(out / "spin-seed1" / "eval" / "iter0_judged.jsonl", range(1, 5))
    fake_judged(out / "spin-seed0" / "eval" / "iter1_judged.jsonl", range(5))       # 5/10
    fake_judged(out / "spin-seed1" / "eval" / "iter1_judged.jsonl", range(6))       # 6/10
    fake_judged(out / "dnpo-seed0" / "eval" / "iter1_judged.jsonl", range(2, 9))    # 7/10: wins 5-8, losses 0-1
    fake_judged(out / "dnpo-seed1" / "eval" / "iter1_judged.jsonl", range(8))       # 8/10: wins 6-7, no loss
    opts = ablate.parse_args(["--out", str(out), "--iters", "1", "--seeds", "0", "1", "--rows", "spin,dnpo"])
    result = ablate.collect(opts)
    assert result["base"]["value"] == 0.3 and result["human"]["value"] == 0.7
    cell = {(c["row"], c["seed"], c["k"]): c for c in result["cells"]}
    assert (cell["spin", 0, 1]["correct"], cell["spin", 0, 1]["n"]) == (5, 10)
    assert cell["spin", 0, 1]["ci"] == pytest.approx((0.2366, 0.7634), abs=1e-4)  # Wilson 5/10, textbook
    assert ("dnpo", 0, 0) not in cell and cell["dnpo", 1, 1]["value"] == 0.8
    v = cell["dnpo", 0, 1]["vs_spin"]
    assert (v["win"], v["tie"], v["loss"], v["n"]) == (4, 4, 2, 10) and v["win_minus_loss"] == pytest.approx(0.2)
    assert v["ci"] == pytest.approx(ev.bootstrap_intervals(4, 4, 2)["win_minus_loss"])
    assert (cell["dnpo", 1, 1]["vs_spin"]["win"], cell["dnpo", 1, 1]["vs_spin"]["loss"]) == (2, 0)
    b = cell["dnpo", 0, 1]["vs_base"]  # right on 2..8 vs the base model's 0..2: wins 3..8, losses 0..1
    assert (b["win"], b["loss"], b["n"]) == (6, 2, 10) and b["diff"] == pytest.approx(0.4)
    assert b["ci"] == pytest.approx(ev.bootstrap_intervals(6, 2, 2)["win_minus_loss"])
    summary = {(s["row"], s["k"]): s for s in result["summary"]}
    assert summary["spin", 1]["mean"] == pytest.approx(0.55) and summary["dnpo", 1]["seeds"] == 2
    check = result["dnpo_vs_spin"][0]
    assert check["diffs"] == pytest.approx([0.2, 0.2]) and check["spread"] == pytest.approx({"spin": 0.1, "dnpo": 0.1})
    assert check["exceeds"] and "the difference exceeds the spread" in check["sentence"]
    md = ablate.markdown(opts, result)
    assert "| base model | — | 0.300 [0.108, 0.603] |  |  |" in md
    assert "| SPIN | 2 |  | 0.400 (0.400–0.400) | 0.550 (0.500–0.600) |" in md
    assert "| +DNPO (DSL + NPO) | 2 |  | = SPIN | 0.750 (0.700–0.800) |" in md
    assert "| SPIN | 0 | 0.400 [0.168, 0.687] | 0.500 [0.237, 0.763] |" in md
    lo, hi = ev.bootstrap_intervals(4, 4, 2)["win_minus_loss"]
    assert f"| +DNPO (DSL + NPO) | 0 | {0.2:+.3f} [{lo:+.3f}, {hi:+.3f}] (4/4/2) |" in md
    lo, hi = b["ci"]
    assert f"| +DNPO (DSL + NPO) | 0 | = SPIN | +0.400 [{lo:+.3f}, {hi:+.3f}] |" in md
    fake_judged(out / "dnpo-seed1" / "eval" / "iter1_judged.jsonl", range(5))       # 5/10: −0.1 at seed 1
    check = ablate.collect(opts)["dnpo_vs_spin"][0]
    assert check["mean"] == pytest.approx(0.05) and not check["exceeds"]
    assert "does not exceed" in check["sentence"]
    one = ablate.collect(ablate.parse_args(["--out", str(out), "--iters", "1", "--seeds", "0", "--rows", "dnpo"]))
    assert "one seed" in one["dnpo_vs_spin"][0]["sentence"] and "exceeds" not in one["dnpo_vs_spin"][0]


# ----------------------------------------------------------------------------- end to end, tiny model
def test_tiny_ablation_end_to_end_and_rerun_does_nothing(tmp_path, tiny_model_dir, monkeypatch):
    """spin + dnpo, iterations 0..1, one seed, every command run in-process; a second call runs nothing."""
    calls = []

    def in_process(cmd):  # the exact command, without a new interpreter per step
        calls.append(cmd)
        script, argv = pathlib.Path(cmd[1]).name, cmd[2:]
        (train.main if script == "train.py" else ev.main)(argv)
        return 0
    monkeypatch.setattr(study, "run_command", in_process)
    out = tmp_path / "abl"
    argv = ["--out", str(out), "--iters", "1", "--seeds", "0", "--rows", "spin,dnpo", "--eval-max-prompts", "3",
            "--logps-n", "3", "--", *tiny_train_flags(tiny_model_dir)]
    result = ablate.main(argv)
    assert [pathlib.Path(c[1]).name + " " + c[2] for c in calls] == [
        "train.py --iter", "eval.py score", "train.py --iter", "eval.py score", "train.py --iter", "eval.py score",
        "eval.py logps", "eval.py logps"]  # spin iter0, spin iter1, dnpo iter1: each scored when trained
    spin, dnpo = out / "spin-seed0", out / "dnpo-seed0"
    config = json.loads((dnpo / "iter1" / "config.json").read_text())
    assert config["start_model"] == str(spin / "iter0" / "model") and config["dsl"] and config["noise"] == "trainable"
    assert not (dnpo / "iter0").exists()
    config = json.loads((spin / "iter1" / "config.json").read_text())
    assert (config["dsl"], config["noise"], config["start_model"]) == (False, "none", str(spin / "iter0" / "model"))
    assert sorted(json.loads((spin / "eval" / "scores.json").read_text())["models"]) == ["base", "iter0", "iter1"]
    assert sorted(json.loads((dnpo / "eval" / "scores.json").read_text())["models"]) == ["iter1"]  # base once
    cell = {(c["row"], c["k"]): c for c in result["cells"]}
    judged = read_jsonl(dnpo / "eval" / "iter1_judged.jsonl")
    assert cell["dnpo", 1]["value"] == ev.score_row(judged)["accuracy"] and cell["dnpo", 1]["n"] == 3
    assert cell["dnpo", 1]["vs_spin"]["n"] == 3
    # Fig. 2 / 10: spin's iter0 answers are reused from iter1/generated.jsonl (iter1 started from iter0/model);
    # dnpo's iter1 (no iter2) and spin's last iteration are generated afresh
    settings = json.loads((spin / "eval" / "logps_settings.json").read_text())["iterations"]
    assert settings["0"]["generations"] == "iter1/generated.jsonl" and "fresh" in settings["1"]["generations"]
    assert [r["generated"] for r in read_jsonl(spin / "eval" / "logps_iter0.jsonl")] == \
        [r["generated"] for r in read_jsonl(spin / "iter1" / "generated.jsonl")[:3]]
    assert "fresh" in json.loads((dnpo / "eval" / "logps_settings.json").read_text())["iterations"]["1"]["generations"]
    for png in ("ablation.png", "plots/stagnation.png", "dnpo-seed0/plots/losses.png", "plots/scores.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    md = (out / "ablation.md").read_text()
    assert "| +DNPO (DSL + NPO) | 1 |  | = SPIN |" in md and "one seed" in md
    assert "| eval score dnpo-seed0 (to iter1) | — |" in md and "| train dnpo-seed0 iter1 |" in md
    calls.clear()
    before = (out / "ablation.json").read_text()
    ablate.main(argv)
    assert calls == [] and (out / "ablation.json").read_text() == before


# ----------------------------------------------------------------------------- train.py --start-model
def test_start_model_flag_recorded_and_checked_on_resume(tmp_path, tiny_model_dir):
    """--iter 1 --start-model DIR needs no iter0 of its own, records DIR, and a checkpoint refuses another DIR."""
    run = tmp_path / "run"
    flags = ["--iter", "1", "--run-dir", str(run), *tiny_train_flags(tiny_model_dir)]
    with pytest.raises(SystemExit, match="stopped after 1 steps"):
        train.main([*flags, "--start-model", tiny_model_dir, "--stop-after-steps", "1"])
    assert json.loads((run / "iter1" / "config.json").read_text())["start_model"] == tiny_model_dir
    assert not (run / "iter0").exists()
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    with pytest.raises(SystemExit, match=re.escape(f"start_model={tiny_model_dir}; rerun with those flags")) as err:
        train.main([*flags, "--start-model", str(other)])
    assert "\n" not in str(err.value)
    linked = tmp_path / "link-to-model"  # the same directory spelled another way resumes (before: refused)
    linked.symlink_to(tiny_model_dir)
    train.main([*flags, "--start-model", str(linked)])
    assert json.loads((run / "iter1" / "summary.json").read_text())["start_model"] == str(pathlib.Path(tiny_model_dir).resolve())


def test_start_model_spelled_relative_or_absolute_is_one_model(tmp_path, tiny_model_dir, monkeypatch):
    """ablate.py passed the SPIN model as an absolute path in one session and relative to the working directory
    in the next: the killed iteration resumes (before: 'holds generate outputs made with start_model=/abs/...')."""
    shutil.copytree(tiny_model_dir, tmp_path / "start")
    monkeypatch.chdir(tmp_path)
    flags = ["--iter", "1", "--run-dir", "run", *tiny_train_flags(tiny_model_dir)]
    with pytest.raises(SystemExit, match="stopped after 1 steps"):
        train.main([*flags, "--start-model", str(tmp_path / "start"), "--stop-after-steps", "1"])
    train.main([*flags, "--start-model", "start"])  # relative: the same directory
    assert (tmp_path / "run" / "iter1" / "model" / "config.json").is_file()


def test_run_dir_spelled_another_way_resumes_a_killed_iteration(tmp_path, tiny_model_dir, monkeypatch):
    """Iteration 1 starts from RUN/iter0/model: killed under --run-dir run, resumed under its absolute path, from
    a checkpoint that kept the old relative spelling as older code wrote it (before: refused, 'was written with
    start_model=run/iter0/model')."""
    import torch
    monkeypatch.chdir(tmp_path)
    flags = tiny_train_flags(tiny_model_dir)
    train.main(["--iter", "0", "--run-dir", "run", *flags])
    with pytest.raises(SystemExit, match="stopped after 1 steps"):
        train.main(["--iter", "1", "--run-dir", "run", *flags, "--stop-after-steps", "1"])
    state_path = tmp_path / "run" / "iter1" / "checkpoint" / "state.pt"
    state = torch.load(state_path, weights_only=True)
    assert state["args"]["start_model"] == str(tmp_path.resolve() / "run" / "iter0" / "model")
    torch.save({**state, "args": {**state["args"], "start_model": "run/iter0/model"}}, state_path)
    train.main(["--iter", "1", "--run-dir", str(tmp_path / "run"), *flags])
    assert (tmp_path / "run" / "iter1" / "model" / "config.json").is_file()


@pytest.mark.parametrize("k, start, message", [
    ("1", "EMPTY", "has no config.json"), ("1", "./no/such/model", "has no config.json"),
    ("0", "EMPTY", "--start-model is for k ≥ 1"),
])
def test_start_model_errors_are_one_line(tmp_path, k, start, message):
    (tmp_path / "empty").mkdir()
    start = str(tmp_path / "empty") if start == "EMPTY" else start
    with pytest.raises(SystemExit, match=message) as err:
        train.main(["--iter", k, "--run-dir", str(tmp_path / "run"), "--start-model", start])
    assert "\n" not in str(err.value)


def test_per_family_accuracy_by_hand(tmp_path):
    """per_family counts correct / n per demo family; ids without a family are left out."""
    path = tmp_path / "judged.jsonl"
    fake_judged(path, correct_ids=[0, 1, 4])  # q0..q9
    family_of = {"q0": "arithmetic", "q1": "arithmetic", "q2": "arithmetic", "q3": "units", "q4": "units"}
    assert ablate.per_family(path, family_of) == {"arithmetic": [2, 3], "units": [1, 2]}
