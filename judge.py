"""Judges for Dynamic Sample Labeling: score the human and the generated answer of every record.

    python judge.py --in generated.jsonl --out judged.jsonl --judge rule|openai|hf|rm
                    [--judge-model M] [--judge-base-url URL] [--judge-scale 10|100] [--judge-mode single|pairwise]
                    [--judge-concurrency C] [--cache FILE] [--judge-max-missing F] [--judge-* ...]
    python judge.py --flip-report runs/demo          # DSL flip rate per iteration

The judge's settings (`--judge-*`: model, base URL, scale, mode, concurrency, timeout, retries, retry wait, reply
length, API-key variable, batch size, allowed missing scores) are declared once, in `SETTINGS`, and added by
`add_judge_flags` to train.py, judge.py and eval.py under the same names; `judge_from_args` hands them to
`make_judge`. judge.py also accepts its older spellings (--concurrency, --timeout, --max-retries, --max-retry-wait,
--max-tokens, --api-key-env, --max-missing, --batch-size), not shown by --help.

The judges (higher is better; judge_base.py holds their interface, templates and scales):
* `rule` (here; demo records, offline, deterministic), graded by `demo.grade_answer(response,
  record["answer"], prompt)`: 10 if `demo.check_answer` finds the record's canonical answer in the
  response, 3 for an on-topic wrong attempt, 1 for an empty answer, a refusal or an off-topic one.
  Records without "answer", or with one that is null, empty or not a string or number
  (data.answer_problem), are an error naming the record id.
* `openai` (judge_http.py): any OpenAI-compatible chat-completions server, rating each answer on 1..10 or
  1..100 (`scale`), or comparing both answers in both orders (`mode="pairwise"`); cached on disk; retried;
  the key comes from an environment variable only.
* `hf` (judge_hf.py): a local causal LM's expected rating on 1..10 or 1..100 from its next-token probabilities.
* `rm` (judge_rm.py): a sequence-classification reward model's scalar for (prompt, answer), a real number on the
  model's own scale (DSL's tie rule is then an exact float equality); cached like the HTTP judge's.
Every judge but rm scores an empty answer 1 without asking (judge_base.py, departure "Empty answers"; a reward
scale has no bottom, so the reward model scores it).

`judge_records` appends finished rows to `<out>.partial` and, for the HTTP judge, every score to a
cache (`<out>.cache.jsonl` unless one was given), so a killed run resumes without repeating work;
the final file is written atomically. A score that could not be obtained is `null` + "judge_error";
it is never final: a rerun asks for it again (departure "Reruns"). When more than `max_missing` (default
0.2) of all 2 x records scores are missing, the stage stops with a one-line `TooManyMissing` (a
JudgeFatalError) as soon as that is certain, and no final file is written (departure "Missing scores").
The DSL flip counts (`dsl_flip_rate`, the flip report, the summary) are data.dsl_stats, the rule
data.dsl_pairs labels by.

Where this departs from, or fills a gap in, the paper:
1. Rule judge: it stands in for GPT-4o-mini on the offline demo task (the paper only uses GPT-4o-mini).
   It grades (correct > wrong attempt > refusal / off-topic / empty) because a grading LLM judge would:
   with a binary right/wrong score, a human refusal would tie with the model's wrong attempt, and a tie
   keeps the human answer chosen, so DSL would keep training the model toward refusals.
2. Win/tie/loss: Fig. 7's rates here compare two single-answer scores of the same prompt, so they have no
   position bias (no answer is ever shown first); the paper does not say how it ordered answers.
3. Flip rate: it counts generated > human among the records DSL decides by score (identical answers and
   missing scores left out); the paper's "~30 %" counts equal *or* higher, so the tie rate is reported
   beside it.
4. Reruns: rows already judged by the same judge (name, scale, mode) for the same texts are kept on a
   rerun, unless a score is null: such rows are judged again (the cache never holds a null either).
5. Missing scores: a judge stage with more than `max_missing` of its scores missing is an error, not a
   run of plain SPIN pairs (DSL keeps SPIN's pairing for a record without both scores); the paper reports
   no missing scores. `--judge-max-missing 1` accepts any number of them.
"""
import math
import os

from tqdm import tqdm

import demo
import judge_http
from cli import COUNT, fraction, NONNEGATIVE, POSITIVE, POSITIVE_INT, Parser, default_help, hidden_alias
from data import (answer_problem, append_jsonl, dsl_stats, iterations, open_append, read_jsonl, read_jsonl_tolerant,
                  write_jsonl)
