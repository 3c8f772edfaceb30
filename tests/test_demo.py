"""The demo task: deterministic, disjoint splits, the flaw rate, and the answer-checking rule."""
import pytest

import demo
from data import load_prompts, prompt_id
from demo import check_answer, demo_records


def test_demo_deterministic_prefix_and_seeded():
    """Same seed -> same records; the first k of n records equal demo_records(n=k); another seed differs."""
    a = demo_records("train", n=300, seed=3)
    assert a == demo_records("train", n=300, seed=3)
    assert a[:50] == demo_records("train", n=50, seed=3)
    assert a != demo_records("train", n=300, seed=4)
    assert load_prompts("demo", "train", max_prompts=50, seed=3) == a[:50]


def test_demo_train_eval_disjoint_across_seeds():
    """No eval prompt appears in any train split (the split is a function of the prompt only)."""
    train = {r["prompt"] for s in (0, 1) for r in demo_records("train", seed=s)}
    evals = {r["prompt"] for s in (0, 1) for r in demo_records("eval", seed=s)}
    assert len(evals) >= 200 and not train & evals
    assert all(demo.demo_split(p) == "eval" for p in evals)


def test_demo_flaw_rate_matches_setting():
    """The flawed fraction is within 4 binomial s.d. of flaw_rate; 0 and 1 are exact; every kind occurs."""
    records = demo_records("train", seed=0, flaw_rate=0.3)
    rate = sum(r["flawed"] for r in records) / len(records)
    assert abs(rate - 0.3) < 4 * (0.3 * 0.7 / len(records)) ** 0.5
    assert {r["flaw"] for r in records if r["flawed"]} == {"wrong_value", "refusal", "off_topic", "truncated"}
    assert not any(r["flawed"] for r in demo_records("eval", n=100, flaw_rate=0.0))
    assert all(r["flawed"] for r in demo_records("eval", n=100, flaw_rate=1.0))


def test_demo_answers_checkable_and_short():
    """Correct human answers pass check_answer, flawed ones fail; >= 6 families; ids unique; answers short."""
    records = demo_records("train", seed=1) + demo_records("eval", seed=1)
    assert len({r["family"] for r in records}) >= 6
    assert len({r["id"] for r in records}) == len(records)
    for r in records:
        assert check_answer(r["response"], r["answer"], r["prompt"]) != r["flawed"], r
        assert len(r["response"].split()) <= 20


@pytest.mark.parametrize("response, answer, prompt, ok", [
    ("7 + 5 = 12.", "12", "What is 7 + 5?", True),
    ("12 is the sum of 7 and 5.", "12", "What is 7 + 5?", True),
    ("There are 3,000 meters in 3 kilometers.", "3000", "How many meters are in 3 kilometers?", True),
    ("7 x 12 = 70 + 14 = 84", "84", "What is 7 times 12?", True),
    ("It appears three times.", "3", "How many times does 'e' appear?", True),
    ("The letter 'e' appears twice in 'cheese'.", "3", "How many times does the letter 'e' appear?", False),
    ("The letter 's' appears twice in 'dress'.", "2", "How many times does the letter 's' appear?", True),
    ("It appears once.", "1", "How many times does 'c' appear in 'cat'?", True),
    ("7 + 5 = 13.", "12", "What is 7 + 5?", False),
    ("7 + 5 =", "12", "What is 7 + 5?", False),
    ("No, 34 is smaller than 57. Yes, really.", "no", "Is 34 larger than 57?", True),
    ("Yes.", "no", "Is 34 larger than 57?", False),
    ("Nobody knows.", "no", "Is 34 larger than 57?", False),
    ("The capital is Bogotá.", "bogota", "", True),
    ("A Parisian cafe.", "paris", "", False),
    ("'cat' backwards is 'tac'.", "tac", "", True),
    ("", "12", "", False),
])
def test_check_answer_by_hand(response, answer, prompt, ok):
    """check_answer follows the documented rule on hand-made cases."""
    assert check_answer(response, answer, prompt) is ok


@pytest.mark.parametrize("response, answer, prompt, grade", [
    ("7 + 5 = 12.", "12", "What is 7 + 5?", "correct"),
    ("7 + 5 = 13.", "12", "What is 7 + 5?", "attempt"),
    ("7 + 5 =", "12", "What is 7 + 5?", "none"),                       # no new number: no answer given
    ("I'm sorry, but I can't help with that. 13", "12", "What is 7 + 5?", "none"),  # a refusal never counts
    ("I don’t know.", "12", "What is 7 + 5?", "none"),                 # typographic apostrophe
    ("Yes, 34 is larger than 57.", "no", "Is 34 larger than 57? Answer yes or no.", "attempt"),
    ("34 is smaller than 57.", "no", "Is 34 larger than 57? Answer yes or no.", "none"),
    ("The capital of Peru is Quito.", "lima", "What is the capital of Peru?", "attempt"),
    ("Jazz music grew out of blues and ragtime traditions.", "lima", "What is the capital of Peru?", "none"),
    ("", "lima", "What is the capital of Peru?", "none"),
])
def test_grade_answer_by_hand(response, answer, prompt, grade):
    """grade_answer: correct > on-topic wrong attempt > empty / refusal / off topic."""
    assert demo.grade_answer(response, answer, prompt) == grade


def test_comparison_answers_come_first():
    """Comparison answers state yes/no first; the truncated flaw drops exactly that verdict."""
    records = [r for r in demo_records("train", seed=0) if r["family"] == "comparison"]
    assert all(r["response"].split(",")[0] in ("Yes", "No") for r in records if not r["flawed"])
    cut = [r for r in records if r["flaw"] == "truncated"]
    assert cut and all(demo.grade_answer(r["response"], r["answer"], r["prompt"]) == "none" for r in cut)


def test_demo_ids_are_the_prompt_hash():
    """A demo record's id is "demo-" + data.prompt_id(prompt), so ids of existing run directories stay valid."""
    assert all(r["id"] == f"demo-{prompt_id(r['prompt'])}" for r in demo_records("eval", n=50))
