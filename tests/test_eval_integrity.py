"""eval.py never reports a number that was not made from what it names (issue 26): cached evaluations keyed by
the model's weights, the prompts and the settings; compare refusing different questions or settings; every flag
checked before a model loads or a file is written; one writer per directory; report.md embedding only figures
made from the current data. Each test fails on the code before the fix it names."""
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import eval as ev
import generate
import harness
import model as model_lib
import stages
from conftest import make_tiny_model, make_tiny_tokenizer
from data import load_prompts, read_json, read_jsonl, write_json, write_jsonl
from test_eval import is_png, judged_rows, make_run

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    """A second tiny model: the same shapes and tokenizer as tiny_model_dir, other weights. Its final norm is zero,
    so every logit is 0 and greedy decoding answers "!!!!" (token 0), where tiny_model_dir answers ""."""
    path = tmp_path_factory.mktemp("other-model")
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(tokenizer, seed=1)
    model.model.norm.weight.data.zero_()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def tiny_run(root, base, models):
    """A run directory whose iter{k}/model are copies of `models[k]` (what train.py leaves, minus the rest)."""
    run = root / "run"
    for k, src in models.items():
        write_json(run / f"iter{k}" / "config.json", {"iter": k, "base_model": base, "max_new_tokens": 4, "data": None})
        shutil.copytree(src, run / f"iter{k}" / "model")
    return run


def retrain(run, k, src):
    """The documented way to redo an iteration: delete iter{k}, train it again (here: from another start model)."""
    shutil.rmtree(run / f"iter{k}")
    write_json(run / f"iter{k}" / "config.json", {"iter": k, "base_model": "x", "max_new_tokens": 4, "data": None})
    shutil.copytree(src, run / f"iter{k}" / "model")


SCORE = ["--max-prompts", "2", "--skip", "base"]


# ----------------------------------------------------------------------------- 1. results keyed by what made them

def test_score_rescores_a_model_whose_weights_changed(tmp_path, tiny_model_dir, other_model_dir, capsys):
    """Score R, retrain R/iter1 from another model, score again: iter1 is re-scored (one line says why) and its
    answers are the new model's, not the cached ones (before: "iter1: cached" with the old model's answers)."""
    run = tiny_run(tmp_path, tiny_model_dir, {1: tiny_model_dir})
    ev.main(["score", str(run), *SCORE])
    old = [r["generated"] for r in read_jsonl(run / "eval" / "iter1_generated.jsonl")]
    retrain(run, 1, other_model_dir)
    capsys.readouterr()
    scores = ev.main(["score", str(run), *SCORE])
    err = capsys.readouterr().err
    assert "iter1: weights changed since cached; re-scoring" in err and "iter1: cached" not in err
    direct = ev.main(["score", other_model_dir, "--max-prompts", "2", "--max-new-tokens", "4",
                      "--out-dir", str(tmp_path / "direct")])
    new = [r["generated"] for r in read_jsonl(run / "eval" / "iter1_judged.jsonl")]
    assert new == [r["generated"] for r in read_jsonl(tmp_path / "direct" / "model_judged.jsonl")] == ["!!!!"] * 2
    assert old == [""] * 2
    key = scores["models"]["iter1"]["key"]
    assert key["model"]["sha256"] == stages.sha256_dir(run / "iter1" / "model")
    assert key["prompts_sha256"] == stages.sha256_json(load_prompts(None, split="eval", max_prompts=2))
    assert scores["models"]["iter1"]["mean_score"] == direct["models"]["model"]["mean_score"]
    capsys.readouterr()
    ev.main(["score", str(run), *SCORE])  # unchanged weights: cached
    assert "iter1: cached" in capsys.readouterr().err


def test_report_and_plots_refuse_scores_of_a_retrained_iteration(tmp_path, tiny_model_dir, other_model_dir):
    """Score R, retrain R/iter1: `report` and `plots` stop in one line naming iter1 and the rerun (before: the
    report tabulated the old weights' numbers as iter1's); once `score` reran, both run; a deleted iteration
    likewise."""
    run = tiny_run(tmp_path, tiny_model_dir, {1: tiny_model_dir})
    ev.main(["score", str(run), *SCORE])
    ev.main(["report", str(run)])  # current: fine
    retrain(run, 1, other_model_dir)
    for command in (["report", str(run)], ["plots", str(run)]):
        with pytest.raises(SystemExit) as err:
            ev.main(command)
        message = str(err.value)
        assert "\n" not in message and "iter1: weights changed since cached" in message, message
        assert f"python eval.py score {run}" in message and "base" not in message.split("(")[1]
    ev.main(["score", str(run), *SCORE])
    assert ev.main(["report", str(run)]).is_file()
    shutil.rmtree(run / "iter1" / "model")
    with pytest.raises(SystemExit, match="iter1: its model no longer exists"):
        ev.main(["report", str(run)])


