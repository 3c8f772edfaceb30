"""Tests of stages.py (what each stage was made from) and of checkpoint.py's safe loading and
rundir.py's cleanup."""
import pathlib
import pickle
import random

import numpy as np
import pytest
import torch

import checkpoint as ckpt
import errors
import rundir
import stages


def one_line_refusal(fn, *args, match=""):
    """fn(*args) refuses with one line for the user (errors.Refusal), without a command's name: train.py (or the
    command that called it) prefixes its own."""
    with pytest.raises(errors.Refusal, match=match) as err:
        fn(*args)
    assert "\n" not in str(err.value) and not str(err.value).startswith("train.py")
    return str(err.value)


def test_redact_url_strips_only_the_credentials():
    assert stages.redact_url("https://user:pa%40ss@host.example:8443/v1?x=1") == "https://host.example:8443/v1?x=1"
    assert stages.redact_url("http://token@localhost/v1") == "http://localhost/v1"
    assert stages.redact_url("http://localhost:8000/v1") == "http://localhost:8000/v1"
    assert stages.redact_url(None) is None
    assert stages.public_args({"judge_base_url": "http://a:b@h/v1", "data": "x@y"}) == {"judge_base_url": "http://h/v1",
                                                                                        "data": "x@y"}


def test_a_record_is_written_before_and_checked_after(tmp_path):
    """begin records flags and inputs; other flags are refused once outputs exist, replaced while none do."""
    stages.begin(tmp_path, "generate", {"seed": 0}, {"data": "a"})
    stages.begin(tmp_path, "generate", {"seed": 1}, {"data": "a"})  # nothing produced yet: a new record
    assert stages.load(tmp_path)["generate"]["flags"] == {"seed": 1}
    (tmp_path / "generated.jsonl.partial").write_text("{}\n")
    message = one_line_refusal(stages.begin, tmp_path, "generate", {"seed": 2}, {"data": "a"}, match="seed=1")
    assert "rerun with those flags (this run has seed=2)" in message and f"delete {tmp_path}" in message
    one_line_refusal(stages.begin, tmp_path, "generate", {"seed": 1}, {"data": "b"}, match="made from another data")
    stages.begin(tmp_path, "generate", {"seed": 1}, {"data": "a"})  # the same settings: resumed


def test_a_changed_output_is_refused(tmp_path):
    (tmp_path / "pairs.jsonl").write_text('{"id": 1}\n{"id": 2}\n')
    with pytest.raises(errors.Refusal, match="does not record what it was made from"):  # no record: unknown provenance
        stages.begin(tmp_path, "label", {"dsl": True}, {"judged.jsonl": "j"})
    (tmp_path / "pairs.jsonl").unlink()
    stages.begin(tmp_path, "label", {"dsl": True}, {"judged.jsonl": "j"})
    (tmp_path / "pairs.jsonl").write_text('{"id": 1}\n{"id": 2}\n')
    stages.finish(tmp_path, "label", "pairs.jsonl")
    stages.check(tmp_path, "label", {"dsl": True}, {"judged.jsonl": "j"})
    (tmp_path / "pairs.jsonl").write_text('{"id": 1}\n')
    one_line_refusal(stages.check, tmp_path, "label", {"dsl": True}, match="pairs.jsonl changed since the label stage")


def test_a_later_stage_keeps_an_earlier_record_binding(tmp_path):
    """generate produced nothing of its own any more, but judge did: other generate flags are still refused."""
    stages.begin(tmp_path, "generate", {"seed": 0}, {})
    stages.begin(tmp_path, "judge", {"judge": "rule"}, {"generated.jsonl": None})
    (tmp_path / "judged.jsonl.partial").write_text("")
    one_line_refusal(stages.check, tmp_path, "generate", {"seed": 1}, match="seed=0")


def test_corrupt_record_is_one_line(tmp_path):
    (tmp_path / "stages.json").write_bytes(b'{"generate": \xff')
    one_line_refusal(stages.load, tmp_path, match="stages.json is corrupt")


