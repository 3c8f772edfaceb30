"""Datasets, the built-in demo task, chat-template tokenization, collation and DSL pairing.

Record formats read by `load_records` (JSONL, or parquet when pyarrow is installed), one object per line:
  plain      {"id"?, "prompt", "response", "answer"?}
  UltraChat  {"prompt_id"?, "messages": [{"role", "content"}, ...]}   first user turn / first assistant turn after it
  SPIN       {"real": [user msg, assistant msg], "generated": [...]}  the "generated" side is ignored (we regenerate)
all normalised to {"id", "prompt", "response", ["answer", "family", "flawed", "flaw"]}; a missing id is
`prompt_id(prompt)`, a stable hash.

The demo task (`--data demo`, the default) lives in demo.py; `load_prompts` dispatches to it.

Where this departs from, or fills a gap in, the paper:
1. Truncation (paper: max length 1024, max prompt length 512; the rule is TRL/SPIN's): when prompt + the
   longer answer exceed max_length, the prompt keeps its LAST max_prompt_length tokens (the generation
   prompt stays), then each answer keeps its FIRST max_length - len(prompt) tokens (EOS may be cut).
2. DSL ties: equal scores keep the human answer chosen (SPIN's pairing, the paper's baseline); a record
   with a missing score keeps SPIN's pairing and is counted; a record whose generated answer equals the
   human answer (after stripping whitespace) is dropped and counted: its margin is 0 whatever θ is, so it
   carries no preference.
3. α-SPIN history (`history_pairs`): the paper trains α-SPIN on "a 50:50 mix" of the data of iterations
   t and t-1 (Sec. 5.3); we read that as a data set of one iteration's size, half drawn from each (seeded),
   and generalise it to h iterations in equal shares. `mix="concat"` keeps all pairs of all h iterations.
4. Answers: a record's "answer" is what the rule judge and eval.py check responses against, so it must be
   a non-empty string or a finite number (`answer_problem`). `"answer": null` (or "", a list, a boolean)
   in a JSONL file is a data bug and is refused as "file:line: 'answer' is null"; a record without a
   checkable answer leaves the key out. In parquet, where a column's missing value is null, a null
   answer (family, flawed, flaw) is read as the key left out.
5. Chat templates: a model directory's chat template is Jinja code run on every prompt. Every render
   (`render_chat`) is bounded: CHAT_TEMPLATE_SECONDS (a SIGALRM timer in the main thread, a helper thread
   stopped by an asynchronous exception elsewhere) and CHAT_TEMPLATE_MAX_CHARS beyond 4 × the turn's text;
   a template that calls raise_exception, uses {% include %} / {% import %} / {% extends %} (the sandbox
   has no other template), fails or overruns is a one-line ValueError naming the tokenizer's directory.
   model.load_tokenizer renders one sample turn when the tokenizer loads, so this stops before any work.
"""
import contextlib
import ctypes
import errno
import hashlib
import json
import math
import os
import pathlib
import random
import re
import signal
import sys
import tempfile
import threading
import time

import torch

import demo
import diskspace

# --- JSONL ------------------------------------------------------------------------------------------


def read_jsonl(path) -> list[dict]:
    """All objects of a JSONL file (blank lines skipped); ValueError "file:line: reason" on a bad line."""
    records = []
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                records.append(_parse_line(path, lineno, line))
    return records


def _decode(path, lineno, line) -> str:
    """One line's bytes as text; ValueError "file:line: ..." when they are not UTF-8."""
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1}); "
                         f"re-encode the file as UTF-8") from None


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a \uD800..\uDFFF escape: maybe half a pair


