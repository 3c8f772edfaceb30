"""Judges for Dynamic Sample Labeling: score the human and the generated answer of every record.

    python judge.py --in generated.jsonl --out judged.jsonl --judge rule|openai|hf
                    [--judge-model M] [--judge-base-url URL] [--concurrency C] [--cache FILE]
    python judge.py --flip-report runs/demo          # DSL flip rate per iteration

Three judges share one scale, 1..10 (higher is better):
* `rule`  (demo records, offline, deterministic): 10 if `demo.check_answer(response, record["answer"],
  prompt)` finds the record's canonical answer in the response, else 1. Records without "answer" are
  an error naming the record id.
* `openai` (judge_http.py): any OpenAI-compatible chat-completions server; the reply "Rating: [[N]]" is
  parsed; cached on disk; retried; the key comes from an environment variable only.
* `hf`: a local causal LM given the same template followed by "Rating: [[". With p_i the next-token
  probability of the rating i, the score is the expected rating  Σ_i p_i·i / Σ_i p_i  over i = 1..10.
  "10": if it is one token of its own, its probability is used; if its first token is the token of
  "1" (digit-by-digit tokenizers, e.g. SmolLM2), one more token on the KV cache gives q = P("0" | "1")
  and p_1 is split into p_10 = p_1·q and p_1·(1 - q) (p_1·(1 - q) also holds "1.5", "11", ...: an
  approximation); otherwise "10" is read by its first token.
Every judge scores an empty answer 1 without asking (judge_http deviation 4).

`judge_records` appends finished rows to `<out>.partial` and, for the HTTP judge, every score to a
cache (`<out>.cache.jsonl` unless one was given), so a killed run resumes without repeating work;
the final file is written atomically. A score that could not be obtained is `null` + "judge_error".

Where this departs from, or fills a gap in, the paper:
1. The rule judge stands in for GPT-4o-mini on the offline demo task (the paper only uses GPT-4o-mini).
2. The paper's grading template (Appendix B) is lost from our copy; see judge_http.TEMPLATE.
3. Fig. 7's win/tie/loss here compares two single-answer scores of the same prompt, so it has no
   position bias (no answer is ever shown first); the paper does not say how it ordered answers.
4. The DSL flip rate counts generated > human; the paper's "~30 %" counts equal *or* higher, so the
   tie rate is reported beside it.
5. Rows already judged by the same judge for the same texts are kept on a rerun, including null
   scores; delete the row (or the file) to ask again.
"""
import argparse
import math
import os

import torch
from tqdm import tqdm

from data import append_jsonl, iterations, open_append, read_jsonl, read_jsonl_tolerant, write_jsonl
from judge_http import (EMPTY_SCORE, RATING_PREFIX, Judge, JudgeFatalError, OpenAIJudge, build_prompt,  # noqa: F401
                        parse_rating)

RULE_CORRECT, RULE_WRONG = 10.0, 1.0
REQUIRED = ("id", "prompt", "human", "generated")


# ---------------------------------------------------------------- rule judge
class RuleJudge(Judge):
    """10 if the record's checkable answer is found in the response, else 1 (demo records only)."""

    name = "rule"

    def _score(self, items):
        import demo  # lazy: demo.py owns what "correct" means for each demo family

        out = []
        for item in items:
            record = item["record"]
            if "answer" not in record:
                raise ValueError(f"record {record.get('id')}: no 'answer' field; the rule judge needs demo records "
                                 f"with a checkable answer (use --judge openai or hf for other data)")
            self.stats["requests"] += 1
            out.append((RULE_CORRECT if demo.check_answer(item["answer"], str(record["answer"]), item["prompt"])
                        else RULE_WRONG, None))
        return out


