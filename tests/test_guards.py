"""The run directory's guarantees (docs/pipeline.md "Guarantees"): one writer per run directory (a lock), no
writes through symbolic links, every input checked before the model loads, secrets masked in every form,
one-line errors for a full disk, malformed run-directory JSON, bad dataset lines and Ctrl-C, and ablate.py's
settings compared as settings. Real processes and real links on the tiny fixture model."""
import json
import os
import pathlib
import resource
import signal
import subprocess
import sys
import threading
import time

import matplotlib
import pytest

import ablate
import data
import diskspace
import errors
import eval as ev
import generate
import judge
import judge_http
import plots
import rundir
import runlock
import train
from conftest import fresh_copy, read_jsonl, tiny_flags
from fakechat import FAKE_KEY, FakeChat, records
from test_train_guards import URL, refused, stopped

ROOT = pathlib.Path(__file__).resolve().parent.parent


def cli(*args, env=None, **kw):
    """Start one of the project's scripts as its own process."""
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            **kw)


def one_line_failure(proc, *expected, timeout=120):
    """The process failed with one line on stderr (its last), no traceback, holding every expected string."""
    out, err = proc.communicate(timeout=timeout)
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert proc.returncode not in (0, None) and "Traceback" not in err, err[-3000:]
    assert all(e in last for e in expected), last
    return last


def holder(directory):
    """A real process that takes the lock of `directory` and sleeps; returns it once it holds the lock."""
    proc = cli("-c", f"import runlock, time; runlock.hold({str(directory)!r}, 'holder'); print('held', flush=True); "
                     f"time.sleep(120)")
    assert proc.stdout.readline().strip() == "held"
    return proc


# ----------------------------------------------------------------------------- 1. one writer per run directory
def test_second_train_on_a_run_dir_in_use_is_refused_and_the_first_finishes(tmp_path, tiny_model_dir):
    """train.py A holds the run directory (waiting on its judge); train.py B on the same directory stops in
    one line naming A's pid, host and command and touches nothing; A then finishes with steps 1..6 once each."""
    server = FakeChat()
    server.gate = threading.Event()
    run_dir = tmp_path / "run"
    flags = ["--iter", "0", *tiny_flags(run_dir, tiny_model_dir), "--judge", "openai", "--judge-base-url", server.url]
    try:
        first = cli("train.py", *flags)
        deadline = time.time() + 120
        while not sum(server.received.values()) and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)  # A is judging, inside its run directory, holding the lock
        assert first.poll() is None, first.communicate()[1][-3000:]
        before = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*"))
        second = cli("train.py", *flags)
        last = one_line_failure(second, f"{run_dir} is in use by pid {first.pid} on {os.uname().nodename} running "
                                        f"train.py (lock {run_dir / '.lock'})")
        assert last.startswith(f"train.py: {run_dir} is in use"), last  # runlock's Refusal, train.py's one prefix
        assert sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")) == before
        server.gate.set()
        out, err = first.communicate(timeout=180)
        assert first.returncode == 0, err[-3000:]
    finally:
        server.gate.set()
        server.close()
    assert [r["step"] for r in read_jsonl(run_dir / "iter0" / "metrics.jsonl")] == list(range(1, 7))
    assert json.loads((run_dir / "iter0" / "summary.json").read_text())["steps"] == 6


def test_lock_of_a_dead_process_is_taken_over(tmp_path, tiny_model_dir):
    """A holder killed with SIGKILL leaves .lock behind; the kernel released it, so the next run takes it over."""
    run_dir = tmp_path / "run"
    proc = holder(run_dir)
    refused(["--iter", "0", *tiny_flags(run_dir, tiny_model_dir)], f"in use by pid {proc.pid}")
    proc.kill()
    proc.wait()
    assert (run_dir / ".lock").exists()
    with pytest.raises(SystemExit, match="stopped after 1 steps"):
        train.main(["--iter", "0", *tiny_flags(run_dir, tiny_model_dir), "--stop-after-steps", "1"])
    assert (run_dir / ".lock").read_text().split()[0] == str(os.getpid())