def test_score_never_resumes_answers_of_unknown_origin(tmp_path, tiny_model_dir, capsys):
    """Answers left in eval/ without a recorded identity (an interrupted evaluation of an older model) are
    removed before generating (before: generate.py's resume took them as this model's answers)."""
    run = tiny_run(tmp_path, tiny_model_dir, {1: tiny_model_dir})
    records = load_prompts(None, split="eval", max_prompts=2)
    write_jsonl(run / "eval" / "iter1_generated.jsonl", [
        {"id": r["id"], "prompt": r["prompt"], "human": r["response"], "generated": "STALE", "answer": r["answer"]}
        for r in records])
    scores = ev.main(["score", str(run), *SCORE])
    assert "iter1: no model identity recorded" in capsys.readouterr().err
    assert all(r["generated"] != "STALE" for r in read_jsonl(run / "eval" / "iter1_judged.jsonl"))
    assert scores["models"]["iter1"]["n"] == 2


def test_score_resumes_an_interrupted_evaluation_of_the_same_model(tmp_path, tiny_model_dir, monkeypatch):
    """Ctrl-C after generation: the rerun keeps the answers (same weights, prompts and settings) and does not
    generate again."""
    run = tiny_run(tmp_path, tiny_model_dir, {1: tiny_model_dir})

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(ev, "judge_records", interrupted)
    with pytest.raises(SystemExit, match="interrupted"):
        ev.main(["score", str(run), *SCORE])
    answers = read_jsonl(run / "eval" / "iter1_generated.jsonl")
    monkeypatch.undo()

    def no_generation(*args, **kwargs):
        raise AssertionError("the same model's answers must be resumed, not generated again")
    monkeypatch.setattr(generate, "_generate_hf", no_generation)
    scores = ev.main(["score", str(run), *SCORE])
    assert [r["generated"] for r in read_jsonl(run / "eval" / "iter1_judged.jsonl")] == [r["generated"] for r in answers]
    assert scores["models"]["iter1"]["n"] == 2 and not scores["started"]


def test_score_rescores_when_the_prompt_file_changed(tmp_path, tiny_model_dir, capsys):
    """--data FILE rewritten with other prompts under the same ids (same path, same flags): re-scored."""
    run = tiny_run(tmp_path, tiny_model_dir, {1: tiny_model_dir})
    held_out = tmp_path / "held_out.jsonl"
    write_jsonl(held_out, [{"id": "q1", "prompt": "What is 2 + 2?", "response": "4", "answer": "4"},
                           {"id": "q2", "prompt": "What is 3 + 3?", "response": "6", "answer": "6"}])
    ev.main(["score", str(run), "--data", str(held_out), "--skip", "base"])
    write_jsonl(held_out, [{"id": "q1", "prompt": "Name a colour.", "response": "red", "answer": "red"},
                           {"id": "q2", "prompt": "What is 3 + 3?", "response": "6", "answer": "6"}])
    capsys.readouterr()
    ev.main(["score", str(run), "--data", str(held_out), "--skip", "base"])
    assert "iter1: prompts changed since cached; re-scoring" in capsys.readouterr().err
    assert read_jsonl(run / "eval" / "iter1_judged.jsonl")[0]["prompt"] == "Name a colour."


def test_score_drops_cached_rows_of_models_gone_or_retrained_and_skipped(tmp_path, tiny_model_dir, other_model_dir,
                                                                         capsys):
    """A cached row is never printed for a model that no longer exists, nor for a skipped model whose weights
    changed: both are dropped with one line each, and their answers removed."""
    run = tiny_run(tmp_path, tiny_model_dir, {0: tiny_model_dir, 1: tiny_model_dir})
    ev.main(["score", str(run), *SCORE])
    shutil.rmtree(run / "iter1")
    retrain(run, 0, other_model_dir)
    capsys.readouterr()
    scores = ev.main(["score", str(run), "--max-prompts", "2", "--skip", "base", "iter0"])
    err = capsys.readouterr().err
    assert "iter1: its model no longer exists; its cached scores are dropped" in err
    assert "iter0: weights changed since cached; its cached scores are dropped" in err
    assert scores["models"] == {} and not list((run / "eval").glob("iter*_judged.jsonl"))


