"""The HTTP judge's dealings with the network, apart from the judging: URL and key checks, the Retry-After
header, scrubbing secrets from messages, and bounded reading of one reply body.

`read_capped` reads a streamed httpx response (`client.stream(...)`) and stops with `BadReply` as soon as
more than `cap` bytes came off the wire or more than `cap` bytes were decoded. It undoes the
Content-Encoding itself with zlib's `max_length`, so a gzip bomb is never inflated past the cap in memory:
httpx's own decoder (behind `aiter_bytes`) inflates each network chunk whole, and deflate expands up to
~1000x, so 64 KiB read could become 64 MiB before any cap is checked. The judge sends
`Accept-Encoding: ACCEPT_ENCODING`; any other encoding in a reply is refused.

`check_base_url` and `check_header_value` turn what could never work (a file:// URL, a key ending in a
CR) into a one-line `JudgeFatalError` when the judge is built, instead of rounds of retried
"connection errors". `public_url` is the base URL without credentials, for messages and the cache key.

Where this departs from, or fills a gap in, the paper:
1. The paper does not deal with misbehaving judge servers; the caps and checks here are ours
   (judge_http.py, departures "Unparseable replies" and "Bounds").
"""
import email.utils
import ipaddress
import re
import time
import urllib.parse
import zlib

from judge_base import JudgeFatalError

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


def redact(text: str, secret) -> str:
    """One line, at most 200 characters, with the key and anything key-like removed."""
    if secret:
        text = text.replace(secret, "***")
    text = re.sub(r"sk-[A-Za-z0-9_*\-.]{3,}", "sk-***", text)
    text = re.sub(r"(?i)bearer\s+\S+", "Bearer ***", text)
    return " ".join(text.split())[:200]


class BadReply(ValueError):
    """A reply body refused: over the size cap, or in an encoding that cannot be decoded."""


def size_text(n: int) -> str:
    """1048576 -> "1 MiB", 65536 -> "64 KiB", 1000 -> "1000 bytes"."""
    if n and n % (1 << 20) == 0:
        return f"{n >> 20} MiB"
    return f"{n >> 10} KiB" if n and n % 1024 == 0 else f"{n} bytes"


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