@pytest.mark.parametrize("script", ["ablate.py", "noise_study.py"])
def test_second_study_on_one_out_is_refused(tmp_path, script):
    """ablate.py / noise_study.py on an --out another process holds: one line naming it, nothing written."""
    out = tmp_path / "out"
    proc = holder(out)
    try:
        last = one_line_failure(cli(script, "--out", out), f"{out} is in use by pid {proc.pid} on ")
        assert last.startswith(f"{script}: {out} is in use by pid {proc.pid} on ") and "running holder" in last, last
    finally:
        proc.kill()
        proc.wait()
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_figures_use_unique_temporary_files(tmp_path):
    """Two saves of one figure path at once (two writers) do not trip over one shared temporary name."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path = tmp_path / "logps.png"
    outer, inner = plt.figure(), plt.figure()
    real = outer.savefig

    def savefig(*a, **kw):  # while the outer save writes its temporary file, another save of the same path runs
        real(*a, **kw)
        plots._save(inner, path)
    outer.savefig = savefig
    assert plots._save(outer, path) == path and path.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logps.png"]


# ----------------------------------------------------------------------------- 2. no writes through links
def test_symlinked_metrics_is_refused_and_its_target_untouched(iter0_run, tmp_path):
    run_dir = fresh_copy(iter0_run, tmp_path)
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("keep me\nlast line without a newline")
    (run_dir / "iter1").mkdir()
    (run_dir / "iter1" / "metrics.jsonl").symlink_to(outside)
    refused(["--iter", "1", *tiny_flags(run_dir, "unused"), "--judge-base-url", URL],
            str(run_dir / "iter1" / "metrics.jsonl"), "symbolic link", "replace it with a regular file")
    assert outside.read_text() == "keep me\nlast line without a newline"
    assert not (run_dir / "iter1" / "generated.jsonl").exists(), "refused before any work"


def test_symlinked_judge_cache_is_refused(iter0_run, tmp_path):
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text("")
    link = tmp_path / "judge_cache.jsonl"
    link.symlink_to(outside)
    with pytest.raises(ValueError, match="symbolic link") as err:
        judge_http.ScoreCache(link)
    assert "\n" not in str(err.value) and str(link) in str(err.value)
    run_dir = fresh_copy(iter0_run, tmp_path)
    (run_dir / "judge_cache.jsonl").symlink_to(outside)
    refused(["--iter", "1", *tiny_flags(run_dir, "unused")], str(run_dir / "judge_cache.jsonl"), "symbolic link")
    assert outside.read_text() == ""


def test_appends_never_follow_a_link_and_atomic_writes_replace_it(tmp_path):
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text('{"a": 1}\npartial')
    link = tmp_path / "rows.jsonl"
    link.symlink_to(outside)
    for call in (lambda: data.open_append(link), lambda: data.drop_torn_line(link)):
        with pytest.raises(ValueError, match="symbolic link"):
            call()
    data.write_jsonl(link, [{"b": 2}])  # an atomic write replaces the link itself
    assert not link.is_symlink() and read_jsonl(link) == [{"b": 2}]
    assert outside.read_text() == '{"a": 1}\npartial'


# ----------------------------------------------------------------------------- 3. history inputs checked
def test_history_pairs_edited_since_their_label_stage_are_refused(iter0_run, tmp_path):
    run_dir = fresh_copy(iter0_run, tmp_path)
    pairs = run_dir / "iter0" / "pairs.jsonl"
    pairs.write_text("".join(pairs.read_text().splitlines(keepends=True)[:-1]))
    refused(["--iter", "1", *tiny_flags(run_dir, "unused"), "--history", "2"],
            f"{pairs} changed since the label stage wrote it", "--history 2")
    assert not (run_dir / "iter1" / "generated.jsonl").exists(), "refused before any work"


# ----------------------------------------------------------------------------- 4. flags checked before the model
def test_judge_settings_and_rule_answers_are_checked_before_the_model_loads(tmp_path, monkeypatch):
    """Refused at parse time: the base model does not even exist, and no run directory is made."""
    run_dir, no_model = tmp_path / "run", str(tmp_path / "no-model")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    refused(["--iter", "0", *tiny_flags(run_dir, no_model), "--judge", "openai"], "$OPENAI_API_KEY is not set")
    refused(["--iter", "0", *tiny_flags(run_dir, no_model), "--judge", "openai", "--judge-base-url", "file:///x"],
            "must start with http:// or https://")
    refused(["--iter", "0", *tiny_flags(run_dir, no_model), "--judge", "openai", "--judge-concurrency", "0",
             "--judge-base-url", URL], "--judge-concurrency must be > 0")
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(3)))
    refused(["--iter", "0", *tiny_flags(run_dir, no_model), "--data", str(plain)],
            "--judge rule needs an 'answer' field", f"{plain} record 1")
    assert not run_dir.exists()


# ----------------------------------------------------------------------------- 5. secrets masked in every form
def test_key_echoed_in_other_forms_never_reaches_judged_file(tmp_path, monkeypatch):
    """A server whose 400 repeats the key upper-cased, without its 'sk-' and in part: judge_error holds none of it."""
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    server = FakeChat()
    server.default = "echo400"
    try:
        j = judge.make_judge("openai", base_url=server.url, cache_path=tmp_path / "cache.jsonl")
        judge.judge_records(records(2), j, tmp_path / "judged.jsonl", max_missing=1.0, progress=False)
    finally:
        server.close()
    text = (tmp_path / "judged.jsonl").read_text()
    assert "judge_error" in text and "bad key" in text
    low, key = text.lower(), FAKE_KEY.lower()
    assert not any(key[i:i + judge_http.SECRET_PART] in low for i in range(len(key) - judge_http.SECRET_PART + 1))
    assert judge_http.redact(f"x {FAKE_KEY.upper()} y {FAKE_KEY[3:]} z", FAKE_KEY) == "x *** y *** z"


# ----------------------------------------------------------------------------- 6. a full disk in one line
def test_full_disk_before_a_checkpoint_is_one_line(iter0_run, tmp_path, monkeypatch):
    """Too little room for state.pt: refused before writing, naming the file and the bytes it needs."""
    run_dir = fresh_copy(iter0_run, tmp_path)
    real = diskspace.shutil.disk_usage
    monkeypatch.setattr(diskspace.shutil, "disk_usage", lambda p: real(p)._replace(free=100_000))
    with pytest.raises(SystemExit) as err:  # diskspace's OSError, one line from train.main
        train.main(["--iter", "1", *tiny_flags(run_dir, "unused"), "--judge-base-url", URL])
    message = str(err.value)
    assert message.startswith("train.py: ") and "\n" not in message and str(run_dir / "iter1" / "checkpoint" / "state.pt") in message
    assert "writing it needs " in message and "97.7 KiB free" in message


def test_disk_filling_up_mid_write_is_one_line(tmp_path, tiny_model_dir):
    """A real process whose writes fail past 150 KiB (RLIMIT_FSIZE: the kernel's EFBIG, as a full disk's
    ENOSPC): train.py prints one line naming state.pt and the bytes it needs, no torch traceback."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))
    proc = cli("train.py", "--iter", "0", *tiny_flags(tmp_path / "run", tiny_model_dir), preexec_fn=limit)
    one_line_failure(proc, "train.py: ", str(tmp_path / "run" / "iter0" / "checkpoint" / "state.pt"), "needs")


