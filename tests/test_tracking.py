"""tracking.py through train.py on the tiny model: TensorBoard event files read back by TensorBoard's own reader
with metrics.jsonl's numbers, a resumed run logging each step once, W&B offline records with the same numbers,
no credential in either, and a missing library stopping the run before any model loads."""
import importlib.util
import json
import struct

import numpy as np
import pytest

import errors
import tracking
import train
from conftest import read_jsonl, tiny_flags

SECRET_URL_PASSWORD = "pw-never-logged-0123"
URL = f"http://user:{SECRET_URL_PASSWORD}@judge.example:8000/v1"
has = lambda module: importlib.util.find_spec(module) is not None  # noqa: E731
needs_tb = pytest.mark.skipif(not has("tensorboard"), reason="tensorboard not installed "
                                                              "(pip install -r requirements-track.txt)")
needs_wandb = pytest.mark.skipif(not has("wandb"), reason="wandb not installed (pip install -r requirements-track.txt)")


def scalars(it_dir):
    """{tag: [(step, value)]} of the event files in it_dir, read by TensorBoard's EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(it_dir), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def expected(rows):
    """What TensorBoard holds for metrics rows: every number but the step, at the row's step, in float32."""
    tags = {k for r in rows for k in tracking.numbers(r)} - {"step"}
    return {t: [(r["step"], float(np.float32(r[t]))) for r in rows if t in tracking.numbers(r)] for t in tags}


def run(tiny_model_dir, run_dir, *extra):
    train.main(["--iter", "0", *tiny_flags(run_dir, tiny_model_dir), "--judge-base-url", URL, *extra])


@needs_tb
def test_tensorboard_events_hold_the_metrics_rows(tiny_model_dir, tmp_path):
    """Every metrics.jsonl number (the noise diagnostics included) at its step; the config public."""
    run(tiny_model_dir, tmp_path / "tb", "--report-to", "tensorboard")
    it_dir = tmp_path / "tb" / "iter0"
    rows = read_jsonl(it_dir / "metrics.jsonl")
    got, acc = scalars(it_dir)
    assert len(rows) == 6 and {"margin_offset", "kl_noise", "weight_shift", "loss", "lr"} <= set(got)
    assert got == expected(rows)
    from tensorboard.util import tensor_util
    config = tensor_util.make_ndarray(acc.Tensors("config/text_summary")[0].tensor_proto).item().decode()
    assert '"judge_base_url": "http://judge.example:8000/v1"' in config and '"report_to": "tensorboard"' in config
    for f in it_dir.glob("events.out.tfevents.*"):
        assert SECRET_URL_PASSWORD.encode() not in f.read_bytes()


@needs_tb
def test_resumed_run_logs_each_step_once(tiny_model_dir, tmp_path):
    """Killed after step 5 (checkpoint at 4) and rerun: step 5 is logged again, the killed process's step 5
    is purged, so the events equal the final metrics.jsonl (without purge_step, step 5 appears twice)."""
    with pytest.raises(SystemExit, match="stopped after 5 steps"):
        run(tiny_model_dir, tmp_path / "r", "--report-to", "tensorboard", "--stop-after-steps", "5")
    it_dir = tmp_path / "r" / "iter0"
    assert [s for s, _ in scalars(it_dir)[0]["loss"]] == [1, 2, 3, 4, 5]
    run(tiny_model_dir, tmp_path / "r", "--report-to", "tensorboard")
    assert len(list(it_dir.glob("events.out.tfevents.*"))) == 2
    assert scalars(it_dir)[0] == expected(read_jsonl(it_dir / "metrics.jsonl"))


def wandb_records(path):
    """The protobuf Records of a W&B transaction log (run-<id>.wandb): LevelDB log framing (32 KiB blocks,
    7-byte record headers crc/length/type, FULL=1 FIRST=2 MIDDLE=3 LAST=4) after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    blob, pos, part, records = path.read_bytes(), 7, b"", []
    assert blob[:4] == b":W&B"
    while pos + 7 <= len(blob):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", blob[pos:pos + 7])
        part, pos = part + blob[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(part))
            part = b""
    return records


@needs_wandb
def test_wandb_offline_run_holds_the_metrics_rows(tiny_model_dir, tmp_path, monkeypatch):
    """WANDB_MODE=offline, no account: one run "<run dir>/iter0" whose history equals metrics.jsonl exactly and
    whose config is the public flags (no password anywhere in the run's files)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    run(tiny_model_dir, tmp_path / "wb", "--report-to", "wandb")
    it_dir = tmp_path / "wb" / "iter0"
    logs = list((it_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1
    records = wandb_records(logs[0])
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert runs and runs[0].display_name == "wb/iter0" and runs[0].run_group == "wb"
    key = lambda item: item.key or ".".join(item.nested_key)  # noqa: E731  (W&B fills one or the other)
    config = {key(i): json.loads(i.value_json) for i in runs[0].config.update}
    assert config["judge_base_url"] == "http://judge.example:8000/v1" and config["report_to"] == "wandb"
    history = [{key(i): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    rows = read_jsonl(it_dir / "metrics.jsonl")
    assert [h["_step"] for h in history] == [r["step"] for r in rows]
    for h, r in zip(history, rows):
        assert {k: h[k] for k in r if k != "step"} == {k: v for k, v in r.items() if k != "step"}
    for f in (it_dir / "wandb").rglob("*"):
        assert not f.is_file() or SECRET_URL_PASSWORD.encode() not in f.read_bytes(), f


@pytest.mark.parametrize("kind", ["tensorboard", "wandb"])
def test_missing_library_stops_before_the_model_loads(kind, tiny_model_dir, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == kind else real(name, *a))
    monkeypatch.setattr(train.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit, match=f"--report-to {kind} needs the {kind} package: pip install {kind} ") as e:
        run(tiny_model_dir, tmp_path / "m", "--report-to", kind)
    assert "\n" not in str(e.value) and not (tmp_path / "m").exists()


@needs_wandb
def test_wandb_without_an_account_is_one_line(tmp_path, monkeypatch):
    """Online mode and no API key: wandb's refusal becomes one line naming the offline mode."""
    import wandb

    def refuse(**kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")
    monkeypatch.setattr(wandb, "init", refuse)
    monkeypatch.setenv("WANDB_API_KEY", "a-key-wandb-then-rejects")  # past tracking.require's credential check
    with pytest.raises(errors.Refusal, match=r"^--report-to wandb: No API key configured\..* WANDB_MODE=offline") as e:
        tracking.open_run("wandb", tmp_path / "run" / "iter0", {}, 0)
    assert "\n" not in str(e.value)