from errors import Refusal, one_line
from judge_base import BATCH_SIZE, DEFAULT_SCALE, MODES, SCALES, Judge, JudgeFatalError
from judge_hf import HFJudge
from judge_rm import RewardModelJudge
from judge_http import OpenAIJudge

KINDS = ("rule", "openai", "hf", "rm")
RULE_CORRECT, RULE_WRONG = 10.0, 1.0
RULE_GRADES = {"correct": RULE_CORRECT, "attempt": 3.0, "none": RULE_WRONG}  # demo.grade_answer -> score
REQUIRED = ("id", "prompt", "human", "generated")
MAX_MISSING = 0.2  # judge_records stops above this fraction of missing scores (departure "Missing scores")


# The judge's settings, declared once: (flag, make_judge keyword or None, help, argparse keywords, judge.py's older
# spelling). add_judge_flags adds them to train.py, judge.py and eval.py; judge_from_args hands them to make_judge
# (--judge-max-missing goes to judge_records). The defaults are the judges' own (judge_http.py, judge_base.py);
# "unset" says what a None default means.
SETTINGS = (
    ("--judge", "kind", "which judge", dict(choices=KINDS, default="rule"), None),
    ("--judge-model", "model", "openai: model name; hf: hub id, directory or smollm2-135m; rm: a reward model's "
     "directory or hub id", dict(metavar="NAME", unset=f"{judge_http.MODEL} for openai; hf and rm need one"), None),
    ("--judge-base-url", "base_url", "openai: OpenAI-compatible server URL",
     dict(metavar="URL", unset=judge_http.BASE_URL), None),
    ("--judge-scale", "scale", "openai, hf: rate each answer 1..10 or 1..100, most likely the paper's (judge_base.py)",
     dict(type=int, choices=SCALES, default=DEFAULT_SCALE), None),
    ("--judge-mode", "mode", "openai: single (each answer rated alone) or pairwise (both answers, both orders)",
     dict(choices=MODES, default="single"), None),
    ("--judge-concurrency", "concurrency", "openai: requests in flight at once",
     dict(type=POSITIVE_INT, default=judge_http.CONCURRENCY, metavar="N"), "--concurrency"),
    ("--judge-timeout", "timeout", "openai: one deadline per request over connect and every read",
     dict(type=POSITIVE, default=judge_http.TIMEOUT, metavar="SECONDS"), "--timeout"),
    ("--judge-max-retries", "max_retries", "openai: retries per answer on 429/408/5xx/timeouts/connection errors "
     "(0 = none)", dict(type=COUNT, default=judge_http.MAX_RETRIES, metavar="N"), "--max-retries"),
    ("--judge-max-retry-wait", "max_retry_wait", "openai: seconds of backoff in all per answer before the run stops",
     dict(type=NONNEGATIVE, default=judge_http.MAX_RETRY_WAIT, metavar="SECONDS"), "--max-retry-wait"),
    ("--judge-max-tokens", "max_tokens", "openai: reply length cap in tokens (more for models that think first)",
     dict(type=POSITIVE_INT, default=judge_http.MAX_TOKENS, metavar="N"), "--max-tokens"),
    ("--judge-api-key-env", "api_key_env", "openai: environment variable holding the API key (a local server "
     "needs none)", dict(default=judge_http.API_KEY_ENV, metavar="VAR"), "--api-key-env"),
    ("--judge-batch-size", "batch_size", "hf, rm: answers per forward pass",
     dict(type=POSITIVE_INT, default=BATCH_SIZE, metavar="N"), "--batch-size"),
    ("--judge-max-missing", None, "stop the judge stage when more than this fraction of its scores is missing "
     "(1 = never)", dict(type=fraction, default=MAX_MISSING, metavar="F"), "--max-missing"),
)


def add_judge_flags(group, *, judge="rule", aliases=False):
    """Every judge setting (SETTINGS) as a --judge-* flag of `group` (a parser or an argument group), with its
    default and `%(default)s` help; `judge` is --judge's default (None: a preset sets it). aliases: also accept
    judge.py's older spellings, hidden from --help."""
    for flag, _, text, kw, old in SETTINGS:
        kw = dict(kw, default=judge) if flag == "--judge" else dict(kw)
        action = group.add_argument(flag, help=default_help(text, kw.pop("unset", None)), **kw)
        if aliases and old:
            hidden_alias(group, old, action)