def _parse_line(path, lineno, line) -> dict:
    if isinstance(line, bytes):
        line = _decode(path, lineno, line)
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    except RecursionError:  # [[[[... : Python's JSON parser recurses once per level
        raise ValueError(f"{path}:{lineno}: JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    if _SURROGATE_ESCAPE.search(line):  # escapes of a valid pair decode to one character; a lone half stays
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid Unicode (a lone surrogate \\u{ord(e.object[e.start]):04x}, "
                             f"half of a UTF-16 pair); fix or drop the line") from None
    return obj


def read_json(path, kind=dict):
    """One JSON document of type `kind` (None: any); ValueError "file: reason" when it is missing, a
    directory, unreadable, not UTF-8, invalid, nested too deeply or of another type."""
    try:
        text = pathlib.Path(path).read_bytes().decode("utf-8")
        obj = json.loads(text)
    except FileNotFoundError:
        raise ValueError(f"{path}: missing") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not a JSON file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from None
    if kind is not None and not isinstance(obj, kind):
        raise ValueError(f"{path}: expected a JSON {'object' if kind is dict else kind.__name__}, "
                         f"got {type(obj).__name__}")
    return obj


@contextlib.contextmanager
def atomic_open(path, binary=False):
    """Open a temporary file (text, or bytes with binary=True) beside `path`; on success it replaces `path`
    in one os.replace.

    A crash or Ctrl-C mid-write leaves the old file (or none) and no temporary file behind.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with diskspace.translate(path):  # a full disk: one line naming the file
            with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as fh:
                yield fh
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary readable files
        os.replace(tmp, path)  # a symbolic link at path is replaced, its target never written
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(path, records) -> None:
    """Write records as JSONL atomically (tmp file in the same directory, then os.replace)."""
    with atomic_open(path) as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_json(path, obj) -> None:
    """Write one JSON document atomically (indented, keys sorted)."""
    with atomic_open(path) as fh:
        fh.write(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def append_jsonl(fh, record) -> None:
    """Append one record as a line and flush, so a crash loses at most the line being written."""
    with diskspace.translate(fh.name):
        fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        fh.flush()


def read_jsonl_tolerant(path) -> list[dict]:
    """Rows of an append-only JSONL file that a kill may have cut mid-line (a partial output, a cache).

    A line counts only once its newline is on disk, so a torn last line is ignored (open_append cuts it
    off before the next append); a bad line before it is a ValueError naming file:line. No file: [].
    """
    if not os.path.exists(path):
        return []
    with open(path, "rb") as fh:
        blob = fh.read()
    complete = blob[:blob.rfind(b"\n") + 1]  # the lines whose newline was written
    rows = []
    for lineno, line in enumerate(complete.split(b"\n")[:-1], 1):
        if line.strip():
            try:
                rows.append(_parse_line(path, lineno, line))
            except ValueError as e:
                reason = str(e).removeprefix(f"{path}:{lineno}: ")
                raise ValueError(f"{path}:{lineno}: corrupt line in an append-only file ({reason}); "
                                 f"delete the file to start over") from None
    return rows


def refuse_symlink(path) -> None:
    """ValueError (one line) when path is a symbolic link: files in a run directory are appended to or
    repaired in place only when they are the run directory's own regular files, never a link's target."""
    if os.path.islink(path):
        raise ValueError(f"{path}: is a symbolic link (to {os.readlink(path)}); files the pipeline appends to or "
                         f"repairs are never written through a link: replace it with a regular file (or delete it)")


def _nofollow(path, flags):
    """open()'s opener with O_NOFOLLOW: a link put in place after refuse_symlink still fails (one line)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            refuse_symlink(path)
        raise


def drop_torn_line(path) -> None:
    """Cut off a torn last line (a kill mid-append) of an append-only file, if it exists (never a link's target)."""
    if os.path.lexists(path):
        refuse_symlink(path)
        with open(path, "rb+", opener=_nofollow) as fh:
            fh.truncate(fh.read().rfind(b"\n") + 1)  # no-op when the file ends with a newline


def open_append(path):
    """Open an append-only JSONL file for appending, first cutting off a torn last line (a kill mid-write);
    a symbolic link is refused (refuse_symlink), not followed."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    drop_torn_line(path)
    return open(path, "a", encoding="utf-8", opener=_nofollow)


def prompt_id(prompt: str) -> str:
    """Stable id of a prompt: the first 16 hex digits of its SHA-1."""
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:16]


# --- dataset formats --------------------------------------------------------------------------------

PASS_THROUGH = ("answer", "family", "flawed", "flaw")


def answer_problem(value) -> str | None:
    """Why `value` cannot be a record's checkable "answer" (departure 4), or None when it can: a non-empty
    string or a finite number (int or float, not a bool)."""
    if value is None:
        return "is null (a record without a checkable answer leaves the key out)"
    if isinstance(value, str):
        return None if value.strip() else "is empty (every answer would match it)"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return None if math.isfinite(value) else f"is {value} (not a finite number)"
    kind = {bool: "a boolean", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)
    return f"is {kind}, not a string or a number"


def _first_turns(messages):
    """(first user content, first assistant content after it) of a chat message list."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError("messages must be a list of {role, content} objects")
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise ValueError("no user turn in messages")
    replies = [m for m in messages[users[0] + 1:] if m.get("role") == "assistant"]
    if not replies:
        raise ValueError("no assistant turn after the first user turn")
    return messages[users[0]].get("content"), replies[0].get("content")


def normalize_record(obj: dict) -> dict:
    """One input object in any supported format -> {"id","prompt","response",...}; ValueError on a bad one."""
    if "messages" in obj:
        prompt, response = _first_turns(obj["messages"])
        rid = obj.get("prompt_id", obj.get("id"))
    elif "real" in obj:
        prompt, response = _first_turns(obj["real"])
        rid = obj.get("id")
    elif "prompt" in obj:
        if "response" not in obj:
            raise ValueError("missing field 'response'")
        prompt, response, rid = obj["prompt"], obj["response"], obj.get("id")
    else:
        raise ValueError("unknown format: expected 'prompt'+'response', 'messages' (UltraChat) or 'real' (SPIN)")
    for name, value in (("prompt", prompt), ("response", response)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"empty or non-string {name}")
    if "answer" in obj and (why := answer_problem(obj["answer"])):
        raise ValueError(f"'answer' {why}")
    record = {"id": str(rid) if rid is not None else prompt_id(prompt), "prompt": prompt, "response": response}
    record.update({k: obj[k] for k in PASS_THROUGH if k in obj})
    return record


def _raw_rows(path):
    """(line number, object or error) for JSONL; (row number, object) for parquet."""
    if str(path).endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        for row_number, row in enumerate(pq.read_table(path).to_pylist(), 1):  # a column's null: the key left out
            yield row_number, {k: v for k, v in row.items() if not (v is None and k in PASS_THROUGH)}
        return
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield lineno, _parse_line(path, lineno, line)
                except ValueError as e:
                    yield lineno, e


def check_file(path) -> None:
    """ValueError naming path unless it is a readable regular file (a dataset, not a directory)."""
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, not a dataset file (give the .jsonl or .parquet file)")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")


