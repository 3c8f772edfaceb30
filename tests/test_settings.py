"""One name per setting in every command (issue 27): the judge's settings (judge.SETTINGS, judge.add_judge_flags)
and the generation settings (cli.add_generation_flags) have the same flags, defaults and help in train.py,
judge.py and eval.py score, and every judge setting given on a command line reaches the judge that command
builds (make_judge) and judge_records."""
import argparse
import types

import pytest

import cli
import config
import data
import eval as ev
import judge
import train
from test_docs_commands import flags_of, parser_of

# a value other than the default for every judge setting (judge.SETTINGS), and the make_judge keyword it becomes
GIVEN = {"--judge": "openai", "--judge-model": "m", "--judge-base-url": "http://127.0.0.1:9/v1", "--judge-scale": "100",
         "--judge-mode": "single", "--judge-concurrency": "3", "--judge-timeout": "7.5", "--judge-max-retries": "2",
         "--judge-max-retry-wait": "11", "--judge-max-tokens": "40", "--judge-api-key-env": "MY_JUDGE_KEY",
         "--judge-batch-size": "5", "--judge-max-missing": "0.5"}
EXPECTED = dict(model="m", base_url="http://127.0.0.1:9/v1", scale=100, mode="single", concurrency=3, timeout=7.5,
                max_retries=2, max_retry_wait=11.0, max_tokens=40, api_key_env="MY_JUDGE_KEY", batch_size=5)
ARGV = [x for flag, value in GIVEN.items() for x in (flag, value)]


class Built(Exception):  # not a ValueError: no command turns it into a one-line exit
    pass


@pytest.fixture
def seen(monkeypatch):
    """make_judge's keywords, recorded; the command stops there."""
    out = {}

    def make_judge(kind, **kw):
        out.update(kw, kind=kind)
        raise Built
    monkeypatch.setattr(judge, "make_judge", make_judge)
    return out


def judge_flags(parser):
    """{flag: action} of the visible --judge-* flags of a parser (its subcommands' included)."""
    return {o: a for o, a in flags_of(parser).items() if o.startswith("--judge") and a.help != argparse.SUPPRESS}


def test_the_judge_settings_have_one_name_default_and_help_in_every_command():
    """`python train.py --help`, `python judge.py --help` and `python eval.py score --help` show the same --judge-*
    flags, each with the same default (but --judge and --judge-model, which train.py's preset sets) and help."""
    parsers = {"train.py": parser_of("train.py", ["--iter", "1"])[0], "judge.py": parser_of("judge.py", [])[0],
               "eval.py score": parser_of("eval.py", ["score", "x"])[0]}
    flags = {name: judge_flags(p) for name, p in parsers.items()}
    declared = [setting[0] for setting in judge.SETTINGS]
    assert all(list(f) == declared for f in flags.values()), {n: list(f) for n, f in flags.items()}
    for flag in declared:
        actions = [f[flag] for f in flags.values()]
        assert len({(a.dest, getattr(a.type, "__name__", None), str(a.choices), a.help) for a in actions}) == 1, flag
        assert "%(default)s" in actions[0].help, flag
        if flag not in ("--judge", "--judge-model"):
            assert len({a.default for a in actions}) == 1, flag
    assert "(default 8)" in " ".join(parsers["train.py"].format_help().split())  # --judge-concurrency


def test_the_generation_settings_have_train_py_names_in_eval_py():
    """--max-new-tokens and --gen-batch-size are declared once (cli.add_generation_flags) for train.py and
    eval.py score; eval.py's older --batch-size still sets the generation batch, hidden from --help."""
    train_flags = flags_of(parser_of("train.py", ["--iter", "1"])[0])
    score = parser_of("eval.py", ["score", "x"])[0]
    for flag in ("--max-new-tokens", "--gen-batch-size"):
        assert train_flags[flag].help.split(" (default")[0] == flags_of(score)[flag].help.split(" (default")[0]
        assert train_flags[flag].type is flags_of(score)[flag].type is cli.POSITIVE_INT
    assert ev.parse_args(["score", "x", "--batch-size", "3"]).gen_batch_size == 3
    assert ev.parse_args(["score", "x"]).gen_batch_size is None  # the run's (test_eval.py), else 8
    assert "--batch-size" not in score.format_help()
    with pytest.raises(SystemExit, match="--batch-size must be > 0, got 0"):
        ev.parse_args(["score", "x", "--batch-size", "0"])