# ---------------------------------------------------------------- local LM judge
class HFJudge(Judge):
    """Expected rating from a local causal LM's next-token probabilities after "Rating: [["."""

    def __init__(self, model, tokenizer=None, device=None, batch_size=8):
        super().__init__()
        if tokenizer is None:
            import model as model_lib  # lazy: loading is model.py's job
            name = model
            model, tokenizer = model_lib.load_model(model, device=device)
        else:
            name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.name = f"hf:{name}"
        self.stats["rating_mass"] = 0.0  # Σ over answers of Σ_i p_i: low means the LM ignores the format
        self.digit_ids, self.ten_ids = self._rating_tokens()

    def prompt_text(self, question, answer) -> str:
        messages = [{"role": "user", "content": build_prompt(question, answer)}]
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = messages[0]["content"] + "\n\n"
        return text + RATING_PREFIX

    def _ids(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _rating_tokens(self):
        """First tokens of "1".."9" and all tokens of "10" as they follow the prompt."""
        prefix = self.prompt_text("q", "a")
        base = self._ids(prefix)

        def continuation(s):
            ids = self._ids(prefix + s)
            if ids[:len(base)] != base or len(ids) == len(base):
                raise ValueError(f"{self.name}: the tokenizer merges the rating {s!r} into the prompt")
            return ids[len(base):]
        digits = [continuation(str(i))[0] for i in range(1, 10)]
        if len(set(digits)) != 9:
            raise ValueError(f"{self.name}: the ratings 1..9 do not start with 9 distinct tokens")
        ten = continuation("10")
        if ten[0] in digits and (ten[0] != digits[0] or len(ten) < 2):
            raise ValueError(f"{self.name}: cannot tell the rating 10 from the single digits")
        return digits, ten

    @torch.no_grad()
    def _rating_probs(self, id_lists):
        """(b, 10) float64 probabilities of the ratings 1..10 as the next token(s) after each prompt."""
        device = next(self.model.parameters()).device
        width = max(len(x) for x in id_lists)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in id_lists], device=device)  # left padding
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in id_lists], device=device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # pads do not shift positions
        split_ten = self.ten_ids[0] == self.digit_ids[0]  # "10" = "1" then "0"
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                         use_cache=split_ten, logits_to_keep=1)
        probs = out.logits[:, -1].double().softmax(-1)                # (b, V)
        p = probs[:, self.digit_ids]                                  # (b, 9): ratings 1..9
        if split_ten:  # one more token on the KV cache: q = P("0" | prompt + "1")
            one = torch.full((len(id_lists), 1), self.digit_ids[0], device=device)
            out = self.model(input_ids=one, attention_mask=torch.cat([mask, torch.ones_like(one)], 1),
                             position_ids=position_ids[:, -1:] + 1, past_key_values=out.past_key_values,
                             logits_to_keep=1)
            q = out.logits[:, -1].double().softmax(-1)[:, self.ten_ids[1]]
            p10 = p[:, 0] * q
            p = torch.cat([(p[:, 0] * (1 - q))[:, None], p[:, 1:]], dim=1)
        else:
            p10 = probs[:, self.ten_ids[0]]
        return torch.cat([p, p10[:, None]], dim=1)                    # (b, 10): ratings 1..10

    def _score(self, items):
        out = []
        for start in range(0, len(items), self.batch_size):
            batch = items[start:start + self.batch_size]
            p = self._rating_probs([self._ids(self.prompt_text(it["prompt"], it["answer"])) for it in batch])
            ratings = torch.arange(1, 11, dtype=p.dtype, device=p.device)
            mass = p.sum(-1)
            scores = (p * ratings).sum(-1) / mass                     # expected rating Σ p_i·i / Σ p_i
            self.stats["requests"] += len(batch)
            self.stats["rating_mass"] += float(mass.sum())
            out += [(float(s), None) for s in scores.tolist()]
        return out


def make_judge(kind, *, model=None, base_url=None, cache_path=None, concurrency=8,
               api_key_env="OPENAI_API_KEY", device=None, **options) -> Judge:
    """rule | openai (model default gpt-4o-mini, base_url default OpenAI) | hf (model required)."""
    if kind == "rule":
        return RuleJudge()
    if kind == "openai":
        return OpenAIJudge(model=model or "gpt-4o-mini", base_url=base_url or "https://api.openai.com/v1",
                           cache_path=cache_path, concurrency=concurrency, api_key_env=api_key_env, **options)
    if kind == "hf":
        if not model:
            raise ValueError("--judge hf needs --judge-model (a Hugging Face id, a directory or smollm2-135m)")
        return HFJudge(model, device=device, **options)
    raise ValueError(f"unknown judge {kind!r} (rule, openai or hf)")


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