def load_records(path, skip_bad=False, return_skipped=False):
    """Normalised records of a dataset file. A bad line raises ValueError("file:line: reason"), or with
    skip_bad is skipped and counted (warning on stderr; (records, skipped) when return_skipped)."""
    check_file(path)
    records, seen, skipped = [], set(), 0
    for lineno, obj in _raw_rows(path):
        try:
            if isinstance(obj, Exception):
                raise obj
            record = normalize_record(obj)
            if record["id"] in seen:
                raise ValueError(f"duplicate id {record['id']!r}")
        except ValueError as e:
            message = str(e) if str(e).startswith(f"{path}:") else f"{path}:{lineno}: {e}"
            if not skip_bad:
                raise ValueError(message) from None
            skipped += 1
            continue
        seen.add(record["id"])
        records.append(record)
    if skipped:
        print(f"{path}: skipped {skipped} bad line(s)", file=sys.stderr)
    if not records:
        raise ValueError(f"{path}: no usable records")
    return (records, skipped) if return_skipped else records


def load_prompts(data=None, split="train", max_prompts=None, seed=0, flaw_rate=0.3, skip_bad=False) -> list[dict]:
    """Records to train or evaluate on: the demo task when data is None/"demo" (default sizes: train 2000,
    eval 200), else a dataset file; max_prompts keeps a deterministic prefix (None = all / the default)."""
    if data in (None, "demo"):
        return demo.demo_records(split, n=max_prompts, seed=seed, flaw_rate=flaw_rate)
    records = load_records(data, skip_bad=skip_bad)
    return records if max_prompts is None else records[:max_prompts]


