"""Tests for judge.py: the rule judge, resumable judge_records, the hf judge, win/tie/loss and flip rates."""
import json
import math
from collections import Counter

import pytest
import torch

import data
import demo
import judge
import judge_base
import judge_hf
from fakechat import records


# ---------------------------------------------------------------- rule judge
def test_rule_judge_hand_made_records(tmp_path):
    """Correct answers score 10, wrong attempts 3, refusals and empty ones 1; the flip rate counts generated > human."""
    recs = [
        {"id": "a", "prompt": "What is 2 + 3?", "answer": "5", "human": "2 + 3 = 5.", "generated": "2 + 3 = 6."},
        {"id": "b", "prompt": "What is 7 * 6?", "answer": "42", "human": "7 * 6 = 48.", "generated": "The answer is 42."},
        {"id": "c", "prompt": "Spell cat backwards.", "answer": "tac", "human": "tac", "generated": "  "},
        {"id": "d", "prompt": "What is 9 - 4?", "answer": "5", "human": "I'm sorry, I can't help.", "generated": "9 - 4 = 3."},
    ]
    rows, summary = judge.judge_records(recs, judge.make_judge("rule"), tmp_path / "judged.jsonl", progress=False)
    assert [(r["human_score"], r["generated_score"]) for r in rows] == [(10, 3), (3, 10), (10, 1), (1, 3)]
    assert summary["dsl_flip_rate"] == pytest.approx(2 / 4) and summary["empty_answers"] == 1
    assert all(r["judge"] == "rule" for r in rows)


def test_rule_judge_matches_demo_flaws(tmp_path):
    """On demo.demo_records the human answer scores 10 exactly when it is not flawed; refusals and
    off-topic answers score 1, wrong values 3 (an on-topic attempt)."""
    recs = [dict(r, human=r["response"], generated=r["response"]) for r in demo.demo_records("eval", n=60)]
    rows, _ = judge.judge_records(recs, judge.make_judge("rule"), tmp_path / "j.jsonl", progress=False)
    assert [r["human_score"] == 10.0 for r in rows] == [not r["flawed"] for r in recs]
    by_flaw = {(r["flaw"], row["human_score"]) for r, row in zip(recs, rows)}
    assert {s for f, s in by_flaw if f in ("refusal", "off_topic")} == {1.0}
    assert {s for f, s in by_flaw if f == "wrong_value"} == {3.0}


def test_rule_judge_needs_answer(tmp_path):
    """A record without "answer" is a ValueError naming the record id."""
    recs = [{"id": "no-answer-7", "prompt": "p", "human": "h", "generated": "g"}]
    with pytest.raises(ValueError, match="no-answer-7"):
        judge.judge_records(recs, judge.make_judge("rule"), tmp_path / "j.jsonl", progress=False)


@pytest.mark.parametrize("answer", [None, "", ["5"]])
def test_rule_judge_never_grades_against_a_null_answer(tmp_path, answer):
    """"answer": null is not graded against the string "None" (nor "" against everything): one line naming
    the record id."""
    recs = [{"id": "null-answer-3", "prompt": "Is None a value?", "answer": answer, "human": "None",
             "generated": "None"}]
    with pytest.raises(ValueError, match="record null-answer-3: 'answer' is") as err:
        judge.judge_records(recs, judge.make_judge("rule"), tmp_path / "j.jsonl", progress=False)
    assert "\n" not in str(err.value)


def test_records_missing_field_named(tmp_path):
    """A record without "generated" is a ValueError naming the record id and the field."""
    with pytest.raises(ValueError, match="rec-9.*generated"):
        judge.judge_records([{"id": "rec-9", "prompt": "p", "human": "h"}], judge.make_judge("rule"),
                            tmp_path / "j.jsonl", progress=False)


class Crashing(judge.RuleJudge):
    """A rule judge that raises after `budget` calls, standing in for a kill mid-run."""

    def __init__(self, budget):
        super().__init__()
        self.budget, self.scored = budget, Counter()

    def _score(self, items):
        if self.budget == 0:
            raise KeyboardInterrupt
        self.budget -= 1
        for it in items:
            self.scored[(it["prompt"], it["answer"])] += 1
        return super()._score(items)