def judge_records(records, judge, out_path, *, chunk_records=64, progress=True, default_cache=True, max_missing=None):
    """Score both answers of every record -> (rows in input order, summary); resumable, final file atomic.

    A cacheable judge without a cache gets `<out_path>.cache.jsonl` unless default_cache is False.
    `max_missing` (train.py --judge-max-missing) is accepted and not used here.
    """
    _check_records(records)
    out_path = str(out_path)
    partial = out_path + ".partial"
    if default_cache and getattr(judge, "cache", False) is None:
        judge.attach_cache(out_path + ".cache.jsonl")
    by_id = {r["id"]: r for r in records}
    done = {}
    for path in (out_path, partial):  # earlier rows of the same judge and texts are kept (deviation 5)
        if os.path.exists(path):
            for row in read_jsonl_tolerant(path):
                r = by_id.get(row.get("id"))
                if r is not None and row.get("judge") == judge.name and all(row.get(k) == r[k] for k in REQUIRED):
                    done[row["id"]] = row
    todo = [r for r in records if r["id"] not in done]
    before = dict(judge.stats)
    with tqdm(total=len(records), initial=len(records) - len(todo), desc=f"judge {judge.name}", unit="rec",
              disable=not progress) as bar, open_append(partial) as fh:
        for start in range(0, len(todo), chunk_records):
            chunk = todo[start:start + chunk_records]
            items = [{"prompt": r["prompt"], "answer": r[side], "record": r} for r in chunk for side in ("human", "generated")]
            scores = judge.score_many(items)
            for j, r in enumerate(chunk):
                (hs, herr), (gs, gerr) = scores[2 * j], scores[2 * j + 1]
                row = {k: v for k, v in r.items() if k != "judge_error"}
                row.update(human_score=hs, generated_score=gs, judge=judge.name)
                errors = [f"{side}: {err}" for side, s, err in (("human", hs, herr), ("generated", gs, gerr)) if s is None]
                if errors:
                    row["judge_error"] = "; ".join(errors)
                append_jsonl(fh, row)
                done[r["id"]] = row
            bar.update(len(chunk))
    rows = [done[r["id"]] for r in records]
    write_jsonl(out_path, rows)
    os.remove(partial)
    used = {k: judge.stats[k] - before.get(k, 0) for k in judge.stats}
    flips = dsl_flip_stats(rows)
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

    Each answer was scored alone, so the comparison has no position bias (deviation 3). Rates are NaN
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


def dsl_flip_stats(judged_rows) -> dict:
    """How often DSL makes the generated answer chosen: flips (gen > human), ties, missing scores."""
    scored = [r for r in judged_rows if r.get("human_score") is not None and r.get("generated_score") is not None]
    n = len(scored)
    flips = sum(r["generated_score"] > r["human_score"] for r in scored)
    ties = sum(r["generated_score"] == r["human_score"] for r in scored)
    return dict(n=n, flips=flips, ties=ties, missing=len(judged_rows) - n,
                flip_rate=flips / n if n else math.nan, tie_rate=ties / n if n else math.nan)


def dsl_flip_rate(judged_rows) -> float:
    """Fraction of records with generated_score > human_score (records without both scores excluded)."""
    return dsl_flip_stats(judged_rows)["flip_rate"]


def flip_rates_by_iteration(run_dir) -> list[dict]:
    """dsl_flip_stats of every <run_dir>/iter{k}/judged.jsonl, ordered by k."""
    paths = [(k, os.path.join(run_dir, f"iter{k}", "judged.jsonl")) for k in iterations(run_dir)]
    return [dict(iter=k, **dsl_flip_stats(read_jsonl(path))) for k, path in paths if os.path.exists(path)]


# ---------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # --- files
    p.add_argument("--in", dest="inp", help="generated.jsonl: rows {id, prompt, human, generated[, answer]}")
    p.add_argument("--out", help="judged.jsonl to write (atomic; <out>.partial while running)")
    p.add_argument("--flip-report", metavar="RUN_DIR", help="print the DSL flip rate of RUN_DIR/iter*/judged.jsonl and exit")
    # --- judge
    p.add_argument("--judge", choices=("rule", "openai", "hf"), default="rule", help="which judge (default rule)")
    p.add_argument("--judge-model", help="openai: model name (default gpt-4o-mini); hf: HF id, directory or smollm2-135m")
    p.add_argument("--judge-base-url", help="openai: server base URL (default https://api.openai.com/v1)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (not needed for a local server)")
    p.add_argument("--cache", help="openai: score cache JSONL (default <out>.cache.jsonl; 'off' = no cache)")
    p.add_argument("--concurrency", type=int, default=8, help="openai: requests in flight at once")
    p.add_argument("--timeout", type=float, default=60.0, help="openai: seconds per request")
    p.add_argument("--max-retries", type=int, default=6, help="openai: retries per answer on 429/5xx/timeouts (0 = none)")
    p.add_argument("--max-tokens", type=int, default=16, help="openai: reply length cap in tokens")
    p.add_argument("--device", help="hf: torch device (default cuda if available)")
    p.add_argument("--batch-size", type=int, default=8, help="hf: answers per forward pass")
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
            options = dict(timeout=args.timeout, max_retries=args.max_retries, max_tokens=args.max_tokens)
        elif args.judge == "hf":
            options = dict(batch_size=args.batch_size)
        cache = None if args.cache in (None, "off") else args.cache
        judge = make_judge(args.judge, model=args.judge_model, base_url=args.judge_base_url, cache_path=cache,
                           concurrency=args.concurrency, api_key_env=args.api_key_env, device=args.device, **options)
        _, summary = judge_records(records, judge, args.out, default_cache=args.cache != "off")
        print(format_summary(summary))
    except (ValueError, OSError) as e:  # JudgeFatalError is a ValueError
        raise SystemExit(f"judge.py: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit("judge.py: interrupted; rerun the same command to resume") from None


if __name__ == "__main__":
    main()