# --- DSL pairing and history ---------------------------------------------------------------------------


def dsl_outcome(row) -> str:
    """DSL's verdict on one judged row, the one rule every flip count uses: "identical" (the two texts are
    equal after stripping whitespace: dropped), "missing" (a null score: SPIN's pairing), "flip" (generated
    scored higher: it becomes chosen), "tie" (equal scores: the human answer stays chosen) or "human"."""
    for key in ("id", "prompt", "human", "generated"):
        if key not in row:
            raise ValueError(f"record {row.get('id', '?')}: judged row is missing {key!r}")
    if row["human"].strip() == row["generated"].strip():
        return "identical"
    hs, gs = row.get("human_score"), row.get("generated_score")
    if hs is None or gs is None:
        return "missing"
    return "flip" if gs > hs else "tie" if gs == hs else "human"


def dsl_stats(judged) -> dict:
    """Counts of dsl_outcome over judged rows, with flip and tie rates among the rows DSL decided by score
    (neither identical nor missing; NaN when there is none)."""
    counts = {outcome: 0 for outcome in ("flip", "tie", "human", "missing", "identical")}
    for row in judged:
        counts[dsl_outcome(row)] += 1
    decided = counts["flip"] + counts["tie"] + counts["human"]
    return dict(n=len(judged), flips=counts["flip"], ties=counts["tie"], missing=counts["missing"],
                identical=counts["identical"], flip_rate=counts["flip"] / decided if decided else math.nan,
                tie_rate=counts["tie"] / decided if decided else math.nan)


def dsl_pairs(judged: list[dict], dsl: bool):
    """Pairs from judged rows by dsl_outcome: DSL puts the higher-scored answer chosen (ties and missing
    scores keep the human answer chosen, identical answers are dropped); dsl=False always keeps the human
    chosen. Returns (pairs, stats(n, flips, ties, missing, identical)): what was applied (0 flips without DSL)."""
    counts = dsl_stats(judged)
    stats = {k: counts[k] if dsl or k in ("n", "identical") else 0
             for k in ("n", "flips", "ties", "missing", "identical")}
    pairs = []
    for row in judged:
        if (outcome := dsl_outcome(row)) == "identical":
            continue
        flip, human, generated = dsl and outcome == "flip", row["human"], row["generated"]
        pairs.append({"id": row["id"], "prompt": row["prompt"],
                      "chosen": generated if flip else human, "rejected": human if flip else generated,
                      "chosen_source": "generated" if flip else "human"})
    return pairs, stats


def iterations(run_dir) -> list[int]:
    """Sorted k of every <run_dir>/iter{k}/ directory."""
    found = [int(m.group(1)) for p in pathlib.Path(run_dir).glob("iter*")
             if p.is_dir() and (m := re.fullmatch(r"iter(\d+)", p.name))]
    return sorted(found)


HISTORY_MIXES = ("same_size", "concat")