def judge_settings(args) -> dict:
    """make_judge's keywords from the parsed --judge-* flags (all of them but --judge and --judge-max-missing)."""
    return {kw: getattr(args, flag[2:].replace("-", "_")) for flag, kw, *_ in SETTINGS if kw not in (None, "kind")}


def judge_from_args(args, *, cache_path=None, device=None) -> Judge:
    """The judge the parsed --judge-* flags describe (add_judge_flags), every setting passed on."""
    return make_judge(args.judge, cache_path=cache_path, device=device, **judge_settings(args))


def check_judge_args(args) -> None:
    """errors.Refusal (one line) for --judge-* combinations no judge can use, before anything is built or written
    (make_judge raises the same when a judge is built)."""
    problem = None
    if args.judge in ("hf", "rm") and not args.judge_model:
        problem = f"--judge {args.judge} needs --judge-model (a hub id or a directory)"
    elif args.judge != "openai" and args.judge_mode != "single":
        problem = "--judge-mode pairwise needs --judge openai"
    elif args.judge == "rule" and args.judge_scale != DEFAULT_SCALE:
        problem = "--judge rule scores 1..10 only (drop --judge-scale)"
    elif args.judge == "rm" and args.judge_scale != DEFAULT_SCALE:
        problem = "--judge rm scores are the reward model's own real numbers (drop --judge-scale)"
    if problem:
        raise Refusal(problem)


class TooManyMissing(JudgeFatalError):
    """More than max_missing of a judge stage's scores are missing; one line naming count, fraction, first error, flag."""


# ---------------------------------------------------------------- rule judge
class RuleJudge(Judge):
    """10 correct / 3 wrong attempt / 1 empty, refusal or off topic (demo.grade_answer; demo records only)."""

    name = "rule"

    def _score(self, items):
        out = []
        for item in items:
            record = item["record"]
            if "answer" not in record:
                raise ValueError(f"record {record.get('id')}: no 'answer' field; the rule judge needs demo records "
                                 f"with a checkable answer (use --judge openai or hf for other data)")
            if why := answer_problem(record["answer"]):  # never graded against str(None)
                raise ValueError(f"record {record.get('id')}: 'answer' {why}; the rule judge needs a checkable "
                                 f"answer (a non-empty string or a number)")
            self.stats["requests"] += 1
            out.append((RULE_GRADES[demo.grade_answer(item["answer"], str(record["answer"]), item["prompt"])], None))
        return out


def make_judge(kind, *, model=None, base_url=None, cache_path=None, device=None, scale=DEFAULT_SCALE, mode="single",
               concurrency=judge_http.CONCURRENCY, api_key_env=judge_http.API_KEY_ENV, timeout=judge_http.TIMEOUT,
               max_retries=judge_http.MAX_RETRIES, max_retry_wait=judge_http.MAX_RETRY_WAIT,
               max_tokens=judge_http.MAX_TOKENS, batch_size=BATCH_SIZE, **options) -> Judge:
    """rule | openai (model default gpt-4o-mini, base_url default OpenAI) | hf | rm (model required). scale (10 or
    100) and mode (single | pairwise) are the LLM judges' (judge_base.py); pairwise needs the openai judge.
    concurrency, api_key_env, timeout, max_retries, max_retry_wait and max_tokens are the openai judge's,
    batch_size the hf and rm judges'; each judge ignores the others' (the --judge-* flags pass them all).
    `options` go to the judge's class as they are (tests: backoff and sleep of the openai judge)."""
    if kind not in KINDS:
        raise ValueError(f"unknown judge {kind!r} (rule, openai, hf or rm)")
    if kind != "openai" and mode != "single":
        raise ValueError(f"--judge-mode {mode} needs --judge openai (the {kind} judge grades each answer alone)")
    if kind == "rule":
        if scale != DEFAULT_SCALE:
            raise ValueError(f"the rule judge grades 10 / 3 / 1 and has no {scale}-point scale "
                             f"(use --judge openai or hf)")
        return RuleJudge()
    if kind == "openai":
        return OpenAIJudge(model=model or judge_http.MODEL, base_url=base_url or judge_http.BASE_URL,
                           cache_path=cache_path, concurrency=concurrency, api_key_env=api_key_env, scale=scale,
                           mode=mode, timeout=timeout, max_retries=max_retries, max_retry_wait=max_retry_wait,
                           max_tokens=max_tokens, **options)
    if kind == "rm":
        if not model:
            raise ValueError("--judge rm needs --judge-model (a reward model's directory or Hugging Face id)")
        if scale != DEFAULT_SCALE:
            raise ValueError(f"the rm judge's scores are the reward model's own real numbers, not a {scale}-point "
                             f"scale (drop --judge-scale)")
        return RewardModelJudge(model, device=device, cache_path=cache_path, batch_size=batch_size, **options)
    if not model:
        raise ValueError("--judge hf needs --judge-model (a Hugging Face id, a directory or smollm2-135m)")
    return HFJudge(model, device=device, scale=scale, batch_size=batch_size, **options)