def test_compare_refuses_held_out_answers_of_a_retrained_iteration(tmp_path, tiny_model_dir, other_model_dir):
    """compare RUN_A RUN_B --iter 1 reads eval/iter1_judged.jsonl: refused in one line once iter1 was retrained
    after it was scored (before: the old model's answers were compared)."""
    run = tiny_run(tmp_path, tiny_model_dir, {1: tiny_model_dir})
    ev.main(["score", str(run), *SCORE])
    assert ev.main(["compare", str(run), str(run), "--iter", "1"])["n"] == 2
    retrain(run, 1, other_model_dir)
    with pytest.raises(SystemExit, match=r"eval.py compare: .*iter1_judged.jsonl was not made by the weights now in "
                                         r".*weights changed since cached.*eval.py score") as e:
        ev.main(["compare", str(run), str(run), "--iter", "1"])
    assert "\n" not in str(e.value)


def test_logps_recomputed_for_a_retrained_iteration(tmp_path, tiny_model_dir, other_model_dir, capsys):
    """`eval.py logps` skips an iteration whose log-probs exist only while its model's weights are those they
    were computed with (before: "exists, skipped" after iter0 was retrained)."""
    run = tmp_path / "run"
    config = {"iter": 0, "base_model": tiny_model_dir, "data": None, "max_prompts": 4, "max_new_tokens": 4,
              "seed": 0, "max_length": 160, "max_prompt_length": 96}
    write_json(run / "iter0" / "config.json", config)
    shutil.copytree(tiny_model_dir, run / "iter0" / "model")
    ev.main(["logps", str(run), "--n", "2"])
    assert [r["generated"] for r in read_jsonl(run / "eval" / "logps_iter0.jsonl")] == [""] * 2
    ev.main(["logps", str(run), "--n", "2"])
    assert "logps_iter0.jsonl exists, skipped" in capsys.readouterr().err  # the same weights: kept
    shutil.rmtree(run / "iter0")
    write_json(run / "iter0" / "config.json", config)
    shutil.copytree(other_model_dir, run / "iter0" / "model")
    ev.main(["logps", str(run), "--n", "2"])
    assert "iter0: weights changed since cached; recomputing its log-probs" in capsys.readouterr().err
    assert [r["generated"] for r in read_jsonl(run / "eval" / "logps_iter0.jsonl")] == ["!!!!"] * 2


