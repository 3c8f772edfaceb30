"""Tests of study.py, the driver of ablate.py, noise_study.py and ppo_study.py: which steps run, what a failed
step says, the times and the table so far, the flags checked before anything is written, the settings file, and
the exit line (no model is trained here)."""
import types

import pytest

import ablate
import data
import errors
import noise_study
import study


def steps_of(tmp_path, log):
    """A done step, a link, a step that `when` skips, an eval step whose command is built when it runs (after a
    `prepare`), and a probe whose exit status 1 is not a failure; each command makes its step done."""
    made = tmp_path / "made"
    made.mkdir()

    def cmd(name):
        return lambda: log.append(("build", name)) or ["true", name]
    return [dict(label="train a iter0", done=lambda: True, cmd=["never"]),
            dict(label="link b/iter0", link=("../a/iter0", tmp_path / "b" / "iter0"),
                 done=lambda: (tmp_path / "b" / "iter0").is_symlink()),
            dict(label="train pruned iter1", done=lambda: False, when=lambda: False, cmd=["never"]),
            dict(label="eval c (to iter1)", done=lambda: (made / "c").exists(), cmd=cmd("c"),
                 prepare=(tmp_path / "c", lambda: log.append(("prepare", "c")))),
            dict(label="probe d", done=lambda: (made / "d").exists(), cmd=cmd("d"), ok_rc=(0, 1))]


def test_execute_runs_what_is_not_done(tmp_path, monkeypatch, capsys):
    """Done and `when`-false steps are skipped; a link is made; `prepare` runs before its command, which is built
    when the step runs; an `ok_rc` status passes; the seconds go to OUT/times_name; the table after each eval."""
    log, made = [], tmp_path / "made"

    def run(cmd):
        log.append(("run", cmd[1]))
        (made / cmd[1]).touch()
        return 1 if cmd[1] == "d" else 0
    monkeypatch.setattr(study, "run_command", run)
    opts = types.SimpleNamespace(out=tmp_path)
    times = study.execute(opts, steps_of(tmp_path, log), "x.py", "times.json", report=lambda o: log.append("report"))
    assert log == [("prepare", "c"), ("build", "c"), ("run", "c"), "report", ("build", "d"), ("run", "d")]
    assert (tmp_path / "b" / "iter0").readlink().as_posix() == "../a/iter0"
    assert sorted(times) == sorted(data.read_json(tmp_path / "times.json")) == [
        "eval c (to iter1)", "link b/iter0", "probe d"]
    out = capsys.readouterr().out
    assert "[1/5 done] train a iter0" in out and "[3/5 skipped] train pruned iter1" in out and "[4/5] true c" in out


@pytest.mark.parametrize("rc, makes", [(2, True), (0, False)])
def test_a_failed_step_is_one_refusal(tmp_path, monkeypatch, rc, makes):
    """A command that exits with another status, or exits 0 but leaves its step not done, stops the study in one
    line naming the step, its status and the command to rerun; the seconds of the steps before it are kept."""
    done = tmp_path / "done"

    def run(cmd):
        if makes:
            done.touch()
        return rc
    monkeypatch.setattr(study, "run_command", run)
    steps = [dict(label="train a iter0", done=done.exists, cmd=["true"])]
    with pytest.raises(errors.Refusal, match=rf"^train a iter0 failed \(exit status {rc}\); fix the cause and "
                                             rf"rerun x.py \(finished work is kept\)$"):
        study.execute(types.SimpleNamespace(out=tmp_path), steps, "x.py", "times.json")
    assert not (tmp_path / "times.json").exists()


