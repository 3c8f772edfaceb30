"""The OpenAI-compatible HTTP judge: `OpenAIJudge`, and the parsers of its replies.

`OpenAIJudge` POSTs `{base_url}/chat/completions` with httpx (async): OpenAI's gpt-4o-mini as in the
paper, or any local server speaking the same shape (vLLM, llama.cpp `llama-server`, Ollama's `/v1`).
In single mode each answer is graded alone with `judge_base.template(scale)` (question + answer ->
"Rating: [[N]]", N in 1..scale, scale 10 or 100) and the reply is read by `parse_rating`; in pairwise mode
both answers of a record go in one prompt, in both orders, and `parse_verdict` reads "[[A]]" / "[[B]]" /
"[[C]]" (judge_base.py says how the votes become scores). Requests run `concurrency` at a time; 429 / 408 /
5xx / timeouts / connection errors are retried with exponential backoff and jitter (a `Retry-After` in
seconds or as an HTTP date is waited out, capped at `retry_after_max`), at most `max_retries` times and
`max_retry_wait` seconds of waiting in all per request, then the run stops with a one-line
`JudgeFatalError`; 401 / 403 / 404 stop it at once. Each request has one wall-clock deadline, `timeout`,
over connect and every read, and its body is read through `read_capped` (at most
`max_reply_bytes` read and decoded). The base URL must be http(s) and the key a plain visible-ASCII
string, checked when the judge is built. The API key is read from an environment variable and is never
stored, logged or written; error texts are scrubbed of it (`mask_secret`: any letter case, with or without
its prefix, and any run of SECRET_PART characters of it). Scores (and token counts, never reply text)
are cached in an append-only JSONL file (section "cache"; a path that is a symbolic link is refused) keyed
by sha256(base URL without credentials, judge model, template version (which names the scale or the
pairwise template), prompt, answer(s)), so a rerun or a resumed run never sends a request twice for an
answer that got a score.

Where this departs from, or fills a gap in, the paper:
1. Cache format: the cache is a JSONL file rather than sqlite: human-readable, greppable, "JSONL
   everywhere", and an append of one line per score survives a kill (a torn last line is skipped on load).
   One writer per cache file is assumed (judging is one process). It keeps scores and token counts only.
2. Unparseable replies: a reply that cannot be parsed is asked again `parse_retries` times (default 1) and
   then recorded as a `None` score with the reason; it is not cached, and a non-200 4xx other than
   401/403/404 (e.g. 400 "context length exceeded") is an error for that answer only, not for the run. So
   is a 200 reply larger than `max_reply_bytes` (1 MiB) read or decoded, or in an unknown
   Content-Encoding; it is not asked again (the same request would most likely bring the same reply).
3. Bounds: the paper has no need to state them, for servers that misbehave: a deadline per request
   (`timeout`, 60 s), a Retry-After above `retry_after_max` (60 s) is cut to it, and a request whose next
   backoff would take its total wait past `max_retry_wait` (300 s) stops the run (`JudgeFatalError`), so
   one request costs at most (max_retries + 1) * timeout + max_retry_wait seconds.
4. Pairwise verdicts are cached as the first answer's share of the vote (1, 0 or 0.5) under a key naming
   both answers in their order; the paper describes no pairwise mode (judge_base.py, departure "Scale").

The network guards (section "network"): URL and key checks, the Retry-After header, scrubbing secrets
from messages, and bounded reading of one reply body.

`read_capped` reads a streamed httpx response (`client.stream(...)`) and stops with `BadReply` as soon as
more than `cap` bytes came off the wire or more than `cap` bytes were decoded. It undoes the
Content-Encoding itself with zlib's `max_length`, so a gzip bomb is never inflated past the cap in memory:
httpx's own decoder (behind `aiter_bytes`) inflates each network chunk whole, and deflate expands up to
~1000x, so 64 KiB read could become 64 MiB before any cap is checked. The judge sends
`Accept-Encoding: ACCEPT_ENCODING`; any other encoding in a reply is refused.

`check_base_url` and `check_header_value` turn what could never work (a file:// URL, a key ending in a
CR) into a one-line `JudgeFatalError` when the judge is built, instead of rounds of retried
"connection errors". `public_url` is the base URL without credentials, for messages and the cache key.

The score cache (section "cache"): an append-only JSONL file of {key, score, prompt_tokens,
completion_tokens}. The key is the sha256 of what decides a score (the base URL without credentials, judge
model, template version, prompt, answer or answers), so two servers serving models of the same name share
nothing.
A row holds the parsed score and the reply's token counts only, never the reply's text (a reply may be
large, or repeat what it was sent, the API key included). Only a finite number is a score: a row with a
null or unreadable score is no hit, so an answer that failed is asked again on a rerun.
"""
import asyncio
import email.utils
import hashlib
import ipaddress
import json
import math
import os
import random
import re
import time
import urllib.parse
import zlib

