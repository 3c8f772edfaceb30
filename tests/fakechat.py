"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1, for the HTTP judge's tests and bench.py.

`FakeChat()` serves `{url}/chat/completions` from a thread. It reads the question and answer(s) back out of
the judge's prompt (single-answer or pairwise template, judge_base.py) and answers "Rating: [[N]]", N being
the "score=N" written in the answer (5 without one), or, for a pairwise prompt, "[[A]]" / "[[B]]" / "[[C]]"
by comparing the two answers' N (`position_bias="A"` makes it always prefer the first answer shown). Per-answer
scripts play failing servers: 429 with Retry-After, 500, 400, 401, slow, garbage, not JSON, HTML, trickled
bytes, a huge reply, a gzip bomb, gzip/deflate bodies, a reply echoing the Authorization header, a 400
echoing the key in other forms; `gate` holds every request until it is set.
`records(n)` makes judge input rows whose answers carry such scores; `FAKE_KEY` is the fake API key.

Where this departs from, or fills a gap in, the paper:
1. Not part of the method: a stand-in for GPT-4o-mini so that tests and benchmarks run offline.
"""
import json
import re
import threading
import time
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAKE_KEY = "sk-test-DISTINCTIVE-key-7f3a9c"
QA = re.compile(r"\[Question\]\n(.*)\n\n\[The Start of Assistant's Answer\]\n(.*)\n\[The End of Assistant's Answer\]", re.S)
PAIR = re.compile(r"\[User Question\]\n(.*)\n\n\[The Start of Assistant A's Answer\]\n(.*)\n\[The End of Assistant A's Answer\]"
                  r"\n\n\[The Start of Assistant B's Answer\]\n(.*)\n\[The End of Assistant B's Answer\]", re.S)


# ---------------------------------------------------------------- a chat-completions server on 127.0.0.1
class FakeChat:
    """Scripted OpenAI-compatible server: per-answer failure modes, then "Rating: [[N]]" or a pairwise verdict."""

    def __init__(self, latency=0.0, slow_s=1.0, score=None, trickle_bytes=10, trickle_s=1.0, huge_bytes=4 << 20,
                 bomb_bytes=64 << 20, position_bias=None):
        self.lock = threading.Lock()
        self.received, self.answered = Counter(), Counter()  # (question, answer) -> count
        self.script = {}          # answer -> list of modes, consumed one per request
        self.default = "ok"       # mode when the script is empty
        self.ok_budget = None     # after this many OK replies, answer 401
        self.auth = set()
        self.in_flight = self.max_in_flight = 0
        self.latency, self.slow_s = latency, slow_s
        self.score = score        # every answer gets this score instead of its "score=N"
        self.position_bias = position_bias  # "A": a pairwise verdict always prefers the answer shown first
        self.gate = None          # a threading.Event: every request waits for it (holds a client mid-stage)
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
        text = body["messages"][-1]["content"]
        pair = PAIR.search(text)
        question, *answers = pair.groups() if pair else QA.search(text).groups()
        answer = tuple(answers) if pair else answers[0]  # pairwise: (answer A, answer B)
        with self.lock:
            self.auth.add(req.headers.get("Authorization"))
            self.received[(question, answer)] += 1
            modes = self.script.get(answer)
            mode = modes.pop(0) if modes else self.default
            if mode == "ok" and self.ok_budget is not None:
                mode = "ok" if self.ok_budget > 0 else "401"
                self.ok_budget -= 1
        if self.gate is not None:
            self.gate.wait(60)
        if self.latency:
            time.sleep(self.latency)
        if mode.startswith("429"):
            return self.send(req, 429, {"error": {"message": "rate limited"}}, {"Retry-After": mode.split(":")[1]})
        if mode in ("500", "400"):
            return self.send(req, int(mode), {"error": {"message": f"status {mode}"}})
        if mode == "echo400":  # a 400 whose message repeats the key upper-cased, without its prefix, and in part
            key = (req.headers.get("Authorization") or "").removeprefix("Bearer ")
            return self.send(req, 400, {"error": {"message": f"bad key {key.upper()} / {key[3:]} / {key[5:17]}"}})
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
        if pair:
            content = f"[[{self.position_bias or self.verdict(*answer)}]]"
        else:
            content = f"Rating: [[{self.score if self.score is not None else score_of(answer)}]]"
        if mode == "garbage":
            content = "I cannot rate this."
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

    @staticmethod
    def verdict(answer_a, answer_b):
        """A if A's score=N is higher, B if lower, C (tie) if equal."""
        a, b = score_of(answer_a), score_of(answer_b)
        return "A" if a > b else "B" if a < b else "C"

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


def score_of(answer):
    """The N of "score=N" in an answer, 5 when there is none."""
    m = re.search(r"score=(\d+)", answer)
    return int(m.group(1)) if m else 5


def records(n, start=0):
    """n judge input rows {id, prompt, human, generated} whose answers carry a "score=N" (1..10)."""
    return [{"id": f"r{i}", "prompt": f"question {i}?", "human": f"human {i} score={1 + i % 10}",
             "generated": f"generated {i} score={1 + (i * 7) % 10}"} for i in range(start, start + n)]