def history_pairs(run_dir, k, h, mix="same_size", seed=0) -> list[dict]:
    """α-SPIN mixing of iter{j}/pairs.jsonl for j = max(0, k-h+1) .. k, each pair tagged "iter": j.

    same_size (default, the paper's "50:50 mix" for h = 2): as many pairs as iteration k has, an equal share
    drawn from each iteration (the latest ones take the remainder), without replacement, seeded by (seed, k),
    kept in file order; an iteration with fewer pairs than its share gives all it has. concat: every pair of
    every iteration (h times the data). h = 1: iteration k's pairs either way.
    """
    if h < 1:
        raise ValueError(f"history must be >= 1 iteration, got {h}")
    if mix not in HISTORY_MIXES:
        raise ValueError(f"history mix must be one of {HISTORY_MIXES}, got {mix!r}")
    window = range(max(0, k - h + 1), k + 1)
    by_iter = {}
    for j in window:
        path = pathlib.Path(run_dir) / f"iter{j}" / "pairs.jsonl"
        if not path.is_file():
            raise ValueError(f"{path}: missing (history {h} needs iterations {window[0]}..{k})")
        by_iter[j] = [{**p, "iter": j} for p in read_jsonl(path)]
    if mix == "concat" or len(window) == 1:
        return [p for j in window for p in by_iter[j]]
    total, rng = len(by_iter[k]), random.Random(f"history:{seed}:{k}")
    shares = [total // len(window) + (i >= len(window) - total % len(window)) for i in range(len(window))]
    out = []
    for j, share in zip(window, shares):
        keep = sorted(rng.sample(range(len(by_iter[j])), min(share, len(by_iter[j]))))
        out += [by_iter[j][i] for i in keep]
    return out


# --- tokenization and collation ------------------------------------------------------------------------


# A chat template is code that comes with a model directory (tokenizer_config.json / chat_template.jinja): every
# render is bounded (departure 5). A real template renders one user turn in about a millisecond.
CHAT_TEMPLATE_SECONDS = 10.0
CHAT_TEMPLATE_MAX_CHARS = 100_000  # what a template may add around the turn's own text
SAMPLE_TURN = "What is 2 + 3?"  # the turn rendered once when a tokenizer loads (check_chat_template)


class _TemplateTimeout(BaseException):
    """Raised inside a render that overran CHAT_TEMPLATE_SECONDS (a BaseException: no `except Exception` in a
    template's helpers or in transformers swallows it)."""


def _run_limited(fn, seconds):
    """fn() stopped after `seconds` by _TemplateTimeout. In the main thread a SIGALRM timer (setitimer)
    interrupts it; in any other thread fn runs in a helper thread, and on timeout the exception is raised in
    that thread (PyThreadState_SetAsyncExc) so the runaway render stops there too."""
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        def on_alarm(signum, frame):
            raise _TemplateTimeout
        old_handler = signal.signal(signal.SIGALRM, on_alarm)
        old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
        t0 = time.monotonic()
        try:
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_handler)
            if old_delay:  # a timer someone else had set: re-armed with what is left of it
                signal.setitimer(signal.ITIMER_REAL, max(old_delay - (time.monotonic() - t0), 1e-3), old_interval)
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller's thread below
            box["error"] = e
    worker = threading.Thread(target=target, name="chat-template", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(worker.ident), ctypes.py_object(_TemplateTimeout))
        raise _TemplateTimeout
    if "error" in box:
        raise box["error"]
    return box["value"]


def _template_reason(tokenizer, error) -> str:
    """What went wrong in a chat template's render, in words (one line)."""
    import jinja2

    text = " ".join(str(error).split())[:200]
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    if isinstance(error, TypeError) and "no loader" in text and template:  # the sandbox has no template loader
        try:
            body = jinja2.Environment().parse(template)
            tags = [tag for tag, node in (("include", jinja2.nodes.Include), ("import", jinja2.nodes.Import),
                                          ("from ... import", jinja2.nodes.FromImport),
                                          ("extends", jinja2.nodes.Extends)) if body.find(node) is not None]
        except jinja2.TemplateError:
            tags = []
        return (f"it uses {' and '.join('{% ' + tag + ' %}' for tag in tags) or 'another template'}, which is not "
                f"allowed: a chat template must be self-contained (no other template can be found)")
    if type(error) is jinja2.TemplateError:  # what the template's raise_exception(message) raises
        return f"it calls raise_exception: {text!r}"
    if isinstance(error, jinja2.TemplateSyntaxError):
        return f"syntax error at line {error.lineno}: {text}"
    if isinstance(error, jinja2.exceptions.SecurityError):
        return f"the sandbox refused it: {text}"
    return f"{type(error).__name__}: {text}"


