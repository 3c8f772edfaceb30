"""Tests for judge_http.py: the reply parser, the template, and the OpenAI-compatible judge against a real
HTTP server on 127.0.0.1 (429 + Retry-After, 500, slow replies, garbage, 400, 401), cache and resume.
`FakeChat` also plays the hostile servers of test_judge_hardening.py (trickle, huge, gzip bomb, HTML, echo)."""
import asyncio
import json
import math
import re
import socket
import threading
import time
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import judge
import judge_http



FAKE_KEY = "sk-test-DISTINCTIVE-key-7f3a9c"
QA = re.compile(r"\[Question\]\n(.*)\n\n\[The Start of Assistant's Answer\]\n(.*)\n\[The End of Assistant's Answer\]", re.S)


# ---------------------------------------------------------------- a chat-completions server on 127.0.0.1
class FakeChat:
    """Scripted OpenAI-compatible server: per-answer failure modes, then "Rating: [[score=N in answer]]"."""

    def __init__(self, latency=0.0, slow_s=1.0, score=None, trickle_bytes=10, trickle_s=1.0, huge_bytes=4 << 20,
                 bomb_bytes=64 << 20):
        self.lock = threading.Lock()
        self.received, self.answered = Counter(), Counter()  # (question, answer) -> count
        self.script = {}          # answer -> list of modes, consumed one per request
        self.default = "ok"       # mode when the script is empty
        self.ok_budget = None     # after this many OK replies, answer 401
        self.auth = set()
        self.in_flight = self.max_in_flight = 0
        self.latency, self.slow_s = latency, slow_s
        self.score = score        # every answer gets this score instead of its "score=N"
        self.trickle_bytes, self.trickle_s, self.huge_bytes, self.bomb_bytes = trickle_bytes, trickle_s, huge_bytes, bomb_bytes
        self._bomb = None
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            wbufsize = 1 << 16  # headers + body in one send (unbuffered writes meet delayed ACKs: +40 ms)

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    fake.handle(self, body)
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda *a: None  # clients that timed out close early
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def handle(self, req, body):
        question, answer = QA.search(body["messages"][-1]["content"]).groups()
        with self.lock:
            self.auth.add(req.headers.get("Authorization"))
            self.received[(question, answer)] += 1
            modes = self.script.get(answer)
            mode = modes.pop(0) if modes else self.default
            if mode == "ok" and self.ok_budget is not None:
                mode = "ok" if self.ok_budget > 0 else "401"
                self.ok_budget -= 1
        if self.latency:
            time.sleep(self.latency)
        if mode.startswith("429"):
            return self.send(req, 429, {"error": {"message": "rate limited"}}, {"Retry-After": mode.split(":")[1]})
        if mode in ("500", "400"):
            return self.send(req, int(mode), {"error": {"message": f"status {mode}"}})
        if mode == "401":
            key = (req.headers.get("Authorization") or "").removeprefix("Bearer ")
            return self.send(req, 401, {"error": {"message": f"Incorrect API key provided: {key}. Bearer {key}"}})
        if mode == "slow":
            time.sleep(self.slow_s)
        if mode == "notjson":
            return self.send(req, 200, "<html>oops</html>")
        if mode == "html":  # a proxy's error page with status 200
            return self.send(req, 200, "<html><body>Bad gateway</body></html>", content_type="text/html")
        if mode == "trickle":  # valid headers, then one byte per trickle_s
            return self.trickle(req)
        if mode == "gzipbomb":  # a small gzip body that decompresses to bomb_bytes zeros
            return self.send(req, 200, self.bomb(), {"Content-Encoding": "gzip"})
        score = self.score if self.score is not None else _score_of(answer)
        content = "I cannot rate this." if mode == "garbage" else f"Rating: [[{score}]]"
        usage = {"prompt_tokens": 100, "completion_tokens": 7}
        if mode == "huge":
            content += " " * self.huge_bytes
        if mode == "echo":  # a reply that repeats the request's Authorization header
            content += f" (you sent {req.headers.get('Authorization')})"
            usage["note"] = req.headers.get("Authorization")
        with self.lock:
            if mode != "garbage":
                self.answered[(question, answer)] += 1
        reply = {"choices": [{"message": {"role": "assistant", "content": content}}], "usage": usage}
        if mode in ("gzip", "deflate"):  # an honest compressed reply
            c = zlib.compressobj(wbits=31 if mode == "gzip" else 15)
            return self.send(req, 200, c.compress(json.dumps(reply).encode()) + c.flush(), {"Content-Encoding": mode})
        self.send(req, 200, reply)

    def bomb(self):
        """gzip of bomb_bytes zeros (about a thousandth of that on the wire), built 1 MiB at a time."""
        with self.lock:
            if self._bomb is None:
                c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # 16+: gzip header and trailer
                block = bytes(1 << 20)
                self._bomb = b"".join([c.compress(block) for _ in range(self.bomb_bytes >> 20)] + [c.flush()])
            return self._bomb

    def trickle(self, req):
        req.send_response(200)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(self.trickle_bytes))
        req.end_headers()
        req.wfile.flush()
        for _ in range(self.trickle_bytes):
            time.sleep(self.trickle_s)
            req.wfile.write(b" ")
            req.wfile.flush()

    @staticmethod
    def send(req, status, obj, headers=(), content_type="application/json"):
        data = obj if isinstance(obj, bytes) else (obj if isinstance(obj, str) else json.dumps(obj)).encode()
        req.send_response(status)
        req.send_header("Content-Type", content_type)
        req.send_header("Content-Length", str(len(data)))
        for k, v in dict(headers).items():
            req.send_header(k, v)
        req.end_headers()
        req.wfile.write(data)