def test_model_identity_is_its_files(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    a = stages.sha256_dir(tmp_path / "m")
    (tmp_path / "m" / ".cache").write_text("ignored")
    assert stages.sha256_dir(tmp_path / "m") == a
    (tmp_path / "m" / "model.safetensors").write_bytes(b"w")
    assert stages.sha256_dir(tmp_path / "m") != a and stages.sha256_dir("org/hub-id") is None


# ----------------------------------------------------------------------------- checkpoint.py, rundir.py
class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_load_checkpoint_never_runs_a_payload(tmp_path, protocol):
    path, marker = tmp_path / "checkpoint" / "state.pt", tmp_path / "pwned"
    path.parent.mkdir()
    torch.save({"policy": {}, "payload": Payload(marker)}, path, pickle_protocol=protocol)
    message = one_line_refusal(ckpt.load_checkpoint, path, match="not a usable checkpoint")
    assert str(path) in message and f"delete {path.parent}" in message and not marker.exists()


def test_load_checkpoint_refuses_truncated_and_foreign_files(tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"policy": {"w": torch.zeros(1000)}}, path)
    one_line_refusal(ckpt.load_checkpoint, path, match="not a checkpoint written by train.py")
    path.write_bytes(path.read_bytes()[:300])
    one_line_refusal(ckpt.load_checkpoint, path, match="truncated or corrupt")
    path.write_bytes(b"")
    one_line_refusal(ckpt.load_checkpoint, path, match="truncated or corrupt")


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    """python, numpy and torch RNGs continue exactly after a save and a weights_only load."""
    ckpt.seed_everything(3)
    random.gauss(0, 1), np.random.standard_normal()  # leave a cached gaussian in both
    state = {k: None for k in ckpt.CHECKPOINT_KEYS} | {"rng": ckpt.rng_state(), "args": {"judge_base_url": None}}
    ckpt.save_checkpoint(tmp_path / "state.pt", state)
    expected = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.standard_normal(), torch.rand(1))
    ckpt.set_rng_state(ckpt.load_checkpoint(tmp_path / "state.pt")["rng"])
    got = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.standard_normal(), torch.rand(1))
    assert got[:4] == expected[:4] and torch.equal(got[4], expected[4])


def test_restore_refuses_other_pairs():
    args = type("A", (), {"pairs_sha256": "b" * 64, "lr": 1e-3})()
    state = {"args": {"pairs_sha256": "a" * 64, "lr": 1e-3}}
    one_line_refusal(ckpt.restore, state, pathlib.Path("ck/state.pt"), args, ("lr", "pairs_sha256"), 0, *[None] * 5,
                  match="trained on other pairs .* delete ck")


def test_remove_leftovers_keeps_partials(tmp_path):
    keep = [tmp_path / "generated.jsonl.partial", tmp_path / "judged.jsonl.partial", tmp_path / "model" / "config.json",
            tmp_path / "checkpoint" / "state.pt"]
    gone = [tmp_path / ".pairs.jsonl.x1.tmp", tmp_path / "checkpoint" / ".state.pt.ab.tmp",
            tmp_path / ".model.tmp-7-q" / "model.safetensors", tmp_path / ".model.old-z" / "model" / "config.json"]
    for path in keep + gone:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    rundir.remove_leftovers(tmp_path)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in gone)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "generated.jsonl.partial",
                                                          "judged.jsonl.partial", "model"]


def test_a_record_from_before_a_new_flag_compares_as_its_legacy_value(tmp_path):
    """A train record (or checkpoint) written before --pack-pairs existed was unpacked: --no-pack-pairs reuses
    it, --pack-pairs is refused in one line naming pack_pairs=False."""
    stages.begin(tmp_path, "train", {"lr": 1e-3}, {})
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    stages.check(tmp_path, "train", {"lr": 1e-3, "pack_pairs": False})
    one_line_refusal(stages.check, tmp_path, "train", {"lr": 1e-3, "pack_pairs": True}, match="pack_pairs=False")
    args = type("A", (), {"lr": 1e-3, "pack_pairs": True})()
    one_line_refusal(ckpt.restore, {"args": {"lr": 1e-3}}, pathlib.Path("ck/state.pt"), args, ("lr", "pack_pairs"), 0,
                  *[None] * 5, match="pack_pairs=False")
