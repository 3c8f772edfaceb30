"""Hostile-but-honest servers against the HTTP judge (issue 12): trickled bytes, huge replies, a gzip bomb,
HTML with status 200, Retry-After: 600, bad URLs and keys, a shared cache between two servers, a reply
that echoes the key. Each test bounds what the judge may do: time, memory, cache contents, requests."""
import json
import time
import tracemalloc

import pytest

import judge
import judge_base
import judge_http
from fakechat import FAKE_KEY, FakeChat, records
from test_judge_http import fast_judge, key_env, server  # noqa: F401 (fixtures)


def one(answer="a score=3"):
    return [{"prompt": "q", "answer": answer, "record": {}}]


def test_trickling_server_bounded_by_deadline(server, key_env):
    """A reply trickled one byte a second is cut at the per-request deadline (not per read), then retried."""
    server.script = {"a score=3": ["trickle"]}  # 10 bytes over 10 s, then an honest reply
    j = fast_judge(server.url, timeout=2.0, max_retries=1)
    start = time.monotonic()
    out = j.score_many(one())
    elapsed = time.monotonic() - start
    assert out == [(3.0, None)] and j.stats["retries"] == 1
    assert elapsed < 2.0 + 3.0, elapsed  # the deadline plus a generous margin, not a speed measurement


def test_huge_reply_capped_and_not_cached(server, key_env, tmp_path):
    """A 4 MiB reply (with a valid rating) is refused past the 1 MiB cap: a null score, no retry, no cache row."""
    server.default = "huge"
    cache = tmp_path / "c.jsonl"
    j = fast_judge(server.url, cache_path=cache)
    (score, err), = j.score_many(one())
    assert score is None and "1 MiB" in err and "\n" not in err
    assert sum(server.received.values()) == 1 and (not cache.exists() or cache.stat().st_size < 1000)
    assert judge_http.MAX_REPLY_BYTES == 1 << 20


def test_gzip_bomb_bounded_memory(server, key_env):
    """64 KiB of gzip that decodes to 64 MiB is stopped at the cap while decoding; peak memory stays small."""
    server.default = "gzipbomb"
    server.bomb()  # built before tracing
    j = fast_judge(server.url)
    tracemalloc.start()
    try:
        (score, err), = j.score_many(one())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert score is None and "1 MiB" in err and sum(server.received.values()) == 1
    assert peak < 16 << 20, f"peak {peak / 2**20:.0f} MiB"


@pytest.mark.parametrize("mode", ["gzip", "deflate"])
def test_compressed_reply_decoded(server, key_env, mode):
    """An honest gzip or deflate reply is decoded as before; the judge asks for those encodings only."""
    server.default = mode
    assert fast_judge(server.url).score_many(one()) == [(3.0, None)]
    assert judge_http.ACCEPT_ENCODING == "gzip, deflate"


def test_retry_after_600_bounded(server, key_env):
    """Retry-After: 600 on every reply: each wait is capped and the total wait per answer is bounded; then fatal."""
    server.default = "429:600"
    sleeps = []
    j = fast_judge(server.url, sleeps, max_retries=6)  # default Retry-After cap and wait budget
    with pytest.raises(judge_base.JudgeFatalError, match="--judge-max-retry-wait") as e:
        j.score_many(one())
    assert "\n" not in str(e.value) and sleeps and max(sleeps) <= 60 and sum(sleeps) <= 300
    assert (judge_http.RETRY_AFTER_MAX, judge_http.MAX_RETRY_WAIT) == (60.0, 300.0)