# ----------------------------------------------------------------------------- 7. malformed run-directory JSON
@pytest.mark.parametrize("content, expected", [
    ('{"generate": "x"}', "field 'generate' must be an object"),
    (None, "field generate.flags must be an object, got list"),
])
def test_stage_records_of_the_wrong_type_are_one_line(iter0_run, tmp_path, content, expected):
    run_dir = fresh_copy(iter0_run, tmp_path)
    path = run_dir / "iter0" / "stages.json"
    if content is None:
        records_ = json.loads(path.read_text())
        records_["generate"]["flags"] = [1, 2]
        content = json.dumps(records_)
    path.write_text(content)
    base_model = json.loads((run_dir / "iter0" / "config.json").read_text())["base_model"]
    refused(["--iter", "0", *tiny_flags(run_dir, base_model)], str(path), expected)


@pytest.mark.parametrize("content, expected", [("[]", "expected a JSON object, got list"),
                                               ("{garbage", "not valid JSON")])
def test_summary_of_the_wrong_type_is_one_line(iter0_run, tmp_path, content, expected):
    run_dir = fresh_copy(iter0_run, tmp_path)
    (run_dir / "iter0" / "summary.json").write_text(content)
    base_model = json.loads((run_dir / "iter0" / "config.json").read_text())["base_model"]
    refused(["--iter", "0", *tiny_flags(run_dir, base_model)], str(run_dir / "iter0" / "summary.json"), expected)


