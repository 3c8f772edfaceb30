"""Judges for Dynamic Sample Labeling: score the human and the generated answer of every record.

    python judge.py --in generated.jsonl --out judged.jsonl --judge rule|openai|hf|rm
                    [--judge-model M] [--judge-base-url URL] [--judge-scale 10|100] [--judge-mode single|pairwise]
                    [--concurrency C] [--cache FILE] [--judge-max-missing F]
    python judge.py --flip-report runs/demo          # DSL flip rate per iteration

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
import argparse
import math
import os

from tqdm import tqdm

import demo
from data import (answer_problem, append_jsonl, dsl_stats, iterations, open_append, read_jsonl, read_jsonl_tolerant,
                  write_jsonl)
from errors import one_line
from judge_base import DEFAULT_SCALE, MODES, SCALES, Judge, JudgeFatalError
from judge_hf import HFJudge
from judge_rm import RewardModelJudge
from judge_http import MAX_RETRY_WAIT, OpenAIJudge

RULE_CORRECT, RULE_WRONG = 10.0, 1.0
RULE_GRADES = {"correct": RULE_CORRECT, "attempt": 3.0, "none": RULE_WRONG}  # demo.grade_answer -> score
REQUIRED = ("id", "prompt", "human", "generated")
MAX_MISSING = 0.2  # judge_records stops above this fraction of missing scores (departure "Missing scores")


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


def make_judge(kind, *, model=None, base_url=None, cache_path=None, concurrency=8, api_key_env="OPENAI_API_KEY",
               device=None, scale=DEFAULT_SCALE, mode="single", **options) -> Judge:
    """rule | openai (model default gpt-4o-mini, base_url default OpenAI) | hf | rm (model required). scale (10 or
    100) and mode (single | pairwise) are the LLM judges' (judge_base.py); pairwise needs the openai judge."""
    if kind not in ("rule", "openai", "hf", "rm"):
        raise ValueError(f"unknown judge {kind!r} (rule, openai, hf or rm)")
    if kind != "openai" and mode != "single":
        raise ValueError(f"--judge-mode {mode} needs --judge openai (the {kind} judge grades each answer alone)")
    if kind == "rule":
        if scale != DEFAULT_SCALE:
            raise ValueError(f"the rule judge grades 10 / 3 / 1 and has no {scale}-point scale "
                             f"(use --judge openai or hf)")
        return RuleJudge()
    if kind == "openai":
        return OpenAIJudge(model=model or "gpt-4o-mini", base_url=base_url or "https://api.openai.com/v1",
                           cache_path=cache_path, concurrency=concurrency, api_key_env=api_key_env, scale=scale,
                           mode=mode, **options)
    if kind == "rm":
        if not model:
            raise ValueError("--judge rm needs --judge-model (a reward model's directory or Hugging Face id)")
        if scale != DEFAULT_SCALE:
            raise ValueError(f"the rm judge's scores are the reward model's own real numbers, not a {scale}-point "
                             f"scale (drop --judge-scale)")
        return RewardModelJudge(model, device=device, cache_path=cache_path, **options)
    if not model:
        raise ValueError("--judge hf needs --judge-model (a Hugging Face id, a directory or smollm2-135m)")
    return HFJudge(model, device=device, scale=scale, **options)


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
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # --- files
    p.add_argument("--in", dest="inp", help="generated.jsonl: rows {id, prompt, human, generated[, answer]}")
    p.add_argument("--out", help="judged.jsonl to write (atomic; <out>.partial while running)")
    p.add_argument("--flip-report", metavar="RUN_DIR", help="print the DSL flip rate of RUN_DIR/iter*/judged.jsonl and exit")
    # --- judge
    p.add_argument("--judge", choices=("rule", "openai", "hf", "rm"), default="rule", help="which judge (default rule)")
    p.add_argument("--judge-model", help="openai: model name (default gpt-4o-mini); hf: HF id, directory or "
                                         "smollm2-135m; rm: a reward model's directory or HF id")
    p.add_argument("--judge-base-url", help="openai: server base URL (default https://api.openai.com/v1)")
    p.add_argument("--judge-scale", type=int, choices=SCALES, default=DEFAULT_SCALE,
                   help="openai, hf: rate each answer on 1..10 (default) or 1..100 (most likely the paper's)")
    p.add_argument("--judge-mode", choices=MODES, default="single",
                   help="openai: single (each answer rated alone, default) or pairwise (both answers, both orders)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (not needed for a local server)")
    p.add_argument("--cache", help="openai, rm: score cache JSONL (default <out>.cache.jsonl; 'off' = no cache)")
    p.add_argument("--concurrency", type=int, default=8, help="openai: requests in flight at once")
    p.add_argument("--timeout", type=float, default=60.0, help="openai: deadline in seconds per request (connect + reply)")
    p.add_argument("--max-retries", type=int, default=6, help="openai: retries per answer on 429/5xx/timeouts (0 = none)")
    p.add_argument("--max-tokens", type=int, default=16, help="openai: reply length cap in tokens")
    p.add_argument("--max-retry-wait", type=float, default=MAX_RETRY_WAIT,
                   help=f"openai: seconds of backoff in all per answer before the run stops (default {MAX_RETRY_WAIT:g})")
    p.add_argument("--judge-max-missing", "--max-missing", dest="max_missing", type=float, default=MAX_MISSING,
                   help="stop when more than this fraction of scores is missing (default 0.2; 1 = never)")
    p.add_argument("--device", help="hf, rm: torch device (default cuda if available)")
    p.add_argument("--batch-size", type=int, default=8, help="hf, rm: answers per forward pass")
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

        records = read_jsonl(args.inp)
        options = {}
        if args.judge == "openai":
            options = dict(timeout=args.timeout, max_retries=args.max_retries, max_tokens=args.max_tokens,
                           max_retry_wait=args.max_retry_wait)
        elif args.judge in ("hf", "rm"):
            options = dict(batch_size=args.batch_size)
        cache = None if args.cache in (None, "off") else args.cache
        judge = make_judge(args.judge, model=args.judge_model, base_url=args.judge_base_url, cache_path=cache,
                           concurrency=args.concurrency, api_key_env=args.api_key_env, device=args.device,
                           scale=args.judge_scale, mode=args.judge_mode, **options)
        _, summary = judge_records(records, judge, args.out, default_cache=args.cache != "off",
                                   max_missing=args.max_missing)
        print(format_summary(summary))
    except (ValueError, OSError) as e:  # JudgeFatalError and errors.Refusal are ValueErrors
        raise SystemExit(one_line("judge.py", e)) from None
    except KeyboardInterrupt:
        raise SystemExit("judge.py: interrupted; rerun the same command to resume") from None


if __name__ == "__main__":
    main()