def test_html_200_stops_the_stage_and_rerun_asks_again(server, key_env, tmp_path):
    """HTML with status 200 for every answer stops judge_records early with a one-line error; nothing is
    written as final, and once the server is fixed a rerun asks every answer again."""
    server.default = "html"
    recs, out = records(20), tmp_path / "j.jsonl"
    with pytest.raises(judge_base.JudgeFatalError) as e:
        judge.judge_records(recs, fast_judge(server.url), out, chunk_records=2, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "of 40 scores missing" in msg and "--judge-max-missing" in msg
    assert "unparseable" in msg and "r0" in msg
    assert len(server.received) < 40 and not out.exists()  # stopped early
    server.default = "ok"
    rows, summary = judge.judge_records(recs, fast_judge(server.url), out, chunk_records=2, progress=False)
    assert summary["errors"] == 0 and summary["requests"] == 40 and len(server.answered) == 40
    assert all(r["human_score"] is not None and r["generated_score"] is not None for r in rows)


def test_null_score_asked_again_on_rerun(server, key_env, tmp_path):
    """A null score (under the allowed fraction) is written, but neither the output, the partial file nor the
    cache keeps it as final: a rerun asks that answer again, and only that one."""
    server.script = {"generated 3 score=2": ["html", "html"]}
    recs, out = records(10), tmp_path / "j.jsonl"
    rows, summary = judge.judge_records(recs, fast_judge(server.url), out, progress=False)
    assert summary["errors"] == 1 and rows[3]["generated_score"] is None and "judge_error" in rows[3]
    rows, summary = judge.judge_records(recs, fast_judge(server.url), out, progress=False)
    assert summary["requests"] == 1 and summary["errors"] == 0 and rows[3]["generated_score"] == 2.0
    assert summary["resumed"] == 9 and "judge_error" not in rows[3]


def test_cli_max_missing_flag(server, key_env, tmp_path):
    """judge.py stops with a one-line SystemExit when too many scores are missing; --judge-max-missing 1 lets it finish."""
    server.default = "html"
    inp = tmp_path / "generated.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in records(3)))
    argv = ["--in", str(inp), "--out", str(tmp_path / "judged.jsonl"), "--judge", "openai", "--judge-model", "m",
            "--judge-base-url", server.url, "--judge-max-retries", "0"]
    with pytest.raises(SystemExit) as e:
        judge.main(argv)
    assert str(e.value.code).startswith("judge.py: ") and "\n" not in str(e.value.code)
    judge.main(argv + ["--judge-max-missing", "1"])
    assert all(json.loads(x)["human_score"] is None for x in (tmp_path / "judged.jsonl").read_text().splitlines())


def test_non_http_base_url_fails_fast(key_env):
    """file://, ftp://, a missing scheme or host, a query: one-line JudgeFatalError at construction, no retries."""
    for url in ("file:///tmp/v1", "ftp://example.com/v1", "localhost:8000/v1", "http:///v1", "http://h/v1?x=1"):
        start = time.monotonic()
        with pytest.raises(judge_base.JudgeFatalError, match="base URL") as e:
            fast_judge(url)
        assert "\n" not in str(e.value) and time.monotonic() - start < 1.0


@pytest.mark.parametrize("bad", [FAKE_KEY + "\r", FAKE_KEY + "\n", "sk-tést-key", "sk-a b"])
def test_invalid_key_fails_fast(server, monkeypatch, bad):
    """A key with CR/LF, a space or non-ASCII fails at construction naming the variable, never the key."""
    monkeypatch.setenv("OPENAI_API_KEY", bad)
    with pytest.raises(judge_base.JudgeFatalError, match=r"\$OPENAI_API_KEY") as e:
        fast_judge(server.url)
    assert "\n" not in str(e.value) and bad.strip() not in str(e.value)


def test_key_broken_after_construction_fails_without_requests(server, key_env, monkeypatch):
    """The key is read again per run: a trailing CR then is fatal at once, and nothing is sent."""
    j = fast_judge(server.url)
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY + "\r")
    with pytest.raises(judge_base.JudgeFatalError, match=r"\$OPENAI_API_KEY"):
        j.score_many(one())
    assert sum(server.received.values()) == 0


def test_cache_key_includes_base_url_without_credentials(key_env, tmp_path):
    """Two servers with the same model name do not share cached scores; the same server reached with
    user:password@ in its URL (or a trailing slash) does, and the password is in no file or key."""
    a, b = FakeChat(score=3), FakeChat(score=9)
    try:
        cache = tmp_path / "c.jsonl"
        assert fast_judge(a.url, cache_path=cache).score_many(one("x")) == [(3.0, None)]
        assert fast_judge(b.url, cache_path=cache).score_many(one("x")) == [(9.0, None)]
        assert sum(b.received.values()) == 1
        creds = a.url.replace("http://", "http://user:hunter2pw@") + "/"
        assert fast_judge(creds, cache_path=cache).score_many(one("x")) == [(3.0, None)]
        assert sum(a.received.values()) == 1 and b"hunter2pw" not in cache.read_bytes()
        assert judge_http.public_url(creds) == a.url
    finally:
        a.close()
        b.close()


def test_reply_echoing_key_never_reaches_cache(server, key_env, tmp_path):
    """A reply (and its usage object) repeating the key: the cache holds only key, score and token counts."""
    server.default = "echo"
    cache = tmp_path / "c.jsonl"
    assert fast_judge(server.url, cache_path=cache).score_many(one()) == [(3.0, None)]
    assert FAKE_KEY.encode() not in cache.read_bytes()
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len(rows) == 1 and set(rows[0]) == {"key", "score", "prompt_tokens", "completion_tokens"}
    assert (rows[0]["score"], rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (3.0, 100, 7)


def test_cache_rows_load_as_score_and_counts_only(tmp_path):
    """A row loads as its score and token counts, whatever else it holds; rows without a usable score (null)
    are no hits, so those answers are asked again."""
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"key": "k1", "score": 7.0, "prompt_tokens": 5, "extra": FAKE_KEY})
                    + "\n" + json.dumps({"key": "k2", "score": None}) + "\n")
    cache = judge_http.ScoreCache(path)
    assert cache.get("k1") == {"key": "k1", "score": 7.0, "prompt_tokens": 5, "completion_tokens": 0}
    assert cache.get("k2") is None
    assert judge_http.ScoreCache(path).entries == cache.entries
