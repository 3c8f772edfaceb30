"""Tests for judge_rm.py on a tiny randomly initialised sequence-classification reward model built here: the score
is the model's logit for the conversation, batched or not, with or without a chat template; the cache, missing
scores and empty answers; train.py --judge rm end to end, and judge.py --judge rm."""
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

import data
import judge
import judge_rm
import train
from conftest import fresh_copy, make_tiny_tokenizer, read_jsonl, save_tiny, tiny_flags


def make_tiny_rm(tokenizer, seed=0, pad=True):
    """A 2-layer Llama reward model (one output) on the tiny byte tokenizer, deterministic for a seed."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id if pad else None, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id)
    model = LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # a spread of rewards, not the near-zero default init
    return model


@pytest.fixture(scope="module")
def tiny_rm_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-rm"), make_tiny_rm)


ITEMS = [{"prompt": "What is 2+3?", "answer": "5", "record": {}},
         {"prompt": "Name a colour.", "answer": "Blue, like the sky on a clear day.", "record": {}},
         {"prompt": "Hi", "answer": "Hello!", "record": {}},
         {"prompt": "Hi", "answer": "", "record": {}}]


def by_hand(model, ids):
    """The reward model's output on one unpadded sequence: the score head at the last token."""
    with torch.no_grad():
        return float(model(torch.tensor([ids])).logits[0, 0])


def test_score_is_the_logit_of_the_rendered_conversation(tiny_rm_dir):
    """The score is the model's logit for [user: prompt, assistant: answer] through the chat template (no generation
    prompt after the answer), computed alone; batched and padded scores equal it; the empty answer is scored too."""
    from transformers import AutoTokenizer
    rm = judge.make_judge("rm", model=tiny_rm_dir, device="cpu", batch_size=3)
    got = rm.score_many(ITEMS)
    tok = AutoTokenizer.from_pretrained(tiny_rm_dir)
    model = LlamaForSequenceClassification.from_pretrained(tiny_rm_dir).eval()
    for item, (score, err) in zip(ITEMS, got):
        text = (f"<|im_start|>user\n{item['prompt']}<|im_end|>\n<|im_start|>assistant\n{item['answer']}<|im_end|>\n")
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert rm.input_ids(item["prompt"], item["answer"]) == ids
        assert err is None and score == pytest.approx(by_hand(model, ids), abs=1e-5)
    assert len({round(s, 6) for s, _ in got}) == 4 and rm.stats["empty_answers"] == 1 and rm.stats["requests"] == 4
    assert rm.name == f"rm:{tiny_rm_dir}"


def test_text_pair_without_chat_template_and_no_pad_token(tmp_path):
    """A tokenizer without a chat template scores tokenizer(prompt, answer); a config without pad_token_id scores
    each answer alone (HF cannot pool a padded batch then), with the same numbers as one by one."""
    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = None
    model = make_tiny_rm(tokenizer, seed=1, pad=False)
    rm = judge_rm.RewardModelJudge(model, tokenizer, batch_size=4)
    got = rm.score_many(ITEMS[:3])
    for item, (score, _) in zip(ITEMS, got):
        ids = tokenizer(item["prompt"], item["answer"])["input_ids"]
        assert score == pytest.approx(by_hand(model, ids), abs=1e-5)


def test_head_runs_in_float32_under_bf16(tiny_rm_dir):
    """With the model in bf16 the score head is float32, so scores are not rounded to bf16's 8-bit mantissa."""
    rm = judge.make_judge("rm", model=tiny_rm_dir, device="cpu")
    rm.dtype = "bf16"
    scores = [s for s, _ in rm.score_many(ITEMS[:3])]
    assert rm.model.score.weight.dtype == torch.float32 and rm.model.model.norm.weight.dtype == torch.bfloat16
    bf16_grid = [float(torch.tensor(s).to(torch.bfloat16).float()) for s in scores]
    assert any(s != g for s, g in zip(scores, bf16_grid))


def test_truncation_keeps_the_end_through_a_chat_template(tiny_rm_dir):
    """An input longer than max_length keeps its last max_length tokens (the end the reward model pools) and is
    counted."""
    rm = judge_rm.RewardModelJudge(tiny_rm_dir, max_length=16)
    full = judge_rm.render_conversation(rm.tokenizer, "What is 2+3?", "five, I think")
    assert rm.input_ids("What is 2+3?", "five, I think") == full[-16:] and rm.stats["truncated"] == 1