def fake_lm_eval(monkeypatch, calls):
    """lm_eval "installed" and run by a stand-in that writes a results file where lm_eval would."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "lm_eval" else real(name, *a))

    def run(cmd, env=None):
        out = Path(cmd[cmd.index("--output_path") + 1])
        calls.append(cmd)
        write_json(out / "model" / "results_1.json", {"results": {harness.LOCAL_TASK: {
            "exact_match,first-line": 0.25, "exact_match,last-word": 0.5}}})
        return subprocess.CompletedProcess(cmd, 0)
    monkeypatch.setattr(harness.subprocess, "run", run)


def test_benchmarks_rerun_lm_eval_when_the_model_changed(tmp_path, tiny_model_dir, other_model_dir, monkeypatch,
                                                         capsys):
    """benchmarks results are keyed by the weights: same model, skipped; new weights in the same directory,
    lm_eval runs again (before: "results already in ...", the old model's numbers)."""
    calls = []
    fake_lm_eval(monkeypatch, calls)
    model_dir = tmp_path / "m" / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    ev.main(["benchmarks", str(model_dir), "--local-task"])
    ev.main(["benchmarks", str(model_dir), "--local-task"])
    assert len(calls) == 1 and "results already in" in capsys.readouterr().err
    shutil.rmtree(model_dir)
    shutil.copytree(other_model_dir, model_dir)
    table = ev.main(["benchmarks", str(model_dir), "--local-task"])
    assert len(calls) == 2 and "model demo: weights changed since cached; re-running lm_eval" in capsys.readouterr().err
    key = read_json(tmp_path / "m" / "benchmarks" / "demo" / harness.KEY_FILE)
    assert key["model"]["sha256"] == stages.sha256_dir(model_dir) == table["model"]["identity"]["sha256"]


# ----------------------------------------------------------------------------- 2. compare pairs the same questions

def with_answers(rows, answer="4"):
    return [{**r, "answer": answer} for r in rows]


def test_compare_refuses_one_id_on_two_different_prompts(tmp_path):
    """Two eval files whose ids coincide but whose prompts differ: no win/tie/loss table, one line naming both
    files and the first differing id (before: "4 prompts scored on both sides")."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_jsonl(a, with_answers(judged_rows([10, 1, 10, 5], [0] * 4)))
    write_jsonl(b, with_answers([{**r, "prompt": f"another question {r['id']}"}
                                 for r in judged_rows([1, 1, 1, 1], [0] * 4)]))
    for call in (ev.compare, ev.accuracy_vs):
        with pytest.raises(ValueError, match=f"{a} and {b} hold different prompts under id 'a'"):
            call(a, b)
    with pytest.raises(SystemExit, match="eval.py compare: .* different prompts under id 'a'") as e:
        ev.main(["compare", str(a), str(b)])
    assert "\n" not in str(e.value)


def test_compare_refuses_one_id_with_two_different_reference_answers(tmp_path):
    """The same prompt text with another reference "answer" (or human answer) is another question too."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_jsonl(a, with_answers(judged_rows([10, 1, 10, 5], [0] * 4), "4"))
    write_jsonl(b, with_answers(judged_rows([1, 1, 1, 1], [0] * 4), "5"))
    with pytest.raises(ValueError, match="different answers under id 'a'"):
        ev.accuracy_vs(a, b)
    write_jsonl(b, [{**r, "human": "other"} for r in judged_rows([1, 1, 1, 1], [0] * 4)])
    with pytest.raises(ValueError, match="different humans under id 'a'"):
        ev.compare(tmp_path / "a.jsonl", b)


def test_compare_refuses_runs_scored_with_other_settings(tmp_path):
    """Both sides' eval/scores.json name their settings: another max_new_tokens is refused in one line naming
    both files and the setting; another --max-prompts only changes which ids are shared, and is paired."""
    a, b = make_run(tmp_path, "a"), make_run(tmp_path, "b")
    for run, scores in ((a, [10, 1, 10, 5]), (b, [1, 1, 1, 1])):
        write_jsonl(run / "eval" / "iter1_judged.jsonl", judged_rows(scores, [0] * 4))
    settings = read_json(b / "eval" / "scores.json")
    write_json(b / "eval" / "scores.json", {**settings, "settings": {**settings["settings"], "max_prompts": 3}})
    fa, fb = a / "eval" / "iter1_judged.jsonl", b / "eval" / "iter1_judged.jsonl"
    assert ev.compare(fa, fb)["n"] == 4
    write_json(b / "eval" / "scores.json", {**settings, "settings": {**settings["settings"], "max_new_tokens": 16}})
    with pytest.raises(SystemExit, match=f"eval.py compare: {fa} and {fb} were scored with different settings: "
                                         f"max_new_tokens 8 .* vs 16") as e:
        ev.main(["compare", str(fa), str(fb)])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="max_new_tokens"):
        ev.accuracy_vs(fa, fb)


# ----------------------------------------------------------------------------- 3. flags checked first

