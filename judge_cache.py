"""The HTTP judge's score cache: an append-only JSONL file of {key, score, prompt_tokens, completion_tokens}.

The key is the sha256 of what decides a score (judge_http uses: the base URL without credentials, judge
model, template version, prompt, answer or answers), so two servers serving models of the same name share nothing.
A row holds the parsed score and the reply's token counts only, never the reply's text (a reply may be
large, or repeat what it was sent, the API key included). Only a finite number is a score: a row with a
null or unreadable score is no hit, so an answer that failed is asked again on a rerun.

Cache files written before this format (rows with the raw "reply" and a "usage" object) still load: each
row keeps its score and token counts, and the file is rewritten once, atomically, without the text (one
line on stderr says so). Their keys lack the base URL, so they never match a new key and cost nothing.

Where this departs from, or fills a gap in, the paper:
1. The paper does not say whether its judge scores were cached; this cache is ours (judge_http.py,
   departure "Cache format").
"""
import hashlib
import json
import math
import sys

from data import append_jsonl, open_append, read_jsonl_tolerant, write_jsonl

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
    usage = row["usage"] if isinstance(row.get("usage"), dict) else row  # older rows: a "usage" object
    return {"key": row["key"], "score": float(score), "prompt_tokens": token_count(usage.get("prompt_tokens")),
            "completion_tokens": token_count(usage.get("completion_tokens"))}


class ScoreCache:
    """Scores by key, loaded from and appended to one JSONL file (one writer per file)."""

    def __init__(self, path):
        self.path = str(path)
        rows = read_jsonl_tolerant(self.path)
        self.entries = {}
        for row in rows:
            if (clean := clean_row(row)) is not None:
                self.entries[clean["key"]] = clean
        old = sum(isinstance(row, dict) and not set(row) <= set(FIELDS) for row in rows)
        if old:  # rows of the older format may hold reply text: rewrite the file without it
            write_jsonl(self.path, self.entries.values())
            print(f"judge cache {self.path}: rewrote it without the reply text of {old} older rows "
                  f"({len(self.entries)} scores kept)", file=sys.stderr)
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