# ---------------------------------------------------------------- judging records
def _check_records(records):
    seen = set()
    for n, r in enumerate(records):
        rid = r.get("id", f"#{n}") if isinstance(r, dict) else f"#{n}"
        if not isinstance(r, dict):
            raise ValueError(f"record {rid}: not a JSON object")
        for field in REQUIRED:
            if field not in r:
                raise ValueError(f"record {rid}: missing {field!r}")
        for field in ("prompt", "human", "generated"):
            if not isinstance(r[field], str):
                raise ValueError(f"record {rid}: {field!r} is not a string")
        if rid in seen:
            raise ValueError(f"record {rid}: duplicate id")
        seen.add(rid)


def _scored(row) -> bool:
    return row.get("human_score") is not None and row.get("generated_score") is not None


def judge_records(records, judge, out_path, *, chunk_records=64, progress=True, default_cache=True,
                  max_missing=MAX_MISSING):
    """Score both answers of every record -> (rows in input order, summary); resumable, final file atomic.

    A cacheable judge without a cache gets `<out_path>.cache.jsonl` unless default_cache is False.
    TooManyMissing as soon as more than `max_missing` of the 2 x len(records) scores are missing.
    """
    if not 0 <= max_missing <= 1:
        raise ValueError(f"judge: max_missing must be in [0, 1] (got {max_missing})")
    _check_records(records)
    out_path = str(out_path)
    partial = out_path + ".partial"
    if default_cache and getattr(judge, "cache", False) is None:
        judge.attach_cache(out_path + ".cache.jsonl")
    by_id = {r["id"]: r for r in records}
    done = {}
    for path in (out_path, partial):  # earlier rows of the same judge and texts are kept (departure "Reruns")
        if os.path.exists(path):
            for row in read_jsonl_tolerant(path):
                r = by_id.get(row.get("id"))
                if (r is not None and row.get("judge") == judge.name and all(row.get(k) == r[k] for k in REQUIRED)
                        and _scored(row)):  # a row with a null score is judged again
                    done[row["id"]] = row
    todo = [r for r in records if r["id"] not in done]
    before = dict(judge.stats)
    total, missing, first_error = 2 * len(records), 0, None
    with tqdm(total=len(records), initial=len(records) - len(todo), desc=f"judge {judge.name}", unit="rec",
              disable=not progress) as bar, open_append(partial) as fh:
        for start in range(0, len(todo), chunk_records):
            chunk = todo[start:start + chunk_records]
            for r, ((hs, herr), (gs, gerr)) in zip(chunk, judge.score_records(chunk)):
                row = {k: v for k, v in r.items() if k != "judge_error"}
                row.update(human_score=hs, generated_score=gs, judge=judge.name)
                errors = [f"{side}: {err}" for side, s, err in (("human", hs, herr), ("generated", gs, gerr)) if s is None]
                if errors:
                    row["judge_error"] = "; ".join(errors)
                    missing += len(errors)
                    first_error = first_error or f"{r['id']} {errors[0]}"
                append_jsonl(fh, row)
                done[r["id"]] = row
            bar.update(len(chunk))
            if missing > max_missing * total:  # the final fraction can only grow (departure "Missing scores")
                raise TooManyMissing(
                    f"judge {judge.name}: {missing} of {total} scores missing ({100 * missing / total:.1f} %) after "
                    f"{start + len(chunk)} of {len(todo)} records to judge, more than the allowed {100 * max_missing:g} %; "
                    f"first error: {' '.join(str(first_error).split())[:300]}; fix the judge and rerun (missing "
                    f"scores are asked again) or allow more with --judge-max-missing (now {max_missing:g})")
    rows = [done[r["id"]] for r in records]
    write_jsonl(out_path, rows)
    os.remove(partial)
    used = {k: judge.stats[k] - before.get(k, 0) for k in judge.stats}
    flips = dsl_stats(rows)
    summary = dict(records=len(rows), judged_now=len(todo), resumed=len(rows) - len(todo),
                   requests=used["requests"], cache_hits=used["cache_hits"], retries=used["retries"],
                   parse_failures=used["parse_failures"], empty_answers=used["empty_answers"],
                   errors=sum("judge_error" in r for r in rows),
                   prompt_tokens=used["prompt_tokens"], completion_tokens=used["completion_tokens"],
                   cost_usd=judge.estimate_cost(used["prompt_tokens"], used["completion_tokens"]),
                   dsl_flip_rate=flips["flip_rate"], dsl_tie_rate=flips["tie_rate"], judge=judge.name)
    if "rating_mass" in used:
        summary["mean_rating_mass"] = used["rating_mass"] / max(1, used["requests"])
    return rows, summary