def _score_of(answer):
    m = re.search(r"score=(\d+)", answer)
    return int(m.group(1)) if m else 5


@pytest.fixture
def server():
    fake = FakeChat()
    yield fake
    fake.close()


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)


def records(n, start=0):
    return [{"id": f"r{i}", "prompt": f"question {i}?", "human": f"human {i} score={1 + i % 10}",
             "generated": f"generated {i} score={1 + (i * 7) % 10}"} for i in range(start, start + n)]


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
    assert judge.parse_rating(reply) == score


@pytest.mark.parametrize("reply", [
    "", "   ", None, "Rating: [[11]]", "[[0]]", "Rating: -3", "42", "Rating: [[7]] or maybe [[8]]",
    "Rating: 7. Score: 8", "This answer is quite good.", "The answer lists 3 items and 2 examples.",
    "Score: 4/5", '{"score": "high"}', "7 or 8",
])
def test_parse_rating_rejects(reply):
    """Empty, out-of-range, conflicting, unmarked or foreign-scale replies raise ValueError."""
    with pytest.raises(ValueError):
        judge.parse_rating(reply)


def test_template_has_question_answer_and_format():
    """The grading prompt holds the question, the answer and the requested reply format; version is its hash."""
    text = judge.build_prompt("What is 2+3?", "It is 5.")
    assert QA.search(text).groups() == ("What is 2+3?", "It is 5.")
    assert "Rating: [[N]]" in text and "1 to 10" in text
    assert judge_http.TEMPLATE_VERSION.endswith(judge_http.hashlib.sha256(judge_http.TEMPLATE.encode()).hexdigest()[:8])


# ---------------------------------------------------------------- HTTP judge
def test_every_record_scored_once(server, key_env, tmp_path):
    """50 records at concurrency 8: one OK request per answer, the server's scores, usage summed, key sent."""
    recs = records(50)
    server.latency = 0.02  # replies overlap, so concurrency shows in max_in_flight
    rows, summary = judge.judge_records(recs, fast_judge(server.url, concurrency=8), tmp_path / "j.jsonl",
                                        chunk_records=16, progress=False)
    assert server.received == server.answered and set(server.answered.values()) == {1} and len(server.answered) == 100
    assert [(r["human_score"], r["generated_score"]) for r in rows] == \
        [(_score_of(r["human"]), _score_of(r["generated"])) for r in recs]
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
    with pytest.raises(judge.JudgeFatalError, match="unreachable after 3 retries: HTTP 500"):
        j.score_many([{"prompt": "q", "answer": "a", "record": {}}])
    assert server.received[("q", "a")] == 4


def test_unreachable_server_is_fatal(key_env):
    """Connection refused on every try ends in a fatal 'unreachable' error."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    j = fast_judge(f"http://127.0.0.1:{port}/v1", max_retries=2)
    with pytest.raises(judge.JudgeFatalError, match="unreachable after 2 retries: connection error"):
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
            "--judge-base-url", server.url, "--concurrency", "1"]
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
    with pytest.raises(judge.JudgeFatalError):
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