def test_judge_py_keeps_its_older_spellings_hidden():
    old = ["--concurrency", "3", "--timeout", "7.5", "--max-retries", "2", "--max-retry-wait", "11", "--max-tokens",
           "40", "--api-key-env", "MY_JUDGE_KEY", "--batch-size", "5", "--max-missing", "0.5"]
    new = [x for flag in ("--judge-concurrency", "--judge-timeout", "--judge-max-retries", "--judge-max-retry-wait",
                          "--judge-max-tokens", "--judge-api-key-env", "--judge-batch-size", "--judge-max-missing")
           for x in (flag, GIVEN[flag])]
    files = ["--in", "a", "--out", "b"]
    assert vars(judge.parse_args(files + old)) == vars(judge.parse_args(files + new))
    help_text = parser_of("judge.py", [])[0].format_help()
    assert "--max-retries" not in help_text.replace("--judge-max-retries", "")
    with pytest.raises(SystemExit, match="--judge-max-missing must be in \\[0, 1\\], got 1.5"):
        judge.parse_args(files + ["--judge-max-missing", "1.5"])


def test_every_judge_setting_reaches_the_judge_of_judge_py(seen, tmp_path, monkeypatch):
    monkeypatch.setattr(judge, "judge_records", lambda *a, **kw: seen.update(records=kw) or ([], {}))
    data.write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "p", "human": "h", "generated": "g"}])
    with pytest.raises(Built):
        judge.main(["--in", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl"), *ARGV])
    assert seen == dict(EXPECTED, kind="openai", cache_path=None, device=None)


def test_every_judge_setting_reaches_the_judge_of_eval_py_score(seen, tmp_path):
    with pytest.raises(Built):
        ev.main(["score", "some/hub-model", "--out-dir", str(tmp_path / "eval"), *ARGV])
    assert {k: seen[k] for k in EXPECTED} == EXPECTED and seen["kind"] == "openai"


def test_every_judge_setting_reaches_train_py_s_judge_check(seen):
    """config.check_judge (before the model loads) builds the judge from every setting."""
    with pytest.raises(Built):
        config.check_judge(config.parse_args(["--iter", "1", *ARGV]))
    assert {k: seen[k] for k in EXPECTED} == EXPECTED and seen["kind"] == "openai"


def test_every_judge_setting_reaches_train_py_s_judge_stage(seen, tmp_path):
    args = config.parse_args(["--iter", "1", "--run-dir", str(tmp_path), *ARGV])
    it_dir = tmp_path / "iter1"
    data.write_jsonl(it_dir / "generated.jsonl", [{"id": "a", "prompt": "p", "human": "h", "generated": "g"}])
    it = types.SimpleNamespace(args=args, it_dir=it_dir, run_dir=tmp_path, main_proc=True,
                               flags={"judge": {"judge": "openai"}, "label": {"dsl": True}})
    with pytest.raises(Built):
        train.label_stage(it)
    assert {k: seen[k] for k in EXPECTED} == EXPECTED


def test_judge_from_args_passes_every_declared_setting():
    """judge_settings names a make_judge keyword for every setting but --judge and --judge-max-missing."""
    args = judge.parse_args(["--in", "a", "--out", "b", *ARGV])
    assert judge.judge_settings(args) == EXPECTED
    assert {kw for _, kw, *_ in judge.SETTINGS} - {None, "kind"} == set(EXPECTED)


def test_head_chunk_size_is_named_for_what_it_chunks():
    """--head-chunk-size (the answer tokens per chunk of the policy's lm_head and of the noise's z = lm_head(h));
    the older --noise-chunk-size still works, hidden; the parsed name, which no stage record or checkpoint holds
    (it is no training key), is unchanged."""
    assert config.parse_args(["--iter", "1", "--head-chunk-size", "16"]).noise_chunk_size == 16
    assert config.parse_args(["--iter", "1", "--noise-chunk-size", "16"]).noise_chunk_size == 16
    assert config.parse_args(["--iter", "1"]).noise_chunk_size == 256 and "noise_chunk_size" not in config.TRAINING_KEYS
    text = config.build_parser().format_help()
    assert "--head-chunk-size" in text and "--noise-chunk-size" not in text