import httpx

from data import append_jsonl, open_append, read_jsonl_tolerant, refuse_symlink
from diskspace import size_text
from judge_base import (DEFAULT_SCALE, PAIRWISE_VERSION, Judge, JudgeFatalError, build_pairwise_prompt,
                        build_prompt, check_scale_and_mode, judge_name, template_version)

# ---------------------------------------------------------------- network
MAX_REPLY_BYTES = 1 << 20             # 1 MiB: a rating reply is a few hundred bytes
ACCEPT_ENCODING = "gzip, deflate"     # the encodings read_capped decodes


def is_local_url(url: str) -> bool:
    """Loopback, private-network and single-label hosts: servers that need no API key."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost") or "." not in host:
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    return addr.is_loopback or addr.is_private


def public_url(url: str) -> str:
    """scheme://host[:port]/path: lower-case scheme and host, no user:password@, no default port, no final "/"."""
    p = urllib.parse.urlsplit(url.strip())
    host = (p.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"  # IPv6
    try:
        port = p.port
    except ValueError:
        port = None
    if port is not None and port != {"http": 80, "https": 443}.get(p.scheme.lower()):
        host += f":{port}"
    return urllib.parse.urlunsplit((p.scheme.lower(), host, p.path.rstrip("/"), p.query, p.fragment))


def check_base_url(url: str) -> None:
    """JudgeFatalError unless url is http(s)://host[:port][/path] (no query or fragment, no spaces)."""
    p = urllib.parse.urlsplit(url)
    problem = None
    if p.scheme.lower() not in ("http", "https"):
        problem = "must start with http:// or https://"
    elif not p.hostname:
        problem = "has no host"
    elif p.query or p.fragment:
        problem = "must not have a query or fragment (/chat/completions is appended to it)"
    elif any(c.isspace() or not c.isprintable() for c in url):
        problem = "holds a space or a control character"
    else:
        try:
            p.port
        except ValueError:
            problem = "has an invalid port"
    if problem:
        shown = re.sub(r"//[^/@]*@", "//", url)  # never show user:password@
        raise JudgeFatalError(f"judge base URL {redact(shown, None)!r} {problem}")


def check_header_value(value: str, what: str) -> None:
    """JudgeFatalError naming `what` (never the value) unless value is visible ASCII, as an HTTP header needs."""
    for i, c in enumerate(value):
        if not "!" <= c <= "~":
            kind = {"\r": "a carriage return", "\n": "a line feed", " ": "a space"}.get(
                c, "a control character" if ord(c) < 128 else "a non-ASCII character")
            raise JudgeFatalError(f"{what} holds {kind} at position {i + 1} of {len(value)}, which an HTTP header "
                                  f"cannot carry; set it again without it (a stray CR from a Windows file?)")


def parse_retry_after(value):
    """Seconds to wait from a Retry-After header (seconds or an HTTP date); None if absent/unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


SECRET_PART = 8  # this many consecutive characters of the key, in any letter case, count as the key
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")  # keeps every index


def mask_secret(text: str, secret) -> str:
    """text with every echo of the key masked as "***": the key itself, in any letter case, with or without
    its prefix ("sk-", "sk-proj-"), and any run of SECRET_PART or more of its consecutive characters (a key
    shorter than that: the whole key, any case; shorter than 4 characters: only the exact key)."""
    if not secret:
        return text
    if len(secret) < 4:
        return text.replace(secret, "***")
    low, key, n = text.translate(_ASCII_LOWER), secret.translate(_ASCII_LOWER), min(SECRET_PART, len(secret))
    covered = bytearray(len(text))
    for part in {key[i:i + n] for i in range(len(key) - n + 1)}:
        at = low.find(part)
        while at != -1:
            covered[at:at + n] = b"\1" * n
            at = low.find(part, at + 1)
    out, last = [], 0
    for m in re.finditer(rb"\x01+", covered):
        out += [text[last:m.start()], "***"]
        last = m.end()
    return "".join(out) + text[last:]


def redact(text: str, secret) -> str:
    """One line, at most 200 characters, with the key (mask_secret) and anything key-like removed."""
    text = mask_secret(str(text), secret)
    text = re.sub(r"sk-[A-Za-z0-9_*\-.]{3,}", "sk-***", text)
    text = re.sub(r"(?i)bearer\s+\S+", "Bearer ***", text)
    return " ".join(text.split())[:200]


class BadReply(ValueError):
    """A reply body refused: over the size cap, or in an encoding that cannot be decoded."""


def _decoder(encoding: str):
    """A zlib decompressor for the Content-Encoding, None for identity; BadReply for anything else."""
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip header and trailer
    if encoding == "deflate":
        return zlib.decompressobj(32 + zlib.MAX_WBITS)  # zlib (RFC 9110) or gzip header, detected
    raise BadReply(f"unsupported Content-Encoding {encoding[:40]!r}")


async def read_capped(response, cap: int = MAX_REPLY_BYTES) -> bytes:
    """The decoded body of a streamed httpx response, at most `cap` bytes read and decoded; BadReply beyond."""
    too_big = f"reply larger than the {size_text(cap)} cap"
    declared = response.headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > cap:
        raise BadReply(too_big)
    encoding = response.headers.get("content-encoding", "").strip().lower()
    decoder = _decoder(encoding)
    body, wire = bytearray(), 0
    try:
        async for chunk in response.aiter_raw():
            wire += len(chunk)
            if wire > cap:
                raise BadReply(too_big)
            if decoder is None:
                body += chunk
            while decoder is not None and chunk:  # inflate at most one byte past the cap per call
                body += decoder.decompress(chunk, cap + 1 - len(body))
                chunk = decoder.unconsumed_tail
                if len(body) > cap:
                    raise BadReply(too_big)
            if len(body) > cap:
                raise BadReply(too_big)
        if decoder is not None:
            body += decoder.flush()  # at most one pending match (<= 258 bytes) once all input is consumed
    except zlib.error as e:
        raise BadReply(f"undecodable {encoding} body ({e})") from None
    if len(body) > cap:
        raise BadReply(too_big)
    return bytes(body)


# ---------------------------------------------------------------- cache
FIELDS = ("key", "score", "prompt_tokens", "completion_tokens")


def cache_key(*parts: str) -> str:
    """sha256 of the JSON list of parts."""
    return hashlib.sha256(json.dumps(list(parts), ensure_ascii=False).encode("utf-8")).hexdigest()


def token_count(value) -> int:
    """A usage count as a non-negative int; anything else (missing, text, a bool, negative, inf) counts 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return 0
    return int(value)


def clean_row(row):
    """The row reduced to FIELDS, or None when it has no string key or no finite numeric score."""
    if not isinstance(row, dict) or not isinstance(row.get("key"), str):
        return None
    score = row.get("score")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        return None
    return {"key": row["key"], "score": float(score), "prompt_tokens": token_count(row.get("prompt_tokens")),
            "completion_tokens": token_count(row.get("completion_tokens"))}


class ScoreCache:
    """Scores by key, loaded from and appended to one JSONL file (one writer per file)."""

    def __init__(self, path):
        self.path = str(path)
        refuse_symlink(self.path)  # rows are appended to the cache's own file, never to a link's target
        rows = read_jsonl_tolerant(self.path)
        self.entries = {}
        for row in rows:
            if (clean := clean_row(row)) is not None:
                self.entries[clean["key"]] = clean
        self._fh = None

    def get(self, key):
        """{key, score, prompt_tokens, completion_tokens} or None."""
        return self.entries.get(key)

    def put(self, key, entry: dict):
        """Append the score and token counts of entry (nothing else of it) under key."""
        row = clean_row(dict(entry, key=key))
        if row is None:
            raise ValueError(f"judge cache: {entry.get('score')!r} is not a score")
        if self._fh is None:
            self._fh = open_append(self.path)
        append_jsonl(self._fh, row)
        self.entries[key] = row

    def close(self):
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# USD per 1M (prompt, completion) tokens, OpenAI pricing page as of 2024-10 (gpt-4o-mini unchanged since
# its 2024-07-18 launch). Dated snapshots ("gpt-4o-mini-2024-07-18") match their family.
PRICES_PER_MTOK = {"gpt-4o-mini": (0.15, 0.60), "gpt-4o": (2.50, 10.00)}
FATAL_STATUS = {401: "check the API key", 403: "the key may not use this model", 404: "check the base URL and model"}
RETRY_AFTER_MAX = 60.0       # seconds: a longer Retry-After is cut to this
MAX_RETRY_WAIT = 300.0       # seconds of backoff in all per answer before the run stops
# The defaults of the settings every command takes as --judge-* flags (judge.add_judge_flags)
MODEL, BASE_URL, API_KEY_ENV = "gpt-4o-mini", "https://api.openai.com/v1", "OPENAI_API_KEY"
CONCURRENCY, TIMEOUT, MAX_RETRIES, MAX_TOKENS = 8, 60.0, 6, 16


# ---------------------------------------------------------------- reply parsers
_NUM = r"(-?\d+(?:\.\d+)?)"
_LABELLED = re.compile(r"\b(?:rating|score|grade)\b\s*(?:is|of)?\s*[:=]?\s*\**\s*" + _NUM + r"(?:\s*(?:/|out\s+of)\s*(\d+))?",
                       re.IGNORECASE)
_BARE = re.compile(r"^\s*\**\s*" + _NUM + r"\s*\**\s*\.?\s*$")
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]", re.IGNORECASE)
_BARE_VERDICT = re.compile(r"^\s*\**\s*([ABC])\s*\**\s*\.?\s*$", re.IGNORECASE)
VOTES = {"A": 1.0, "B": 0.0, "C": 0.5}  # a pairwise verdict as the first answer's share of the vote


