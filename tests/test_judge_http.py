"""Tests for judge_http.py: the reply parsers, the templates, and the OpenAI-compatible judge against a real
HTTP server on 127.0.0.1 (fakechat.FakeChat: 429 + Retry-After, 500, slow replies, garbage, 400, 401), cache
and resume, the 100-point scale and the pairwise mode."""
import asyncio
import hashlib
import json
import math
import socket

import pytest

import data
import judge
import judge_base
import judge_http
from fakechat import FAKE_KEY, QA, FakeChat, records, score_of


@pytest.fixture
def server():
    fake = FakeChat()
    yield fake
    fake.close()


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)


def fast_judge(url, sleeps=None, **kw):
    """An HTTP judge with tiny timeouts and a recording no-op sleep instead of real backoff."""
    async def sleep(s):
        if sleeps is not None:
            sleeps.append(s)
        await asyncio.sleep(0)
    opts = dict(concurrency=4, timeout=2.0, max_retries=3, backoff_base=0.01, backoff_max=0.04, sleep=sleep)
    opts.update(kw)
    return judge.make_judge("openai", model="judge-x", base_url=url, **opts)


# ---------------------------------------------------------------- parser
@pytest.mark.parametrize("reply, score", [
    ("Rating: [[7]]", 7), ("[[7]]", 7), ("The answer is good, 3 facts. Rating: [[8.5]]", 8.5), ("[[ 9 ]]", 9),
    ("Rating: 7", 7), ("rating: 7/10", 7), ("Score: 7.5", 7.5), ("score = 6", 6), ("**Rating:** 4", 4),
    ("7/10", 7), ("I give it 8 / 10.", 8), ("3 out of 10", 3), ("7", 7), (" 10.\n", 10), ("1", 1),
    ('{"score": 7}', 7), ('```json\n{"rating": 9}\n```', 9), ('{"Score": "6"}', 6),
    ("Rating: [[7]] ... final: [[7]]", 7),
])
def test_parse_rating_accepts(reply, score):
    """Usual reply shapes give their rating."""
    assert judge_http.parse_rating(reply) == score


@pytest.mark.parametrize("reply", [
    "", "   ", None, "Rating: [[11]]", "[[0]]", "Rating: -3", "42", "Rating: [[7]] or maybe [[8]]",
    "Rating: 7. Score: 8", "This answer is quite good.", "The answer lists 3 items and 2 examples.",
    "Score: 4/5", '{"score": "high"}', "7 or 8",
])
def test_parse_rating_rejects(reply):
    """Empty, out-of-range, conflicting, unmarked or foreign-scale replies raise ValueError."""
    with pytest.raises(ValueError):
        judge_http.parse_rating(reply)


def test_template_has_question_answer_and_format():
    """The grading prompt holds the question, the answer and the requested reply format; version is its hash."""
    text = judge_base.build_prompt("What is 2+3?", "It is 5.")
    assert QA.search(text).groups() == ("What is 2+3?", "It is 5.")
    assert "Rating: [[N]]" in text and "1 to 10" in text
    assert judge_base.template_version().endswith(hashlib.sha256(judge_base.template().encode()).hexdigest()[:8])
    assert judge_base.template_version() == "single-v1-e33b025a"  # the 1..10 template of earlier caches, unchanged


# ---------------------------------------------------------------- HTTP judge
def test_every_record_scored_once(server, key_env, tmp_path):
    """50 records at concurrency 8: one OK request per answer, the server's scores, usage summed, key sent."""
    recs = records(50)
    server.latency = 0.02  # replies overlap, so concurrency shows in max_in_flight
    rows, summary = judge.judge_records(recs, fast_judge(server.url, concurrency=8), tmp_path / "j.jsonl",
                                        chunk_records=16, progress=False)
    assert server.received == server.answered and set(server.answered.values()) == {1} and len(server.answered) == 100
    assert [(r["human_score"], r["generated_score"]) for r in rows] == \
        [(score_of(r["human"]), score_of(r["generated"])) for r in recs]
    assert summary["requests"] == 100 and summary["prompt_tokens"] == 100 * 100 and summary["completion_tokens"] == 700
    assert summary["cost_usd"] is None and server.auth == {f"Bearer {FAKE_KEY}"}
    assert 1 < server.max_in_flight <= 8


def test_rerun_sends_nothing(server, key_env, tmp_path):
    """A second run, even with the output deleted, is answered from the cache: zero requests."""
    out = tmp_path / "j.jsonl"
    judge.judge_records(records(6), fast_judge(server.url), out, progress=False)
    out.unlink()
    rows, summary = judge.judge_records(records(6), fast_judge(server.url), out, progress=False)
    assert summary["requests"] == 0 and summary["cache_hits"] == 12 and sum(server.received.values()) == 12