BAD_FLAGS = [
    (["score", "RUN", "--max-prompts", "0"], "--max-prompts must be > 0, got 0"),
    (["score", "RUN", "--max-prompts", "-1"], "--max-prompts must be > 0, got -1"),
    (["score", "RUN", "--batch-size", "0"], "--batch-size must be > 0, got 0"),
    (["score", "RUN", "--batch-size", "-2"], "--batch-size must be > 0, got -2"),
    (["score", "RUN", "--max-new-tokens", "0"], "--max-new-tokens must be > 0"),
    (["score", "RUN", "--seed", "-1"], "--seed must be ≥ 0"),
    (["score", "RUN", "--device", "tpu"], "--device must be cpu, cuda, cuda:N or mps, got 'tpu'"),
    (["score", "RUN", "--skip", "bsae"], "--skip must be base, iter{k} or model, got 'bsae'"),
    (["score", "RUN", "--judge", "hf"], "--judge hf needs --judge-model"),
    (["compare", "RUN", "RUN", "--iter", "1", "--bootstrap", "0"], "--bootstrap must be > 0, got 0"),
    (["compare", "RUN", "RUN", "--iter", "-1"], "--iter must be ≥ 0"),
    (["logps", "RUN", "--n", "0"], "--n must be > 0"),
    (["logps", "RUN", "--batch-size", "0"], "--batch-size must be > 0"),
    (["benchmarks", "RUN", "--limit", "0"], "--limit must be > 0"),
    (["benchmarks", "RUN", "--batch-size", "0"], "--batch-size must be a positive integer, 'auto' or 'auto:N'"),
]


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=[" ".join(a[:1] + a[2:]) for a, _ in BAD_FLAGS])
def test_bad_flags_are_refused_in_one_line_before_any_work(argv, message, tmp_path, tiny_model_dir, monkeypatch):
    """Non-positive counts, an unknown device or model name: one line at parse time, before a model loads
    (load_model fails the test) or anything is written (before: --max-prompts 0 cached an n = 0 table,
    --batch-size 0 failed after the model loaded, --bootstrap 0 raised IndexError)."""
    run = tiny_run(tmp_path, tiny_model_dir, {1: tiny_model_dir})
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")
    monkeypatch.setattr(model_lib, "load_model", no_load)
    with pytest.raises(SystemExit) as e:
        ev.main([str(run) if a == "RUN" else a for a in argv])
    assert str(e.value).startswith(f"eval.py {argv[0]}: ") and message in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_bad_flag_from_the_shell_is_one_line_without_usage(tmp_path):
    proc = subprocess.run([sys.executable, "eval.py", "score", str(tmp_path), "--max-prompts", "0"], cwd=ROOT,
                          capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0 and proc.stderr.strip() == \
        "eval.py score: --max-prompts must be > 0, got 0 (see --help)"


# ----------------------------------------------------------------------------- 4. one writer per directory

def holder(directory):
    """A real process holding runlock's lock on `directory` (as a running eval.py would)."""
    proc = subprocess.Popen([sys.executable, "-c", f"import runlock, time; runlock.hold({str(directory)!r}, 'holder'); "
                             f"print('held', flush=True); time.sleep(120)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


LOCKED = [  # subcommand, the directory it writes (relative to the run), extra flags
    ("score", "eval", ["--max-prompts", "2"]),
    ("similarity", "eval", []),
    ("logps", "eval", []),
    ("plots", "plots", []),
    ("report", "plots", []),
    ("benchmarks", "eval/benchmarks", ["--local-task"]),
]


@pytest.mark.parametrize("command, held, flags", LOCKED, ids=[c for c, _, _ in LOCKED])
def test_a_directory_in_use_is_refused_before_anything_is_written(command, held, flags, tmp_path, tiny_model_dir,
                                                                  monkeypatch):
    """Another process holds the directory a subcommand writes: it stops with runlock's one line naming the
    holder's pid, having written nothing (before: eval.py took no lock; two `score` on one --out-dir, one
    died on a vanished .partial file)."""
    run = make_run(tmp_path)
    shutil.rmtree(run / "iter1" / "model")  # make_run's stand-in
    shutil.copytree(tiny_model_dir, run / "iter1" / "model")
    write_json(run / "iter0" / "config.json", {**read_json(run / "iter0" / "config.json"), "base_model": tiny_model_dir})
    fake_lm_eval(monkeypatch, [])
    (run / held).mkdir(parents=True, exist_ok=True)
    proc = holder(run / held)
    try:
        before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
        with pytest.raises(SystemExit, match=f"eval.py {command}: {run / held} is in use by pid {proc.pid}") as e:
            ev.main([command, str(run), *flags])
        assert "\n" not in str(e.value)
        assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before
    finally:
        proc.kill()
        proc.wait()


def test_the_hf_judge_model_loads_only_after_the_lock_and_only_when_needed(tmp_path, tiny_model_dir, monkeypatch):
    """`score --judge hf` builds its judge (which loads a model) after the directory is locked and only when a
    model is to be judged: a held directory is refused without loading it."""
    import judge

    def no_load(*args, **kwargs):
        raise AssertionError("the hf judge's model was loaded")
    monkeypatch.setattr(judge, "HFJudge", no_load)
    run = tiny_run(tmp_path, tiny_model_dir, {1: tiny_model_dir})
    proc = holder(run / "eval")
    try:
        with pytest.raises(SystemExit, match=f"{run / 'eval'} is in use by pid {proc.pid}"):
            ev.main(["score", str(run), "--judge", "hf", "--judge-model", tiny_model_dir, *SCORE])
    finally:
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------------------- 5. report.md shows current figures

def test_report_embeds_only_figures_made_from_the_current_data(tmp_path):
    """eval/ removed and plots/scores.png corrupted after a report: the next report embeds neither scores.png nor
    the stagnation figure (their data is gone; both files are deleted), and every figure it embeds is a whole
    PNG made in this call (before: the stale, corrupt scores.png was embedded)."""
    run = make_run(tmp_path)
    ev.main(["report", str(run)])
    text = (run / "report.md").read_text()
    assert "plots/scores.png" in text and "plots/stagnation.png" in text
    shutil.rmtree(run / "eval")
    (run / "plots" / "scores.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (run / "plots" / "losses.png").write_bytes(b"not a png")
    ev.main(["report", str(run)])
    text = (run / "report.md").read_text()
    links = [line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert sorted(links) == ["plots/logps.png", "plots/logps_per_token.png", "plots/losses.png", "plots/margins.png"]
    assert all(is_png(run / link) for link in links)
    assert not (run / "plots" / "scores.png").exists() and not (run / "plots" / "stagnation.png").exists()