def _one_value(values, text: str) -> float:
    distinct = sorted(set(values))
    if len(distinct) > 1:
        raise ValueError(f"conflicting ratings {distinct} in reply {text[:80]!r}")
    return distinct[0]


def _check_reply(text) -> None:
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty reply" if isinstance(text, str) else "reply is not a chat completion with text")


def parse_rating(text, scale=DEFAULT_SCALE) -> float:
    """The rating in a judge reply, in [1, scale]; ValueError for anything else.

    Accepted, most specific first: "[[7]]" anywhere (other numbers ignored), a JSON object with a
    "score"/"rating" number, "Rating: 7" / "Score: 7.5" / "rating = 7/10", "7/10" / "7 out of 10",
    and a reply that is a bare number ("7", "7."). Rejected: empty replies, numbers outside 1..scale,
    two different ratings, ratings out of another scale ("4/5" when scale is 10), and prose whose
    numbers are not marked as a rating.
    """
    _check_reply(text)
    brackets = re.compile(r"\[\[\s*" + _NUM + rf"\s*(?:/\s*{scale}\s*)?\]\]")
    out_of_scale = re.compile(_NUM + rf"\s*(?:/|out\s+of)\s*{scale}\b", re.IGNORECASE)
    value = None
    if found := brackets.findall(text):
        value = _one_value([float(v) for v in found], text)
    elif (m := re.search(r"\{.*\}", text, re.DOTALL)) and (value := _json_rating(m.group(0))) is not None:
        pass
    elif found := _LABELLED.findall(text):
        bad = [d for _, d in found if d and d != str(scale)]
        if bad:
            raise ValueError(f"rating on a scale of {bad[0]}, expected {scale}, in reply {text[:80]!r}")
        value = _one_value([float(v) for v, _ in found], text)
    elif found := out_of_scale.findall(text):
        value = _one_value([float(v) for v in found], text)
    elif m := _BARE.match(text):
        value = float(m.group(1))
    if value is None:
        raise ValueError(f"no rating in reply {text[:80]!r}")
    if not 1 <= value <= scale:
        raise ValueError(f"rating {value:g} outside 1..{scale} in reply {text[:80]!r}")
    return value