def test_retries_bounded_and_retry_after_honoured(server, key_env):
    """429 (Retry-After 2), 500 and a timeout are retried; delays follow Retry-After then jittered backoff."""
    server.slow_s = 1.0
    server.script = {"A": ["429:2", "500", "slow"], "B": ["500"]}
    sleeps = []
    j = fast_judge(server.url, sleeps, concurrency=1, timeout=0.3)
    out = j.score_many([{"prompt": "q", "answer": "A", "record": {}}, {"prompt": "q", "answer": "B", "record": {}}])
    assert out == [(5.0, None), (5.0, None)] and j.stats["retries"] == 4 and j.stats["requests"] == 6
    assert sleeps[0] == 2.0 and 0.01 <= sleeps[1] <= 0.02 and 0.02 <= sleeps[2] <= 0.04 and 0.005 <= sleeps[3] <= 0.01


def test_retries_exhausted_is_fatal(server, key_env):
    """A server that always answers 500 is tried max_retries + 1 times, then a one-line JudgeFatalError."""
    server.default = "500"
    j = fast_judge(server.url, max_retries=3)
    with pytest.raises(judge_base.JudgeFatalError, match="unreachable after 3 retries: HTTP 500"):
        j.score_many([{"prompt": "q", "answer": "a", "record": {}}])
    assert server.received[("q", "a")] == 4


def test_unreachable_server_is_fatal(key_env):
    """Connection refused on every try ends in a fatal 'unreachable' error."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    j = fast_judge(f"http://127.0.0.1:{port}/v1", max_retries=2)
    with pytest.raises(judge_base.JudgeFatalError, match="unreachable after 2 retries: connection error"):
        j.score_many([{"prompt": "q", "answer": "a", "record": {}}])
    assert j.stats["requests"] == 3


def test_garbage_reply_becomes_null(server, key_env, tmp_path):
    """An unparseable reply is asked once more, then recorded as null + judge_error and counted."""
    server.script = {"generated 0 score=1": ["garbage", "garbage"], "human 1 score=2": ["notjson"]}
    rows, summary = judge.judge_records(records(2), fast_judge(server.url), tmp_path / "j.jsonl", progress=False,
                                        max_missing=0.5)  # 1 of 4 scores missing: over the default 0.2
    assert rows[0]["generated_score"] is None and "unparseable" in rows[0]["judge_error"]
    assert rows[0]["human_score"] == 1 and rows[1]["human_score"] == 2 and "judge_error" not in rows[1]
    assert summary["parse_failures"] == 3 and summary["errors"] == 1 and summary["retries"] == 2
    assert math.isnan(judge.dsl_flip_rate(rows[:1])) and summary["dsl_flip_rate"] == 1.0


def test_400_is_an_error_for_that_answer_only(server, key_env):
    """A 400 (e.g. prompt too long) gives None + the server's message, and the run goes on."""
    server.script = {"long": ["400"]}
    out = fast_judge(server.url).score_many([{"prompt": "q", "answer": "long", "record": {}},
                                             {"prompt": "q", "answer": "ok", "record": {}}])
    assert out[0] == (None, "HTTP 400: status 400") and out[1] == (5.0, None)


def test_identical_answers_requested_once(server, key_env):
    """Items with the same (prompt, answer) in one call share one request."""
    out = fast_judge(server.url).score_many([{"prompt": "q", "answer": "same score=3", "record": {}}] * 3)
    assert out == [(3.0, None)] * 3 and server.received[("q", "same score=3")] == 1


def test_401_stops_cli_and_key_never_written(server, key_env, tmp_path, capsys):
    """A 401 stops the CLI with a one-line message naming the variable; the key is in no file or message."""
    inp = tmp_path / "generated.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in records(5)))
    server.ok_budget = 4  # some answers scored and cached, then the key "expires"
    argv = ["--in", str(inp), "--out", str(tmp_path / "judged.jsonl"), "--judge", "openai", "--judge-model", "m",
            "--judge-base-url", server.url, "--judge-concurrency", "1"]
    with pytest.raises(SystemExit) as e:
        judge.main(argv)
    msg = str(e.value.code)
    assert "HTTP 401" in msg and "$OPENAI_API_KEY" in msg and "\n" not in msg and FAKE_KEY not in msg
    server.ok_budget = None
    judge.main(argv)  # resumes: the 4 cached answers are not asked again
    assert set(server.answered.values()) == {1} and len(server.answered) == 10
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) >= 3 and not any(FAKE_KEY.encode() in p.read_bytes() for p in written)
    captured = capsys.readouterr()
    assert FAKE_KEY not in captured.out + captured.err and "requests" in captured.out