def test_run_study_writes_the_table_after_a_failed_step(tmp_path, capsys):
    """A dry run prints each step (`# done: `) and writes nothing; a run holds --out, writes its settings, and
    writes the table so far when a step fails, raising that step's error."""
    steps = [dict(label="a", done=lambda: True, cmd=["true", "a"]), dict(label="b", done=lambda: False, cmd=lambda: [])]
    opts = types.SimpleNamespace(out=tmp_path / "out", dry_run=True)
    settings = lambda opts, write: study.keep_settings(opts.out / "config.json", {"x": 1}, write)  # noqa: E731
    reports = []

    def execute(opts, steps):
        raise errors.Refusal("b failed")
    assert study.run_study("x.py", opts, steps, settings, execute, reports.append, table="t.md") == steps
    assert capsys.readouterr().out == "# done: true a\nb\n" and not opts.out.exists()
    opts.dry_run = False
    with pytest.raises(errors.Refusal, match="b failed"):
        study.run_study("x.py", opts, steps, settings, execute, reports.append, table="t.md")
    assert reports == [opts] and data.read_json(opts.out / "config.json") == {"x": 1}
    assert sorted(p.name for p in opts.out.iterdir()) == [".lock", "config.json"]


# ----------------------------------------------------------------------------- the study commands' flags, checked first
@pytest.mark.parametrize("script, argv, message", [
    ("ablate", ["--seeds", "-1"], "ablate.py: --seeds must be ≥ 0, got -1"),
    ("ablate", ["--eval-max-prompts", "0"], "ablate.py: --eval-max-prompts must be > 0, got 0"),
    ("ablate", ["--", "--lr", "-1"],
     "ablate.py: a train flag after -- is refused by train.py: --lr must be > 0, got -1"),
    ("ablate", ["--", "--top-p", "2"], "refused by train.py: --top-p must be in (0, 1], got 2.0"),
    ("ablate", ["--", "--bogus"], "refused by train.py: unrecognized arguments: --bogus"),
    ("ablate", ["--rows", "fixed", "--", "--noise-sigma", "0"],
     "refused by train.py: --noise-sigma must be > 0, got 0"),
    ("ablate", ["--", "--data", "no/such.jsonl"], "refused by train.py: --data no/such.jsonl: no such file"),
    ("noise_study", ["--eval-max-prompts", "-1"], "noise_study.py: --eval-max-prompts must be > 0, got -1"),
    ("noise_study", ["--", "--lr", "0"],
     "noise_study.py: a train flag after -- is refused by train.py: --lr must be > 0, got 0"),
    ("noise_study", ["--", "--max-prompts", "-4"], "refused by train.py: --max-prompts must be ≥ 0, got -4"),
])
def test_bad_flag_stops_before_anything_is_written(tmp_path, script, argv, message):
    """A bad flag of the study, or a train flag train.py would reject (train.py's own checks on ablate.py's every
    row command, on noise_study.py's start and every cell command), is one line before the study writes its
    config, table or figure: OUT is not even created."""
    out = tmp_path / "out"
    own = {"ablate": ["--iters", "1"], "noise_study": ["--groups", "clipping"]}[script]
    with pytest.raises(SystemExit) as err:
        {"ablate": ablate, "noise_study": noise_study}[script].main(["--out", str(out), *own, *argv])
    assert message in str(err.value) and "\n" not in str(err.value), err.value
    assert not out.exists()


def test_keep_settings_refuses_other_settings(tmp_path):
    """The settings file remembers the first run's settings; train flags compare as settings (order, --f=v), any
    other change is one errors.Refusal naming what was and what is now."""
    path = tmp_path / "config.json"
    study.keep_settings(path, {"train_flags": ["--a", "1", "--b"], "k": 2}, write=False)
    assert not path.exists()
    study.keep_settings(path, {"train_flags": ["--a", "1", "--b"], "k": 2}, write=True)
    study.keep_settings(path, {"train_flags": ["--b", "--a=1"], "k": 2}, write=True)
    with pytest.raises(errors.Refusal, match=rf"^{tmp_path} was run with k=2 \(now 3\); rerun with those or use "
                                             rf"another --out$"):
        study.keep_settings(path, {"train_flags": ["--a", "1", "--b"], "k": 3}, write=True)


def test_exit_line_names_the_command():
    assert study.exit_line("x.py", KeyboardInterrupt()) == "x.py: interrupted; rerun the same command to continue"
    assert study.exit_line("x.py", errors.Refusal("bad\n  flag")) == "x.py: bad flag"
    assert study.split_argv(["--out", "o", "--", "--lr", "1"]) == (["--out", "o"], ["--lr", "1"])