def test_cache_scores_once_and_refuses_nothing_missing(tmp_path, tiny_rm_dir):
    """A second judge on the same cache file asks the model for nothing; a non-finite reward is a missing score
    with its reason, never cached."""
    cache = tmp_path / "cache.jsonl"
    first = judge.make_judge("rm", model=tiny_rm_dir, device="cpu", cache_path=str(cache))
    scores = first.score_many(ITEMS)
    first.close()
    second = judge.make_judge("rm", model=tiny_rm_dir, device="cpu", cache_path=str(cache))
    assert second.score_many(ITEMS) == scores and second.stats["requests"] == 0 and second.stats["cache_hits"] == 4
    assert second.model is None  # nothing was scored: the weights were never loaded
    third = judge.make_judge("rm", model=tiny_rm_dir, device="cpu", cache_path=str(tmp_path / "c2.jsonl"))
    third.rewards = lambda ids: [math.nan] * len(ids)
    (score, err), = third.score_many(ITEMS[:1])
    assert score is None and "nan" in err and not (tmp_path / "c2.jsonl").exists()


def test_refusals_are_one_line(tmp_path, tiny_model_dir):
    """No --judge-model, a causal LM (no one-output head) and another scale are refused in one line."""
    with pytest.raises(ValueError, match="needs --judge-model"):
        judge.make_judge("rm")
    with pytest.raises(ValueError, match="num_labels = 1"):
        judge.make_judge("rm", model=tiny_model_dir)
    with pytest.raises(ValueError, match="scale"):
        judge.make_judge("rm", model=tiny_model_dir, scale=100)


def test_dsl_with_real_valued_scores():
    """DSL's tie rule on real scores: any higher generated score flips, only an exactly equal one keeps the human."""
    rows = [dict(id=i, prompt="p", human="h", generated=f"g{i}", human_score=0.25, generated_score=g)
            for i, g in enumerate([0.2500001, 0.25, -3.0])]
    assert [data.dsl_outcome(r) for r in rows] == ["flip", "tie", "human"]


def test_train_iteration_with_a_reward_model_judge(tmp_path, iter0_run, tiny_model_dir, tiny_rm_dir):
    """train.py --judge rm runs DSL iteration 1 end to end: judged.jsonl holds the reward model's real-valued scores
    under its name, the pairs follow them, and the human answers are cached for the next iteration."""
    run_dir = fresh_copy(iter0_run, tmp_path)
    train.main(["--iter", "1", *tiny_flags(run_dir, tiny_model_dir), "--judge", "rm", "--judge-model", tiny_rm_dir])
    judged = read_jsonl(run_dir / "iter1" / "judged.jsonl")
    scores = [r[k] for r in judged for k in ("human_score", "generated_score")]
    assert all(isinstance(s, float) and math.isfinite(s) for s in scores)
    assert any(s != round(s) for s in scores) and len(set(scores)) > 2  # real-valued, not ratings 1..10
    assert {r["judge"] for r in judged} == {f"rm:{tiny_rm_dir}"}
    pairs = {p["id"]: p for p in read_jsonl(run_dir / "iter1" / "pairs.jsonl")}
    for r in judged:
        if r["id"] in pairs:
            flip = r["generated_score"] > r["human_score"]
            assert pairs[r["id"]]["chosen_source"] == ("generated" if flip else "human")
    assert (run_dir / "iter1" / "model" / "config.json").is_file()
    assert len(read_jsonl(run_dir / "judge_cache.jsonl")) == len({(r["prompt"], r[k]) for r in judged
                                                                  for k in ("human", "generated")})


def test_judge_cli_with_a_reward_model(tmp_path, tiny_rm_dir, capsys):
    """python judge.py --judge rm writes real-valued scores and a cache beside the output."""
    records = [dict(id=f"r{i}", prompt=it["prompt"], human="A human answer.", generated=it["answer"])
               for i, it in enumerate(ITEMS)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    judge.main(["--in", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl"), "--judge", "rm",
                "--judge-model", tiny_rm_dir, "--device", "cpu", "--judge-batch-size", "2"])
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert all(isinstance(r["generated_score"], float) for r in rows) and (tmp_path / "out.jsonl.cache.jsonl").is_file()
    assert "dsl_flip_rate" in capsys.readouterr().out
