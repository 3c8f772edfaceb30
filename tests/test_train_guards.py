"""Tests of train.py's guarantees (README "Guarantees"): pickle-free checkpoints, stage records that refuse
stale reuse, flags checked before any write, leftovers removed, one-line errors; on the tiny random model."""
import json

import pytest
import torch

import checkpoint as ckpt
import data
import rundir
import stages
import train
from conftest import fresh_copy, read_jsonl, tiny_flags

URL = "http://user:hunter2@localhost:8000/v1"

def stopped(run_dir, *extra, steps=2):
    """Iteration 1 in run_dir stopped after `steps` steps (a checkpoint at step 2), as if killed."""
    with pytest.raises(SystemExit, match=f"stopped after {steps} steps"):
        train.main(["--iter", "1", *tiny_flags(run_dir, "unused"), "--judge-base-url", URL, *extra,
                    "--stop-after-steps", str(steps)])
    return run_dir / "iter1"


def refused(argv, *expected):
    """train.main(argv) stops with a one-line message holding every expected string; returns it."""
    with pytest.raises(SystemExit) as err:
        train.main(argv)
    message = str(err.value)
    assert "\n" not in message and all(e in message for e in expected), message
    return message


class Payload:
    """Unpickling this writes a marker file: what a planted state.pt would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_planted_pickle_payload_never_runs(iter0_run, tmp_path):
    """A state.pt replaced by a pickle payload is refused in one line; its code does not run."""
    it1 = stopped(fresh_copy(iter0_run, tmp_path))
    state_path, marker = it1 / "checkpoint" / "state.pt", tmp_path / "pwned"
    torch.save({"step": Payload(marker)}, state_path)
    refused(["--iter", "1", *tiny_flags(tmp_path / "run", "unused"), "--judge-base-url", URL],
            str(state_path), "not a usable checkpoint", f"delete {state_path.parent}")
    assert not marker.exists(), "the payload ran"


def test_truncated_checkpoint_is_a_one_line_error(iter0_run, tmp_path):
    it1 = stopped(fresh_copy(iter0_run, tmp_path))
    state_path = it1 / "checkpoint" / "state.pt"
    state_path.write_bytes(state_path.read_bytes()[:5000])
    refused(["--iter", "1", *tiny_flags(tmp_path / "run", "unused"), "--judge-base-url", URL],
            str(state_path), "truncated or corrupt", f"delete {state_path.parent}")


def test_rerun_with_other_flags_is_refused_and_changes_nothing(iter0_run, tmp_path):
    """--max-prompts 4 after a stop with 6: refused naming the flag; config.json and outputs stay as they were."""
    run_dir = fresh_copy(iter0_run, tmp_path)
    it1 = stopped(run_dir)
    before = {p.name: p.read_bytes() for p in it1.iterdir() if p.is_file()}
    flags = tiny_flags(run_dir, "unused")
    flags[flags.index("--max-prompts") + 1] = "4"
    refused(["--iter", "1", *flags, "--judge-base-url", URL], "max_prompts=6", "rerun with those flags",
            "max_prompts=4", "--run-dir", f"delete {it1}")
    assert {p.name: p.read_bytes() for p in it1.iterdir() if p.is_file()} == before
    refused(["--iter", "1", *tiny_flags(run_dir, "unused"), "--no-dsl", "--judge-base-url", URL], "dsl=True")


def test_finished_iteration_rerun_with_other_flags_is_refused(iter0_run, tmp_path):
    """A finished iteration says 'nothing to do' only for its own flags; config.json is not rewritten."""
    run_dir = fresh_copy(iter0_run, tmp_path)
    config = (run_dir / "iter0" / "config.json").read_text()
    base_model = json.loads(config)["base_model"]
    refused(["--iter", "0", *tiny_flags(run_dir, base_model), "--lr", "2e-3"], "lr=0.001", "lr=0.002")
    assert (run_dir / "iter0" / "config.json").read_text() == config


def test_changed_pairs_refuse_the_resume(iter0_run, tmp_path):
    """pairs.jsonl cut short after a stop: the resume is refused instead of continuing into another schedule."""
    run_dir = fresh_copy(iter0_run, tmp_path)
    it1 = stopped(run_dir)
    pairs = (it1 / "pairs.jsonl").read_text().splitlines(keepends=True)
    (it1 / "pairs.jsonl").write_text("".join(pairs[:-1]))
    refused(["--iter", "1", *tiny_flags(run_dir, "unused"), "--judge-base-url", URL],
            f"{it1 / 'pairs.jsonl'} changed since the label stage wrote it")


def test_checkpoint_records_its_pairs_and_no_credentials(iter0_run, tmp_path):
    """state.pt carries the sha256 of its pairs; config.json, stages.json and state.pt hold no URL password."""
    run_dir = fresh_copy(iter0_run, tmp_path)
    it1 = stopped(run_dir)
    state = ckpt.load_checkpoint(it1 / "checkpoint" / "state.pt")
    assert state["args"]["pairs_sha256"] == stages.sha256_json(data.history_pairs(run_dir, 1, 1))
    assert "pairs_sha256" in train.TRAINING_KEYS
    assert state["args"]["judge_base_url"] == "http://localhost:8000/v1"
    for name in ("config.json", "stages.json", "checkpoint/state.pt"):
        assert b"hunter2" not in (it1 / name).read_bytes(), name
    assert json.loads((it1 / "config.json").read_text())["judge_base_url"] == "http://localhost:8000/v1"


def test_leftovers_of_a_kill_are_removed_and_partials_kept(iter0_run, tmp_path):
    run_dir = fresh_copy(iter0_run, tmp_path)
    it1 = stopped(run_dir)
    planted = [it1 / "checkpoint" / ".state.pt.k3j2.tmp", it1 / ".config.json.a1b2.tmp", it1 / ".model.tmp-x9/w.bin"]
    for path in planted:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 100)
    (it1 / "generated.jsonl.partial").write_text("")  # resume state of a stage: never a leftover
    with pytest.raises(SystemExit, match="stopped after 1 steps"):
        train.main(["--iter", "1", *tiny_flags(run_dir, "unused"), "--judge-base-url", URL, "--stop-after-steps", "1"])
    assert not any(p.exists() for p in planted) and not (it1 / ".model.tmp-x9").exists()
    assert (it1 / "generated.jsonl.partial").exists()


def test_torn_metrics_line_does_not_block_the_resume(iter0_run, tmp_path):
    run_dir = fresh_copy(iter0_run, tmp_path)
    it1 = stopped(run_dir, steps=3)
    with open(it1 / "metrics.jsonl", "a") as fh:
        fh.write('{"iter": 1, "step": 4, "epo')  # killed mid-append
    train.main(["--iter", "1", *tiny_flags(run_dir, "unused"), "--judge-base-url", URL])
    assert [r["step"] for r in read_jsonl(it1 / "metrics.jsonl")] == list(range(1, 7))


def test_run_dir_that_is_a_file_or_unwritable(tmp_path, tiny_model_dir, monkeypatch):
    (tmp_path / "file").write_text("")
    refused(["--iter", "0", *tiny_flags(tmp_path / "file", tiny_model_dir)], "is a file")
    refused(["--iter", "0", *tiny_flags(tmp_path / "file" / "sub", tiny_model_dir)], "sub")
    monkeypatch.setattr(rundir.os, "access", lambda path, mode: False)  # a read-only directory (root ignores chmod)
    refused(["--iter", "0", *tiny_flags(tmp_path / "ro", tiny_model_dir)], "is not writable")


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "inf", "--lr must be a finite number"), ("--noise-lr", "nan", "--noise-lr must be a finite"),
    ("--top-p", "-3", "--top-p must be in (0, 1]"), ("--top-p", "1.5", "--top-p must be in (0, 1]"),
    ("--temperature", "nan", "--temperature must be a finite number"),
    ("--judge-max-missing", "1.5", "--judge-max-missing must be in [0, 1]"),
    ("--data", ".", "is a directory"), ("--data", "nope.jsonl", "no such file"),
])
def test_flags_are_checked_before_anything_is_written(tmp_path, flag, value, message):
    """A rejected flag is a one-line error, and the run directory is not created (no iter0/, no config.json)."""
    refused(["--iter", "0", *tiny_flags(tmp_path / "run", str(tmp_path / "no-model")), flag, value], message)
    assert not (tmp_path / "run").exists()


def test_nonfinite_loss_before_any_checkpoint_claims_none(iter0_run, tmp_path, monkeypatch):
    run_dir = fresh_copy(iter0_run, tmp_path)
    real = train.steps.dnpo_loss

    def poisoned(*a, **kw):
        out = real(*a, **kw)
        return {**out, "loss": out["loss"] * float("nan")}
    monkeypatch.setattr(train.steps, "dnpo_loss", poisoned)
    message = refused(["--iter", "1", *tiny_flags(run_dir, "unused")], "step 1: non-finite loss", "no checkpoint was written yet")
    assert "last checkpoint" not in message and not (run_dir / "iter1" / "checkpoint" / "state.pt").exists()


def test_generation_gets_the_prompt_limit_and_judging_the_missing_limit(iter0_run, tmp_path, monkeypatch):
    """train.py passes --max-prompt-length to generation and --judge-max-missing to judge_records."""
    run_dir, seen = fresh_copy(iter0_run, tmp_path), {}
    real_generate = train.generate.generate_answers
    monkeypatch.setattr(train.generate, "generate_answers",
                        lambda *a, **kw: seen.update(generate=kw) or real_generate(*a, **kw))

    def judge_records(*a, **kw):
        seen.update(judge=kw)
        raise KeyboardInterrupt  # enough: stop before training
    monkeypatch.setattr(train.judges, "judge_records", judge_records)
    with pytest.raises(KeyboardInterrupt):
        train.main(["--iter", "1", *tiny_flags(run_dir, "unused"), "--judge-max-missing", "0.5"])
    assert seen["generate"]["max_prompt_length"] == 96 and seen["judge"]["max_missing"] == 0.5


def test_judge_scale_and_mode_reach_the_judge(iter0_run, tmp_path, monkeypatch):
    """--judge-scale and --judge-mode are passed to judges.make_judge and recorded with the judge stage."""
    run_dir, seen = fresh_copy(iter0_run, tmp_path), {}
    monkeypatch.setattr(train.judges, "make_judge", lambda *a, **kw: seen.update(make=kw) or object())
    monkeypatch.setattr(train.judges, "judge_records", lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        train.main(["--iter", "1", *tiny_flags(run_dir, "unused"), "--judge", "openai", "--judge-scale", "100",
                    "--judge-mode", "pairwise", "--judge-base-url", "http://127.0.0.1:9/v1"])
    assert seen["make"]["scale"] == 100 and seen["make"]["mode"] == "pairwise"
    judge_stage = json.loads((run_dir / "iter1" / "stages.json").read_text())["judge"]["flags"]
    assert judge_stage["judge_scale"] == 100 and judge_stage["judge_mode"] == "pairwise"


def test_one_place_per_default_preset_dict_help_and_training_keys(tmp_path, capsys):
    """A flag's default and help live on its one `flag(...)` line; a preset overrides defaults through
    set_defaults (and --help shows the chosen preset's values); TRAINING_KEYS are the trains=True flags plus
    the run state, derived, not listed by hand."""
    import config
    demo = config.parse_args(["--iter", "1"])
    assert (demo.lr, demo.epochs, demo.beta) == (config.PRESETS["demo"]["lr"], config.PRESETS["demo"]["epochs"], 0.1)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi", "response": "hello", "answer": "there"}\n')
    paper = config.parse_args(["--iter", "1", "--preset", "paper", "--data", str(prompts), "--lr", "2e-7"])
    assert (paper.lr, paper.epochs, paper.dtype) == (2e-7, 3, "bf16")  # the command line over the preset
    assert "(default 5e-07)" in config.build_parser("paper").format_help().replace("\n", " ").replace("  ", " ")
    trains = [a.dest for a in config.build_parser()._actions if a.dest in config.TRAINING_KEYS]
    assert set(config.TRAINING_KEYS) == set(trains) | set(config.RUN_STATE)
    assert {"beta", "noise_lr", "noise_init_variance", "optimizer", "pack_pairs"} <= set(trains)
    assert not {"noise_chunk_size", "run_dir", "judge", "save_every"} & set(config.TRAINING_KEYS)
    state = train.RunState(world_size=2, start_model="m")
    view = state.over(demo)
    assert (view.world_size, view.start_model, view.lr) == (2, "m", demo.lr) and not hasattr(demo, "world_size")