def test_killed_rule_run_resumes(tmp_path):
    """After a crash mid-run, a rerun judges only the missing records; output complete and in input order."""
    recs = [dict(r, human=f"h {i}", generated=f"g {i}", answer=str(i)) for i, r in enumerate(records(10))]
    out = tmp_path / "judged.jsonl"
    first = Crashing(budget=2)
    with pytest.raises(KeyboardInterrupt):
        judge.judge_records(recs, first, out, chunk_records=3, progress=False)
    assert not out.exists() and len((tmp_path / "judged.jsonl.partial").read_text().splitlines()) == 6
    second = Crashing(budget=100)
    rows, summary = judge.judge_records(recs, second, out, chunk_records=3, progress=False)
    assert [r["id"] for r in rows] == [r["id"] for r in recs] and summary["resumed"] == 6
    assert first.scored + second.scored == Counter({(r["prompt"], r[s]): 1 for r in recs for s in ("human", "generated")})
    assert not (tmp_path / "judged.jsonl.partial").exists()
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [r["id"] for r in recs]
    recs[0]["generated"] = "g changed"  # regenerated text: its old row is not reused
    rows, summary = judge.judge_records(recs, Crashing(budget=100), out, progress=False)
    assert summary["resumed"] == 9 and summary["judged_now"] == 1