def test_killed_http_run_resumes_without_repeats(server, key_env, tmp_path):
    """A run stopped mid-way (fatal 401 after 7 answers) resumes from cache + partial with no repeated request."""
    recs, out = records(12), tmp_path / "j.jsonl"
    server.ok_budget = 7
    with pytest.raises(judge_base.JudgeFatalError):
        judge.judge_records(recs, fast_judge(server.url, concurrency=2), out, chunk_records=2, progress=False)
    server.ok_budget = None
    rows, summary = judge.judge_records(recs, fast_judge(server.url, concurrency=2), out, chunk_records=2, progress=False)
    assert set(server.answered.values()) == {1} and len(server.answered) == 24
    assert summary["resumed"] >= 2 and summary["cache_hits"] >= 1 and len(rows) == 12


def test_key_required_only_for_remote(monkeypatch):
    """No key: a remote base URL fails at once naming the variable; a loopback one does not need it."""
    monkeypatch.delenv("MY_KEY", raising=False)
    with pytest.raises(ValueError, match=r"\$MY_KEY is not set"):
        judge.make_judge("openai", api_key_env="MY_KEY")
    assert judge.make_judge("openai", base_url="http://127.0.0.1:8000/v1", api_key_env="MY_KEY").name == "openai:gpt-4o-mini"


def test_cache_skips_torn_last_line(tmp_path):
    """A cache whose last line was cut by a kill loads the whole lines and appends cleanly after it."""
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"key": "k1", "score": 3}) + "\n" + '{"key": "k2", "sco')
    cache = judge_http.ScoreCache(path)
    assert set(cache.entries) == {"k1"}
    cache.put("k3", {"score": 4})
    cache.close()
    assert set(judge_http.ScoreCache(path).entries) == {"k1", "k3"}


def test_cost_estimate_for_known_models():
    """gpt-4o-mini: $0.15 / 1M prompt and $0.60 / 1M completion tokens; unknown models: None."""
    j = judge.make_judge("openai", model="gpt-4o-mini-2024-07-18", base_url="http://localhost:1/v1")
    assert j.estimate_cost(1_000_000, 1_000_000) == pytest.approx(0.75)
    assert judge.make_judge("openai", model="llama3", base_url="http://localhost:1/v1").estimate_cost(10, 10) is None


# ---------------------------------------------------------------- the 100-point scale and the pairwise mode
@pytest.mark.parametrize("reply, score", [("Rating: [[85]]", 85), ("[[85/100]]", 85), ("Score: 72.5", 72.5),
                                          ("85/100", 85), ("64 out of 100", 64), ("100", 100), ("7", 7)])
def test_parse_rating_on_100_point_scale(reply, score):
    """On scale 100, ratings 1..100 and "N/100" parse; the same reply of 85 is out of range on scale 10."""
    assert judge_http.parse_rating(reply, scale=100) == score


@pytest.mark.parametrize("reply", ["[[101]]", "Rating: 0", "Score: 8/10", "7/10"])
def test_parse_rating_100_rejects(reply):
    """Out of 1..100, or a rating out of 10, is no rating on the 100-point scale."""
    with pytest.raises(ValueError):
        judge_http.parse_rating(reply, scale=100)


def test_scale_100_template_ratings_and_cache_key(server, key_env, tmp_path):
    """A scale-100 judge asks for 1..100 and reads 85; its cache rows are not hits for a scale-10 judge, which
    asks again and cannot read 85 (null + error); the judge names differ, so rows are never mixed."""
    text = judge_base.build_prompt("q", "a", scale=100)
    assert "1 to 100" in text and "[[50]]" in text and judge_base.template_version(100) != judge_base.template_version()
    cache = tmp_path / "c.jsonl"
    items = [{"prompt": "q", "answer": a, "record": {}} for a in ("x score=85", "y score=7")]
    j100 = fast_judge(server.url, cache_path=cache, scale=100)
    assert j100.name == "openai:judge-x:scale100" and j100.score_many(items) == [(85.0, None), (7.0, None)]
    j10 = fast_judge(server.url, cache_path=cache)
    out = j10.score_many(items)
    assert j10.stats["cache_hits"] == 0 and out[1] == (7.0, None) and out[0][0] is None and "85" in out[0][1]
    again = fast_judge(server.url, cache_path=cache, scale=100)
    assert again.score_many(items) == [(85.0, None), (7.0, None)] and again.stats["requests"] == 0


def pair_records():
    """human vs generated: generated better, human better, equally good, generated empty, identical."""
    return [{"id": str(i), "prompt": f"q{i}", "human": h, "generated": g} for i, (h, g) in enumerate(
        [("h0 score=3", "g0 score=8"), ("h1 score=9", "g1 score=2"), ("h2 score=5", "g2 score=5"),
         ("h3 score=5", "  "), ("same score=4", "same score=4")])]