def render_chat(tokenizer, messages, tokenize=False):
    """tokenizer.apply_chat_template(messages, add_generation_prompt=True): the text, or with tokenize the token
    ids; bounded (CHAT_TEMPLATE_SECONDS, CHAT_TEMPLATE_MAX_CHARS beyond 4 × the turns' text). A template that
    fails, overruns or blows up is a one-line ValueError naming the tokenizer's directory (departure 5)."""
    source = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    fix = "fix the chat template (chat_template.jinja or tokenizer_config.json) or use another model"
    try:
        out = _run_limited(lambda: tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                 tokenize=tokenize, return_dict=tokenize),
                           CHAT_TEMPLATE_SECONDS)
    except _TemplateTimeout:
        raise ValueError(f"{source}: rendering one chat turn through the chat template took over "
                         f"{CHAT_TEMPLATE_SECONDS:g} s (a runaway loop?); {fix}") from None
    except Exception as e:  # anything the template's code raised
        raise ValueError(f"{source}: the chat template cannot be rendered: {_template_reason(tokenizer, e)}; "
                         f"{fix}") from None
    size = len(out["input_ids"]) if tokenize else len(out)
    limit = 4 * sum(len(str(m.get("content", ""))) for m in messages) + CHAT_TEMPLATE_MAX_CHARS
    if size > limit:
        unit = "tokens" if tokenize else "characters"
        raise ValueError(f"{source}: the chat template turns one chat turn into {size} {unit} (at most {limit}: "
                         f"4 × the turn's text + {CHAT_TEMPLATE_MAX_CHARS}); {fix}")
    return list(out["input_ids"]) if tokenize else out


def check_chat_template(tokenizer) -> None:
    """Render one short user turn (SAMPLE_TURN) through the tokenizer's chat template, as every prompt will
    be: a template that raises, includes another template, loops away or blows up stops here, in one line
    naming the model directory, when the tokenizer loads (model.load_tokenizer), not mid-generation."""
    render_chat(tokenizer, [{"role": "user", "content": SAMPLE_TURN}])


def chat_prompt_ids(tokenizer, prompt) -> list[int]:
    """Token ids of one user turn through the chat template, ending with the assistant header: the same
    ids whether the model is answering (generate.py) or being trained on an answer (tokenize_pair)."""
    return render_chat(tokenizer, [{"role": "user", "content": prompt}], tokenize=True)


def truncate_prompt(prompt_ids, max_prompt_length) -> list[int]:
    """The LAST max_prompt_length prompt tokens (departure "Truncation": the assistant header at the end stays)."""
    return list(prompt_ids[-max_prompt_length:]) if max_prompt_length else list(prompt_ids)


def tokenize_pair(tokenizer, pair, max_length=1024, max_prompt_length=512) -> dict:
    """Chat-template token ids and labels (-100 on the prompt) of a pair's chosen and rejected sequences,
    truncated by the rule in the module docstring (departure "Truncation")."""
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length ({max_prompt_length}) < max_length ({max_length})")
    prompt_ids = chat_prompt_ids(tokenizer, pair["prompt"])
    eos = tokenizer.eos_token_id
    answers = {side: tokenizer(pair[side], add_special_tokens=False)["input_ids"] + [eos]
               for side in ("chosen", "rejected")}
    if len(prompt_ids) + max(map(len, answers.values())) > max_length:
        prompt_ids = truncate_prompt(prompt_ids, max_prompt_length)  # keep the end: the generation prompt
        answers = {side: ids[:max_length - len(prompt_ids)] for side, ids in answers.items()}
    out = {}
    for side, ids in answers.items():
        out[f"{side}_input_ids"] = prompt_ids + ids
        out[f"{side}_labels"] = [-100] * len(prompt_ids) + ids
    return out


def pad_rows(rows, pad_value, side="right"):
    """Lists of token ids (or labels) -> ((N, T) long tensor padded with pad_value on `side`, (N, T) attention
    mask: 1 on each row's own entries). Training pads on the right, generation and the hf judge on the left."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    width = max(len(row) for row in rows)
    padded = torch.full((len(rows), width), pad_value, dtype=torch.long)    # (N, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)                # (N, T)
    for i, row in enumerate(rows):
        cols = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        padded[i, cols] = torch.tensor(row, dtype=torch.long)
        mask[i, cols] = 1
    return padded, mask


def collate_pairs(examples, pad_token_id) -> dict:
    """Stack B tokenized pairs into 2B right-padded rows (chosen rows 0..B-1, rejected rows B..2B-1)."""
    rows = {key: [e[f"{side}_{key}"] for side in ("chosen", "rejected") for e in examples] for key in ("input_ids", "labels")}
    input_ids, attention_mask = pad_rows(rows["input_ids"], pad_token_id)   # (2B, T)
    labels, _ = pad_rows(rows["labels"], -100)                              # (2B, T)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