# ---------------------------------------------------------------- hf judge
def test_hf_judge_expected_score_by_hand(tiny_model_dir):
    """The hf score equals Σ p_i·i / Σ p_i from hand-computed logits, "10" split via P("0" | "1"), in [1, 10]."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf = judge.make_judge("hf", model=tiny_model_dir, device="cpu", batch_size=2)
    items = [{"prompt": "What is 2+3?", "answer": "5", "record": {}},
             {"prompt": "Name a colour.", "answer": "Blue, like the sky on a clear day.", "record": {}},
             {"prompt": "Hi", "answer": "Hello!", "record": {}}]
    got = [s for s, _ in hf.score_many(items)]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    digit = {d: tok.convert_tokens_to_ids(str(d)) for d in range(10)}
    for item, score in zip(items, got):
        text = tok.apply_chat_template([{"role": "user", "content": judge_base.build_prompt(item["prompt"], item["answer"])}],
                                       add_generation_prompt=True, tokenize=False) + "Rating: [["
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            p = model(torch.tensor([ids])).logits[0, -1].double().softmax(-1)
            q = model(torch.tensor([ids + [digit[1]]])).logits[0, -1].double().softmax(-1)[digit[0]]
        probs = {i: float(p[digit[i]]) for i in range(2, 10)}
        probs[1], probs[10] = float(p[digit[1]] * (1 - q)), float(p[digit[1]] * q)
        expected = sum(i * v for i, v in probs.items()) / sum(probs.values())
        assert score == pytest.approx(expected, abs=1e-6) and 1 <= score <= 10
    assert len(set(got)) == 3 and hf.rating_ids[10] == [digit[1], digit[0]]


def test_hf_judge_single_token_ten():
    """With "10" a token of its own, p_10 is its next-token probability (no second pass)."""
    from conftest import make_tiny_model, make_tiny_tokenizer
    tok = make_tiny_tokenizer()
    tok.add_tokens(["10"])
    model = make_tiny_model(tok, seed=1)
    hf = judge_hf.HFJudge(model, tok)
    ten = tok.convert_tokens_to_ids("10")
    assert hf.rating_ids[10] == [ten]
    (score, err), = hf.score_many([{"prompt": "What is 5+5?", "answer": "10", "record": {}}])
    ids = tok(hf.prompt_text("What is 5+5?", "10"), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        p = model(torch.tensor([ids])).logits[0, -1].double().softmax(-1)
    probs = [float(p[tok.convert_tokens_to_ids(str(i))]) for i in range(1, 10)] + [float(p[ten])]
    assert err is None and score == pytest.approx(sum((i + 1) * v for i, v in enumerate(probs)) / sum(probs), abs=1e-6)


def test_hf_judge_100_point_scale_by_hand(tiny_model_dir):
    """On scale 100 with digit tokens, p_i comes from full forward passes: P(d) · P(e | d) · the mass left for
    "the rating ends here" (P("0" | "10") is the rating 100); the score is Σ p_i·i / Σ p_i, in [1, 100]."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf = judge.make_judge("hf", model=tiny_model_dir, device="cpu", scale=100)
    assert hf.name.endswith(":scale100") and len(hf.inner) == 10  # "1".."9" and "10"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    digit = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    items = [{"prompt": "What is 2+3?", "answer": "5", "record": {}},
             {"prompt": "Hi", "answer": "Hello!", "record": {}}]
    for item, (score, err) in zip(items, hf.score_many(items)):
        ids = tok(hf.prompt_text(item["prompt"], item["answer"]), add_special_tokens=False)["input_ids"]

        def next_probs(extra):
            with torch.no_grad():
                return model(torch.tensor([ids + extra])).logits[0, -1].double().softmax(-1)
        root, after = next_probs([]), {d: next_probs([digit[d]]) for d in range(1, 10)}
        after_10 = next_probs([digit[1], digit[0]])
        p = {d: root[digit[d]] * (1 - after[d][digit].sum()) for d in range(1, 10)}
        p.update({r: root[digit[r // 10]] * after[r // 10][digit[r % 10]] for r in range(10, 100)})
        p[10] = p[10] * (1 - after_10[digit[0]])
        p[100] = root[digit[1]] * after[1][digit[0]] * after_10[digit[0]]
        expected = float(sum(r * v for r, v in p.items()) / sum(p.values()))
        assert err is None and score == pytest.approx(expected, abs=1e-5) and 1 <= score <= 100


# ---------------------------------------------------------------- comparisons
def test_win_tie_loss_by_hand():
    """A vs B over 6 prompts, one with a missing score: 2 wins, 2 ties, 1 loss out of 5, 1 excluded."""
    res = judge.win_tie_loss([8, 5, 7, 3, None, 9], [6, 5, 7, 4, 2, 1])
    assert res == dict(win=0.4, tie=0.4, loss=0.2, n=5, excluded=1, wins=2, ties=2, losses=1)
    assert math.isnan(judge.win_tie_loss([None], [1])["win"])
    with pytest.raises(ValueError):
        judge.win_tie_loss([1, 2], [1])


def test_flip_rates_by_iteration(tmp_path):
    """Per-iteration flip and tie rates are read from iter*/judged.jsonl in numeric order; missing scores and
    identical answers are counted apart and left out of the rates."""
    for k, pairs in {0: [(5, 6), (5, 5), (7, 1), (2, None), (3, 3)], 10: [(1, 9)], 2: [(9, 1), (9, 1)]}.items():
        (tmp_path / f"iter{k}").mkdir()
        data.write_jsonl(tmp_path / f"iter{k}" / "judged.jsonl",
                         [{"id": str(i), "prompt": "p", "human": "h", "generated": "h" if i == 4 else "g",
                           "human_score": h, "generated_score": g} for i, (h, g) in enumerate(pairs)])
    res = judge.flip_rates_by_iteration(tmp_path)
    assert [(r["iter"], r["n"], r["flips"], r["ties"], r["missing"], r["identical"]) for r in res] == \
        [(0, 5, 1, 1, 1, 1), (2, 2, 0, 0, 0, 0), (10, 1, 1, 0, 0, 0)]
    assert res[0]["flip_rate"] == pytest.approx(1 / 3) and res[0]["tie_rate"] == pytest.approx(1 / 3)


def test_flips_are_counted_by_the_rule_that_labels():
    """judge.dsl_flip_rate, the judge summary and data.dsl_pairs count flips, ties, missing scores and identical
    answers by one rule (data.dsl_outcome): the flips counted are the pairs whose generated answer is chosen."""
    rows = [dict(id=str(i), prompt="p", human=h, generated=g, human_score=hs, generated_score=gs)
            for i, (h, g, hs, gs) in enumerate([("a", "b", 1, 9), ("a", " a ", 1, 9), ("a", "b", 4, 4),
                                                ("a", "b", None, 2), ("a", "b", 8, 2), ("a", "c", 2, 3)])]
    pairs, applied = data.dsl_pairs(rows, dsl=True)
    observed = data.dsl_stats(rows)
    assert sum(p["chosen_source"] == "generated" for p in pairs) == applied["flips"] == observed["flips"] == 2
    assert {k: observed[k] for k in applied} == applied == dict(n=6, flips=2, ties=1, missing=1, identical=1)
    assert judge.dsl_flip_rate(rows) == observed["flip_rate"] == pytest.approx(2 / 4)


class Flaky(judge.RuleJudge):
    """A judge whose answers containing "bad" get no score."""

    def _score(self, items):
        return [(None, "boom") if "bad" in it["answer"] else (5.0, None) for it in items]


@pytest.mark.parametrize("n_bad, fails", [(4, False), (5, True)])
def test_max_missing_fraction(tmp_path, n_bad, fails):
    """Default max_missing 0.2: 4 of 20 scores missing is allowed (rows written, nulls counted), 5 is a
    one-line ValueError naming count, fraction, first error and flag; max_missing=1 allows all."""
    recs = [{"id": f"r{i}", "prompt": "p", "human": "h", "generated": "bad" if i < n_bad else "g"} for i in range(10)]
    out = tmp_path / "j.jsonl"
    if fails:
        with pytest.raises(ValueError, match=r"5 of 20 scores missing \(25\.0 %.*r0 generated: boom.*--judge-max-missing"):
            judge.judge_records(recs, Flaky(), out, progress=False)
        assert not out.exists()
        rows, summary = judge.judge_records(recs, Flaky(), out, progress=False, max_missing=1.0)
    else:
        rows, summary = judge.judge_records(recs, Flaky(), out, progress=False)
    assert summary["errors"] == n_bad and sum(r["generated_score"] is None for r in rows) == n_bad
    with pytest.raises(ValueError, match="max_missing"):
        judge.judge_records(recs, Flaky(), out, progress=False, max_missing=1.5)