def test_pairwise_asks_both_orders_and_scores_votes(server, key_env, tmp_path):
    """Pairwise: two requests per record (human first, then generated first); each answer's score is its votes
    over both orders (the two sum to 2); an empty or identical answer is decided without a request. DSL flips
    exactly the record whose generated answer won both orders; a rerun is answered from the cache."""
    out = tmp_path / "j.jsonl"
    rows, summary = judge.judge_records(pair_records(), fast_judge(server.url, mode="pairwise"), out, progress=False)
    assert [(r["human_score"], r["generated_score"]) for r in rows] == [(0, 2), (2, 0), (1, 1), (2, 0), (1, 1)]
    assert set(server.received) == {(f"q{i}", order) for i, (h, g) in enumerate(
        (r["human"], r["generated"]) for r in pair_records()[:3]) for order in ((h, g), (g, h))}
    assert summary["requests"] == 6 and summary["empty_answers"] == 1 and rows[0]["judge"] == "openai:judge-x:pairwise"
    pairs, stats = data.dsl_pairs(rows, dsl=True)
    assert [p["chosen_source"] for p in pairs] == ["generated", "human", "human", "human"]
    assert (stats["flips"], stats["ties"], stats["identical"]) == (1, 1, 1)
    out.unlink()
    _, summary = judge.judge_records(pair_records(), fast_judge(server.url, mode="pairwise"), out, progress=False)
    assert summary["requests"] == 0 and summary["cache_hits"] == 6


def test_pairwise_position_bias_cancels_to_a_tie(key_env, tmp_path):
    """A judge that always prefers the answer shown first gives every asked record one vote each: a tie,
    so DSL keeps the human answer; a single-answer scale cannot see this bias at all."""
    biased = FakeChat(position_bias="A")
    try:
        rows, _ = judge.judge_records(pair_records()[:3], fast_judge(biased.url, mode="pairwise"), tmp_path / "j.jsonl",
                                      progress=False)
    finally:
        biased.close()
    assert [(r["human_score"], r["generated_score"]) for r in rows] == [(1, 1)] * 3
    assert data.dsl_stats(rows)["flips"] == 0


def test_pairwise_unreadable_order_is_a_missing_score(server, key_env):
    """An order whose verdict cannot be read (after one more try) leaves both scores of the record null,
    with an error naming the order; other records are unaffected."""
    recs = pair_records()[:2]
    server.script = {(recs[0]["generated"], recs[0]["human"]): ["garbage", "garbage"]}
    (h0, g0), (h1, g1) = fast_judge(server.url, mode="pairwise").score_records(recs)
    assert h0[0] is None and g0[0] is None and h0[1].startswith("generated first: unparseable")
    assert (h1, g1) == ((2.0, None), (0.0, None))


@pytest.mark.parametrize("reply, vote", [("[[A]]", 1.0), ("My verdict: [[B]]", 0.0), ("[[c]]", 0.5), ("B", 0.0)])
def test_parse_verdict(reply, vote):
    """[[A]], [[B]], [[C]] (any case, anywhere) or a bare letter give the first answer's share of the vote."""
    assert judge_http.parse_verdict(reply) == vote


@pytest.mark.parametrize("reply", ["", "[[A]] or [[B]]", "Assistant A is better.", "[[D]]"])
def test_parse_verdict_rejects(reply):
    """No verdict, two different verdicts or an unknown letter raise ValueError."""
    with pytest.raises(ValueError):
        judge_http.parse_verdict(reply)


def test_scale_and_mode_flags_checked(server, key_env, tmp_path):
    """judge.py --judge-scale/--judge-mode reach the HTTP judge; combinations that cannot work are one-line errors."""
    inp = tmp_path / "generated.jsonl"
    data.write_jsonl(inp, pair_records()[:1])
    judge.main(["--in", str(inp), "--out", str(tmp_path / "a.jsonl"), "--judge", "openai", "--judge-model", "m",
                "--judge-base-url", server.url, "--judge-mode", "pairwise"])
    assert data.read_jsonl(tmp_path / "a.jsonl")[0]["judge"] == "openai:m:pairwise"
    judge.main(["--in", str(inp), "--out", str(tmp_path / "b.jsonl"), "--judge", "openai", "--judge-model", "m",
                "--judge-base-url", server.url, "--judge-scale", "100"])
    assert data.read_jsonl(tmp_path / "b.jsonl")[0]["judge"] == "openai:m:scale100"
    for argv, message in [(["--judge", "rule", "--judge-scale", "100"], "--judge rule scores 1..10 only"),
                          (["--judge", "hf", "--judge-model", "x", "--judge-mode", "pairwise"], "needs --judge openai"),
                          (["--judge", "openai", "--judge-base-url", server.url, "--judge-mode", "pairwise",
                            "--judge-scale", "100"], "pairwise mode gives verdicts")]:
        with pytest.raises(SystemExit, match=message):
            judge.main(["--in", str(inp), "--out", str(tmp_path / "c.jsonl"), *argv])