@pytest.mark.parametrize("row", [{"iter": 1, "step": "x", "epoch": 0}, {"iter": 1, "epoch": 0}])
def test_metrics_rows_without_an_integer_step_are_one_line(iter0_run, tmp_path, row):
    it1 = stopped(fresh_copy(iter0_run, tmp_path))
    rows = read_jsonl(it1 / "metrics.jsonl")
    (it1 / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [rows[0], row]))
    refused(["--iter", "1", *tiny_flags(tmp_path / "run", "unused"), "--judge-base-url", URL],
            f"{it1 / 'metrics.jsonl'} row 2: field 'step' must be an integer >= 1")


@pytest.mark.parametrize("kind", ["number", "directory"])
def test_config_of_the_wrong_type_is_one_line_in_eval(iter0_run, tmp_path, kind):
    run_dir = fresh_copy(iter0_run, tmp_path)
    path = run_dir / "iter0" / "config.json"
    if kind == "number":
        path.write_text('{"base_model": 5}')
    else:
        path.unlink()
        path.mkdir()
    with pytest.raises(SystemExit) as err:
        ev.main(["score", str(run_dir), "--max-prompts", "2"])
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert ("field 'base_model'" if kind == "number" else "is a directory") in message


# ----------------------------------------------------------------------------- 8. bad dataset lines
@pytest.mark.parametrize("line, expected", [("[" * 100_000, ":2: JSON nested too deeply"),
                                            ('{"prompt": "q \\ud800", "response": "r"}', ":2: invalid Unicode")])
def test_deep_nesting_and_lone_surrogates_are_refused_before_the_model_loads(tmp_path, line, expected):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "p", "response": "r", "answer": "1"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=expected):
        data.load_records(path)
    refused(["--iter", "0", *tiny_flags(tmp_path / "run", str(tmp_path / "no-model")), "--data", str(path)],
            f"{path}{expected}")
    assert data.read_jsonl(_write(tmp_path / "pair.jsonl", '{"a": "\\ud83d\\ude00"}\n')) == [{"a": "😀"}]


def _write(path, text):
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- 9. Ctrl-C in every CLI
def test_ctrl_c_during_eval_score_is_one_line(iter0_run, tmp_path):
    """A real SIGINT to a real `eval.py score` process while it generates. The tiny model answers 200 prompts in
    under a second, faster than a signal can be aimed, so generation waits at a gate (a wrapper that announces
    itself and sleeps before the real call) and the signal arrives there. The child gets SIGINT's default
    disposition, as under a terminal: a test run started in the background (`cmd &` in a script) inherits
    SIGINT ignored, and Python then never raises KeyboardInterrupt at all."""
    run_dir = fresh_copy(iter0_run, tmp_path)
    code = ("import sys, time, eval, generate\n"
            "real = generate.generate_answers\n"
            "def gated(*a, **k):\n"
            "    print('gate: generating', file=sys.stderr, flush=True); time.sleep(60); return real(*a, **k)\n"
            "generate.generate_answers = gated\n"
            f"eval.main(['score', {str(run_dir)!r}, '--max-prompts', '200'])\n")
    proc = cli("-c", code, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = ""
    while "gate: generating" not in seen:
        line = proc.stderr.readline()
        assert line, seen
        seen += line
    proc.send_signal(signal.SIGINT)
    one_line_failure(proc, "eval.py score: interrupted")


def test_ctrl_c_in_generate_is_one_line(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(generate, "generate_answers", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit, match="generate.py: interrupted") as err:
        generate.main(["--model", tiny_model_dir, "--out", str(tmp_path / "g.jsonl"), "--max-prompts", "2"])
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- 10. settings, not an ordered list
def test_ablate_train_flags_compare_as_settings(tmp_path):
    first = ablate.parse_args(["--out", str(tmp_path), "--", "--max-prompts", "6", "--epochs", "1"])
    ablate.check_settings(first, write=True)
    for flags in (["--epochs", "1", "--max-prompts", "6"], ["--epochs=1", "--max-prompts", "6"]):
        ablate.check_settings(ablate.parse_args(["--out", str(tmp_path), "--", *flags]), write=True)
    with pytest.raises(errors.Refusal, match="train_flags"):
        ablate.check_settings(ablate.parse_args(["--out", str(tmp_path), "--", "--epochs", "2", "--max-prompts", "6"]),
                              write=True)


def test_runlock_is_reentrant_in_one_process(tmp_path):
    assert runlock.hold(tmp_path, "x") == runlock.hold(tmp_path, "x") == tmp_path / ".lock"
    assert rundir.read_metrics(tmp_path / "none.jsonl") == []