def format_summary(summary: dict) -> str:
    """A short two-column table."""
    def fmt(v):
        if v is None:
            return "unknown"
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    width = max(len(k) for k in summary)
    return "\n".join(f"{k:<{width}}  {fmt(v)}" for k, v in summary.items())


# ---------------------------------------------------------------- comparisons
def win_tie_loss(scores_a, scores_b) -> dict:
    """Rates of A > B, A == B, A < B over prompts where both scores exist (Fig. 7); Nones excluded, counted.

    Each answer was scored alone, so the comparison has no position bias (departure "Win/tie/loss"). Rates are NaN
    when no prompt has both scores.
    """
    if len(scores_a) != len(scores_b):
        raise ValueError(f"win_tie_loss: {len(scores_a)} scores for A but {len(scores_b)} for B")
    pairs = [(a, b) for a, b in zip(scores_a, scores_b) if a is not None and b is not None]
    n = len(pairs)
    wins, ties = sum(a > b for a, b in pairs), sum(a == b for a, b in pairs)
    rate = (lambda k: k / n) if n else (lambda k: math.nan)
    return dict(win=rate(wins), tie=rate(ties), loss=rate(n - wins - ties), n=n,
                excluded=len(scores_a) - n, wins=wins, ties=ties, losses=n - wins - ties)


def dsl_flip_rate(judged_rows) -> float:
    """Fraction of the rows DSL decides by score (data.dsl_stats) whose generated answer scored higher."""
    return dsl_stats(judged_rows)["flip_rate"]


def flip_rates_by_iteration(run_dir) -> list[dict]:
    """data.dsl_stats of every <run_dir>/iter{k}/judged.jsonl, ordered by k."""
    paths = [(k, os.path.join(run_dir, f"iter{k}", "judged.jsonl")) for k in iterations(run_dir)]
    return [dict(iter=k, **dsl_stats(read_jsonl(path))) for k, path in paths if os.path.exists(path)]


# ---------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = Parser(prog="judge.py", description=__doc__.split("\n")[0])
    # --- files
    p.add_argument("--in", dest="inp", help="generated.jsonl: rows {id, prompt, human, generated[, answer]}")
    p.add_argument("--out", help="judged.jsonl to write (atomic; <out>.partial while running)")
    p.add_argument("--flip-report", metavar="RUN_DIR", help="print the DSL flip rate of RUN_DIR/iter*/judged.jsonl and exit")
    p.add_argument("--cache", help="openai, rm: score cache JSONL (default <out>.cache.jsonl; 'off' = no cache)")
    p.add_argument("--device", help="hf, rm: torch device (default cuda if available)")
    add_judge_flags(p.add_argument_group("judge (the same --judge-* flags as train.py and eval.py score)"),
                    aliases=True)
    args = p.parse_args(argv)
    if not args.flip_report and not (args.inp and args.out):
        p.error("--in and --out are required (or --flip-report RUN_DIR)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        if args.flip_report:
            for s in flip_rates_by_iteration(args.flip_report):
                print(f"iter {s['iter']} | records {s['n']} | flips {s['flip_rate']:.1%} | ties {s['tie_rate']:.1%} "
                      f"| missing {s['missing']}")
            return

        check_judge_args(args)
        records = read_jsonl(args.inp)
        cache = None if args.cache in (None, "off") else args.cache
        judge = judge_from_args(args, cache_path=cache, device=args.device)
        _, summary = judge_records(records, judge, args.out, default_cache=args.cache != "off",
                                   max_missing=args.judge_max_missing)
        print(format_summary(summary))
    except (ValueError, OSError) as e:  # JudgeFatalError and errors.Refusal are ValueErrors
        raise SystemExit(one_line("judge.py", e)) from None
    except KeyboardInterrupt:
        raise SystemExit("judge.py: interrupted; rerun the same command to resume") from None


if __name__ == "__main__":
    main()