def parse_verdict(text) -> float:
    """A pairwise reply's verdict as the first answer's share of the vote: "[[A]]" 1, "[[B]]" 0, "[[C]]" (tie)
    0.5; a reply that is only the letter counts too. ValueError for no verdict or two different ones."""
    _check_reply(text)
    found = {v.upper() for v in _VERDICT.findall(text)}
    if not found and (m := _BARE_VERDICT.match(text)):
        found = {m.group(1).upper()}
    if len(found) != 1:
        raise ValueError(f"{'conflicting verdicts' if found else 'no verdict'} in reply {text[:80]!r}")
    return VOTES[found.pop()]


def _json_rating(blob: str):
    try:
        obj = json.loads(blob)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    for key, val in obj.items():
        if key.lower() in ("score", "rating") and isinstance(val, (int, float, str)) and not isinstance(val, bool):
            try:
                return float(val)
            except ValueError:
                raise ValueError(f"non-numeric {key!r} {val!r} in JSON reply") from None
    return None


# ---------------------------------------------------------------- the judge
class OpenAIJudge(Judge):
    """Scores answers with an OpenAI-compatible chat-completions server (see the module docstring)."""

    def __init__(self, model=MODEL, base_url=BASE_URL, cache_path=None, concurrency=CONCURRENCY,
                 api_key_env=API_KEY_ENV, timeout=TIMEOUT, max_retries=MAX_RETRIES, backoff_base=1.0, backoff_max=60.0,
                 retry_after_max=RETRY_AFTER_MAX, max_retry_wait=MAX_RETRY_WAIT, parse_retries=1, max_tokens=MAX_TOKENS,
                 max_reply_bytes=MAX_REPLY_BYTES, sleep=asyncio.sleep, scale=DEFAULT_SCALE, mode="single"):
        super().__init__()
        check_scale_and_mode(scale, mode)
        if concurrency < 1 or max_retries < 0 or parse_retries < 0:
            raise ValueError(f"judge: concurrency must be >= 1 and retries >= 0 (got {concurrency}, {max_retries}, {parse_retries})")
        if not (timeout > 0 and max_retry_wait >= 0 and retry_after_max >= 0 and max_reply_bytes > 0):
            raise ValueError(f"judge: timeout and max_reply_bytes must be > 0, max_retry_wait and retry_after_max "
                             f">= 0 (got {timeout}, {max_reply_bytes}, {max_retry_wait}, {retry_after_max})")
        check_base_url(base_url)  # fail now, not after max_retries rounds of "connection error"
        self.model, self.base_url = model, base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.public = public_url(base_url)  # for messages and the cache key: no credentials
        self.scale, self.mode = scale, mode
        self.name = judge_name(f"openai:{model}", scale, mode)
        self.template_version = PAIRWISE_VERSION if mode == "pairwise" else template_version(scale)
        self.api_key_env = api_key_env  # the variable's name; its value is read per run and never stored
        if not self._api_key() and not is_local_url(self.base_url):
            raise JudgeFatalError(f"${api_key_env} is not set; the judge at {self.public} needs an API key "
                                  f"(export it, or name another variable with --judge-api-key-env)")
        self.cache = ScoreCache(cache_path) if cache_path else None
        self.concurrency, self.timeout, self.max_tokens = concurrency, timeout, max_tokens
        self.max_retries, self.parse_retries = max_retries, parse_retries
        self.backoff_base, self.backoff_max, self.retry_after_max = backoff_base, backoff_max, retry_after_max
        self.max_retry_wait, self.max_reply_bytes = max_retry_wait, max_reply_bytes
        self._sleep, self._rng = sleep, random.Random()

    def _api_key(self):
        """The key from the environment (None if unset), checked to be sendable in a header."""
        key = os.environ.get(self.api_key_env)
        if key:
            check_header_value(key, f"${self.api_key_env}")
        return key or None

    def attach_cache(self, path):
        self.cache = ScoreCache(path)

    def estimate_cost(self, prompt_tokens, completion_tokens):
        for family, (p_in, p_out) in PRICES_PER_MTOK.items():
            if self.model == family or re.fullmatch(re.escape(family) + r"-\d{4}-\d{2}-\d{2}", self.model):
                return (prompt_tokens * p_in + completion_tokens * p_out) / 1e6
        return None  # unknown model: no estimate rather than a wrong one

    def backoff_delay(self, attempt: int, retry_after=None) -> float:
        """Retry-After when the server gave one, else min(max, base * 2^(attempt-1)) with 50-100 % jitter."""
        if retry_after is not None:
            return min(retry_after, self.retry_after_max)
        cap = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
        return cap * (0.5 + 0.5 * self._rng.random())

    def _score(self, items):
        """Single mode: one request per distinct (prompt, answer)."""
        return self._ask([(item["prompt"], item["answer"]) for item in items])

    def score_records(self, records):
        """Single mode: Judge.score_records. Pairwise: both answers in one prompt, in both orders; each
        answer's score is its share of the two votes (judge_base.py)."""
        if self.mode == "single":
            return super().score_records(records)
        out, asked = [None] * len(records), []
        for i, r in enumerate(records):
            human, generated = r["human"].strip(), r["generated"].strip()
            if human and generated and human != generated:
                asked.append(i)
                continue
            self.stats["empty_answers"] += (not human) + (not generated)  # judge_base departure "Empty answers"
            votes = 1.0 if human == generated else 2.0 * bool(human)  # identical answers tie without asking
            out[i] = ((votes, None), (2.0 - votes, None))
        verdicts = self._ask([(records[i]["prompt"], records[i][first], records[i][second])
                              for i in asked for first, second in (("human", "generated"), ("generated", "human"))])
        for n, i in enumerate(asked):
            (human_first, err1), (generated_first, err2) = verdicts[2 * n], verdicts[2 * n + 1]
            if err1 or err2:
                orders = (("human first", err1), ("generated first", err2))
                error = "; ".join(f"{order}: {e}" for order, e in orders if e)
                out[i] = ((None, error), (None, error))
            else:
                votes = human_first + (1.0 - generated_first)
                out[i] = ((votes, None), (2.0 - votes, None))
        return out

    def _valid(self, value) -> bool:
        """A cached value this judge could have produced: a rating in 1..scale, or a share of a vote."""
        return value in (0.0, 0.5, 1.0) if self.mode == "pairwise" else 1 <= value <= self.scale

    def _ask(self, requests):
        """(value | None, error | None) per request (prompt, answer) or (prompt, answer A, answer B)."""
        results = [None] * len(requests)
        by_key = {}  # one HTTP request per distinct key in this call
        for i, request in enumerate(requests):
            key = cache_key(self.public, self.model, self.template_version, *request)
            hit = self.cache.get(key) if self.cache else None
            if hit is not None and self._valid(hit["score"]):
                results[i] = (hit["score"], None)
                self.stats["cache_hits"] += 1
            else:
                by_key.setdefault(key, []).append(i)
        if by_key:
            asyncio.run(self._ask_async(requests, by_key, results))
        return results

    async def _ask_async(self, requests, by_key, results):
        api_key = self._api_key()
        headers = {"Accept-Encoding": ACCEPT_ENCODING}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        # httpx's own bounds where they give the guarantee: a per-phase timeout (connect, each read and write,
        # waiting for a pooled connection), at most `concurrency` connections, no redirects (the key is never
        # sent elsewhere; proxies and CA files from the environment are honoured). What httpx cannot give
        # stays ours: one wall-clock deadline per request (its read timeout restarts at every
        # chunk, so a server dripping a byte a minute never trips it), backoff with jitter and Retry-After
        # (its transport retries only failed connects, at once), and the capped decoder (read_capped).
        transport = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=self.concurrency,
                                                                 max_keepalive_connections=self.concurrency),
                                             retries=0)
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(self.timeout), headers=headers, transport=transport,
                                         follow_redirects=False) as client:
                await self._run_all(client, requests, by_key, results, api_key)
        finally:
            if self.cache:
                self.cache.close()

    async def _run_all(self, client, requests, by_key, results, api_key):
        """Ask every distinct key, `concurrency` at a time; the first fatal error cancels the rest."""
        sem = asyncio.Semaphore(self.concurrency)

        async def one(key, idx):
            async with sem:  # held through backoff too, which slows a rate-limited run down as it should
                res = await self._ask_one(client, requests[idx[0]], key, api_key)
            for i in idx:
                results[i] = res
        tasks = [asyncio.create_task(one(k, idx)) for k, idx in by_key.items()]
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        errors = [t.exception() for t in done if t.exception() is not None]
        if errors:
            raise errors[0]

    async def _post(self, client, payload):
        """(status, headers, body, refused) of one POST, all within the deadline; refused: why the body was not read."""
        async with asyncio.timeout(self.timeout):  # wall clock over connect and all reads (departure "Bounds")
            async with client.stream("POST", self.url, json=payload) as resp:
                if _retryable(resp.status_code):
                    return resp.status_code, resp.headers, b"", None
                try:
                    return resp.status_code, resp.headers, await read_capped(resp, self.max_reply_bytes), None
                except BadReply as e:
                    return resp.status_code, resp.headers, b"", str(e)

    async def _ask_one(self, client, request, key, api_key):
        """One request, retried as the module docstring says -> (value, None) or (None, why)."""
        if self.mode == "pairwise":
            text, parse = build_pairwise_prompt(*request), parse_verdict
        else:
            text, parse = build_prompt(*request, scale=self.scale), lambda reply: parse_rating(reply, self.scale)
        payload = {"model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
                   "messages": [{"role": "user", "content": text}]}
        transient = garbled = 0
        waited = 0.0
        while True:
            reason = retry_after = None
            self.stats["requests"] += 1
            try:
                status, headers, body, refused = await self._post(client, payload)
            except (TimeoutError, httpx.TimeoutException):
                reason = f"timeout after {self.timeout:g} s"
            except (httpx.UnsupportedProtocol, httpx.LocalProtocolError) as e:  # our request is unsendable: no retry
                raise JudgeFatalError(f"judge {self.public}: request cannot be sent "
                                      f"({type(e).__name__}: {redact(str(e), api_key)})") from None
            except httpx.TransportError as e:
                reason = f"connection error ({type(e).__name__}: {redact(str(e), api_key)})"
            else:
                if status in FATAL_STATUS:
                    hint = FATAL_STATUS[status] + (f" in ${self.api_key_env}" if status == 401 else "")
                    raise JudgeFatalError(f"judge {self.public} answered HTTP {status} ({hint}): "
                                          f"{redact(refused or _error_text(body), api_key)}")
                if _retryable(status):
                    reason, retry_after = f"HTTP {status}", parse_retry_after(headers.get("retry-after"))
                elif status != 200:
                    return None, f"HTTP {status}: {redact(refused or _error_text(body), api_key)}"
                elif refused:
                    return None, f"judge reply refused: {refused}"  # not asked again (departure "Unparseable replies")
                else:
                    content, usage = _read_reply(body)
                    self.stats["prompt_tokens"] += usage["prompt_tokens"]
                    self.stats["completion_tokens"] += usage["completion_tokens"]
                    try:
                        score = parse(content)
                    except ValueError as e:
                        self.stats["parse_failures"] += 1
                        if garbled < self.parse_retries:
                            garbled += 1
                            self.stats["retries"] += 1
                            continue
                        return None, f"unparseable judge reply ({garbled + 1} tries): {redact(str(e), api_key)}"
                    if self.cache:
                        self.cache.put(key, dict(usage, score=score))  # the score and token counts only
                    return score, None
            transient += 1
            if transient > self.max_retries:
                raise JudgeFatalError(f"judge {self.public} unreachable after {self.max_retries} retries: {reason}")
            delay = self.backoff_delay(transient, retry_after)
            if waited + delay > self.max_retry_wait:
                raise JudgeFatalError(f"judge {self.public} still failing ({reason}) after {transient - 1} retries and "
                                      f"{waited:.0f} s of waiting; the next wait ({delay:.0f} s) would pass "
                                      f"--judge-max-retry-wait {self.max_retry_wait:g} s for this answer")
            waited += delay
            self.stats["retries"] += 1
            await self._sleep(delay)


def _retryable(status: int) -> bool:
    return status in (408, 429) or status >= 500


def _error_text(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError, RecursionError):
        return body.decode("utf-8", "replace")


def _read_reply(body: bytes):
    """(content | None, {prompt_tokens, completion_tokens}) of a chat-completion reply; None content when it is not one."""
    try:
        data = json.loads(body)
        content = data["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError, RecursionError):
        return None, {"prompt_tokens": 0, "completion_tokens": 0}
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return content, {k: token_count(usage.get(k)) for k in ("prompt_tokens", "completion_tokens")}
