"""The judge interface and what every judge shares: the rating scales, the grading templates, the
empty-answer rule and the fatal error. judge.py (the rule judge, judge_records, the CLI), judge_http.py
(an OpenAI-compatible server) and judge_hf.py (a local causal LM) build on it; it imports nothing of the
project.

A judge maps items {"prompt", "answer", "record"} to (score | None, error | None) (`Judge.score_many`), and
the records {"prompt", "human", "generated", ...} of a judge stage to that pair for the human and for the
generated answer (`Judge.score_records`). Two ways to judge a record:
* single (every judge): each answer is graded alone on 1..scale with `template(scale)`, scale 10 or 100;
* pairwise (the HTTP judge): both answers in one prompt (`PAIRWISE_TEMPLATE`), asked in both orders. Each
  order's verdict gives the answer shown first 1, 0 or ½ (tie) of a vote; an answer's score is its votes
  over both orders (0..2; the two sum to 2), so a record ties only when the orders disagree or both say tie.

Where this departs from, or fills a gap in, the paper:
1. Template: the paper's grading template (its Appendix B) is lost from our copy of the text. `template`
   is our plain single-answer template in the style of MT-Bench's single-answer grading, asking for the
   rating only so that a reply costs a few tokens; `PAIRWISE_TEMPLATE` asks for MT-Bench's pairwise
   verdict ([[A]], [[B]], [[C]] for a tie).
2. Scale: the paper's judge "return[s] their respective scores" (Sec. 4.2), and its GPT-4o-mini scores read
   84.86 vs 82.66 (Fig. 6) with about 14 % ties between DNPO's and SPIN's answers (Fig. 7: win 57.51 %, loss
   28.07 %): most likely single-answer scores on a 100-point scale, i.e. `scale=100`. On the default 1..10
   scale (MT-Bench's) answers tie more often, a tie keeps the human answer chosen, and DSL flips less than
   the paper's ~30 %. Pairwise mode is the alternative that ties only when the judge contradicts itself.
3. Empty answers: an empty (whitespace-only) answer gets the scale's minimum, 1, without asking any judge,
   and is counted as `empty_answers`; in pairwise mode it gets no vote against a non-empty answer (and
   ties with an empty one).
"""
import abc
import hashlib

SCALES = (10, 100)
DEFAULT_SCALE = 10
MODES = ("single", "pairwise")
BATCH_SIZE = 8               # answers per forward pass of the local judges (hf, rm)
EMPTY_SCORE = 1.0            # an empty answer is the worst answer (departure "Empty answers")
RATING_PREFIX = "Rating: [["  # the reply format; the hf judge reads the next token after it
_SINGLE = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Consider correctness first, then helpfulness, "
    "relevance, accuracy, depth and level of detail. Be as objective as possible. Rate the response on "
    "a scale of 1 to {scale} and reply with the rating only, strictly in this format: \"Rating: [[N]]\", "
    "for example \"Rating: [[{example}]]\".\n\n"
    "[Question]\n{{question}}\n\n"
    "[The Start of Assistant's Answer]\n{{answer}}\n[The End of Assistant's Answer]"
)
PAIRWISE_TEMPLATE = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
    "assistants to the user question displayed below. Choose the assistant that answers the question "
    "better. Consider correctness first, then helpfulness, relevance, accuracy, depth and level of detail. "
    "Do not let the order in which the responses were presented, their length or the assistants' names "
    "influence your decision. Be as objective as possible. Reply with your verdict only, strictly in this "
    "format: \"[[A]]\" if assistant A is better, \"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie.\n\n"
    "[User Question]\n{question}\n\n"
    "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
)
PAIRWISE_VERSION = "pairwise-v1-" + hashlib.sha256(PAIRWISE_TEMPLATE.encode()).hexdigest()[:8]


class JudgeFatalError(ValueError):
    """The judge cannot work at all (bad key, wrong URL, server unreachable); CLIs turn it into SystemExit."""


def check_scale_and_mode(scale, mode="single") -> None:
    """ValueError unless scale is 10 or 100 and mode single or pairwise (which has no scale)."""
    if scale not in SCALES:
        raise ValueError(f"judge scale must be one of {SCALES}, got {scale!r}")
    if mode not in MODES:
        raise ValueError(f"judge mode must be one of {MODES}, got {mode!r}")
    if mode == "pairwise" and scale != DEFAULT_SCALE:
        raise ValueError("a judge scale applies to single-answer grading; pairwise mode gives verdicts, not ratings")


def judge_name(base: str, scale=DEFAULT_SCALE, mode="single") -> str:
    """base tagged with a scale or mode other than the default ("openai:gpt-4o-mini:scale100"): rows judged
    on another scale or in another mode are never reused or compared as if they were the same judge's."""
    return base + (f":scale{scale}" if scale != DEFAULT_SCALE else "") + (f":{mode}" if mode != "single" else "")


def template(scale=DEFAULT_SCALE) -> str:
    """The single-answer grading prompt for ratings 1..scale, with {question} and {answer} still to fill."""
    check_scale_and_mode(scale)
    return _SINGLE.format(scale=scale, example=scale // 2)


def template_version(scale=DEFAULT_SCALE) -> str:
    """The template's name in cache keys: its hash, so an edited template or another scale reuses no score."""
    return "single-v1-" + hashlib.sha256(template(scale).encode()).hexdigest()[:8]


def build_prompt(question: str, answer: str, scale=DEFAULT_SCALE) -> str:
    """The user message that asks for one answer's rating on 1..scale."""
    return template(scale).format(question=question, answer=answer)


def build_pairwise_prompt(question: str, answer_a: str, answer_b: str) -> str:
    """The user message that asks which of two answers is better (A shown first)."""
    return PAIRWISE_TEMPLATE.format(question=question, answer_a=answer_a, answer_b=answer_b)


def new_stats() -> dict:
    return dict(requests=0, cache_hits=0, retries=0, parse_failures=0, empty_answers=0,
                prompt_tokens=0, completion_tokens=0)


class Judge(abc.ABC):
    """score_many(items) -> [(score | None, error | None)]; item = {"prompt", "answer", "record"}."""

    name = "judge"
    scale = DEFAULT_SCALE

    def __init__(self):
        self.stats = new_stats()

    def score_records(self, records: list[dict]) -> list[tuple]:
        """[((human score, error), (generated score, error))] per record: each answer graded alone."""
        items = [{"prompt": r["prompt"], "answer": r[side], "record": r}
                 for r in records for side in ("human", "generated")]
        scores = self.score_many(items)
        return list(zip(scores[0::2], scores[1::2]))

    def score_many(self, items: list[dict]) -> list[tuple]:
        results = [None] * len(items)
        todo = []
        for i, item in enumerate(items):
            if not isinstance(item["answer"], str):
                raise ValueError(f"record {item.get('record', {}).get('id')}: answer is not a string")
            if item["answer"].strip():
                todo.append(i)
            else:
                results[i] = (EMPTY_SCORE, None)  # departure "Empty answers"
                self.stats["empty_answers"] += 1
        for i, res in zip(todo, self._score([items[i] for i in todo]) if todo else []):
            results[i] = res
        assert all(r is not None and (r[0] is not None or r[1]) for r in results), "a None score needs a reason"
        return results

    @abc.abstractmethod
    def _score(self, items: list[dict]) -> list[tuple]:
        """(score, error) for non-empty answers."""

    def estimate_cost(self, prompt_tokens: int, completion_tokens: int):
        return 0.0  # local judges cost nothing per request

    def close(self):
        pass
