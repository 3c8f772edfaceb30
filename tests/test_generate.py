import functools
import importlib.util
import json
import os
import pathlib

import pytest
import torch

import errors
import generate
from conftest import make_tiny_model
from data import chat_prompt_ids, read_jsonl, read_jsonl_tolerant, write_jsonl
from generate import done_rows, generate_answers, main, merge_rows, partial_path, shard_records

KW = dict(max_new_tokens=3, batch_size=2)


def _records(n=5):
    # different prompt lengths, so the length sort reorders them
    return [{"id": f"r{i}", "prompt": "q" * (1 + (i * 7) % 5), "response": f"human {i}", "answer": str(i)} for i in range(n)]


@pytest.fixture()
def tiny(tiny_tokenizer):
    tok = tiny_tokenizer
    tok.padding_side = "left"
    return make_tiny_model(tok), tok


def test_rows_in_input_order_one_per_id(tmp_path, tiny):
    """Every record gets exactly one row, in input order, with human/answer passed through; no partial left."""
    model, tok = tiny
    records = _records()
    rows = generate_answers(model, tok, records, tmp_path / "g.jsonl", **KW)
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    assert read_jsonl(tmp_path / "g.jsonl") == rows
    assert all(r["human"] == f"human {i}" and r["answer"] == str(i) and isinstance(r["generated"], str)
               for i, r in enumerate(rows))
    assert os.listdir(tmp_path) == ["g.jsonl"]


def test_batched_left_padding_matches_single(tmp_path, tiny):
    """Greedy answers in a left-padded batch equal those generated one prompt at a time."""
    model, tok = tiny
    records = _records(4)
    batched = generate_answers(model, tok, records, tmp_path / "a.jsonl", max_new_tokens=4, batch_size=4)
    single = generate_answers(model, tok, records, tmp_path / "b.jsonl", max_new_tokens=4, batch_size=1)
    assert [r["generated"] for r in batched] == [r["generated"] for r in single]


def test_resume_after_interruption_no_duplicates(tmp_path, tiny, monkeypatch):
    """A crash after the first batch leaves its rows in .partial; the rerun generates only the rest and the
    final file equals an uninterrupted run, one row per id."""
    model, tok = tiny
    records, out = _records(), tmp_path / "g.jsonl"
    real, seen = generate._generate_hf, []

    def crash_on_second_batch(m, t, prompt_ids, *a):
        if len(seen) == 1:
            raise KeyboardInterrupt
        seen.append(len(prompt_ids))
        return real(m, t, prompt_ids, *a)

    monkeypatch.setattr(generate, "_generate_hf", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        generate_answers(model, tok, records, out, **KW)
    assert not out.exists() and len(read_jsonl_tolerant(f"{out}.partial")) == 2

    def counting(m, t, prompt_ids, *a):
        seen.append(len(prompt_ids))
        return real(m, t, prompt_ids, *a)

    monkeypatch.setattr(generate, "_generate_hf", counting)
    rows = generate_answers(model, tok, records, out, **KW)
    assert sum(seen) == len(records)                                    # nothing generated twice
    assert rows == generate_answers(model, tok, records, tmp_path / "ref.jsonl", **KW)
    assert [r["id"] for r in read_jsonl(out)] == [r["id"] for r in records]
    seen.clear()
    assert generate_answers(model, tok, records, out, **KW) == rows and seen == []    # complete: no work


def test_torn_partial_line_is_repaired(tmp_path, tiny):
    """A partial file whose last line was cut mid-write is repaired: the good rows are kept, the torn one redone."""
    model, tok = tiny
    records, out = _records(3), tmp_path / "g.jsonl"
    good = {"id": "r1", "prompt": records[1]["prompt"], "human": "human 1", "generated": "kept", "answer": "1"}
    (tmp_path / "g.jsonl.partial").write_text(json.dumps(good) + "\n" + '{"id": "r2", "prompt": "qq')
    assert read_jsonl_tolerant(f"{out}.partial") == [good]
    rows = generate_answers(model, tok, records, out, **KW)
    assert rows[1] == good and len(rows) == 3 and rows[2]["id"] == "r2"


def test_read_jsonl_tolerant_rejects_corrupt_middle_line(tmp_path):
    """Corruption before the last line is an error naming file:line, not a silent skip."""
    path = tmp_path / "p"
    path.write_text('{"id": 1}\nnot json\n{"id": 2}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: corrupt line"):
        read_jsonl_tolerant(path)


def test_changed_prompt_for_done_id_is_an_error(tmp_path, tiny):
    """A partial row whose prompt differs from the input record with the same id is refused, by id."""
    model, tok = tiny
    write_jsonl(tmp_path / "g.jsonl.partial", [{"id": "r0", "prompt": "other", "human": "h", "generated": "g"}])
    with pytest.raises(ValueError, match="record r0 has a different prompt"):
        generate_answers(model, tok, _records(2), tmp_path / "g.jsonl", **KW)


def _answer_only_eos(model, eos, monkeypatch):
    """Make every next token EOS (the forward's signature kept, as generate.py inspects it)."""
    real = model.forward

    @functools.wraps(real)
    def only_eos(*args, **kwargs):
        out = real(*args, **kwargs)
        out.logits[..., eos] = 1e4
        return out
    monkeypatch.setattr(model, "forward", only_eos)


@pytest.mark.parametrize("evict", [True, False])
def test_empty_generation_kept(tmp_path, tiny, monkeypatch, evict):
    """An answer that is only EOS is recorded as "" rather than dropped (evicting loop and model.generate alike)."""
    model, tok = tiny
    _answer_only_eos(model, tok.eos_token_id, monkeypatch)
    stats = {}
    rows = generate_answers(model, tok, _records(3), tmp_path / "g.jsonl", stats=stats, evict_finished=evict, **KW)
    assert [r["generated"] for r in rows] == ["", "", ""]
    assert stats["new_tokens"] == 3 and stats["decode_row_steps"] == 0 and stats["finished_row_steps"] == 0


def _eos_prone(tok, scale=5.0):
    """The fixture model with its (tied) EOS embedding scaled, so that rows end after different numbers of tokens."""
    model = make_tiny_model(tok)
    with torch.no_grad():
        model.model.embed_tokens.weight[tok.eos_token_id] *= scale
    return model


def _prompts(tok, n=12):
    return [chat_prompt_ids(tok, "q" * (1 + (i * 7) % 11) + str(i)) for i in range(n)]


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 0.9), (0.7, 1.0)])
@pytest.mark.parametrize("scale", [1.0, 5.0])
def test_evicting_decode_equals_model_generate(tiny, temperature, top_p, scale):
    """The decode loop that drops ended rows gives model.generate's answers token for token: greedy, and sampled
    from the same seed (the multinomial is drawn over the whole batch's shape, so the random stream is the same);
    it spends no decode step on an ended row, where model.generate does."""
    _, tok = tiny
    model, prompts = _eos_prone(tok, scale), _prompts(tok)
    unpadded = [prompts[8], prompts[11]]                                   # the same length: no attention mask
    assert len(unpadded[0]) == len(unpadded[1])
    for batch in [prompts, prompts[:5], prompts[5:10], unpadded, prompts[:1]]:
        new, old = {}, {}
        texts, counts = generate._generate_hf(model, tok, batch, 24, temperature, top_p, 3, True, new)
        assert (texts, counts) == generate._generate_hf(model, tok, batch, 24, temperature, top_p, 3, False, old)
        needed = sum(n - 1 for n in counts)
        assert new == {"decode_row_steps": needed, "finished_row_steps": 0}
        assert old["decode_row_steps"] == len(batch) * (max(counts) - 1) and old["finished_row_steps"] >= 0
    # the greedy eos-prone batch of 12 really has rows ending early (else this test would test nothing)
    counts = generate._generate_hf(_eos_prone(tok), tok, prompts, 24, 0.0, 1.0, 0)[1]
    assert min(counts) < max(counts) == 24


def test_ended_rows_leave_the_batch(tiny, monkeypatch):
    """Each decode forward runs on exactly the rows that have not produced EOS yet, and the cache shrinks with them."""
    _, tok = tiny
    model, prompts = _eos_prone(tok), _prompts(tok)
    real, shapes = model.forward, []

    @functools.wraps(real)
    def spy(*args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        kv_rows = cache.layers[0].keys.shape[0] if cache is not None else None
        shapes.append((kwargs["input_ids"].shape[0], kv_rows))
        return real(*args, **kwargs)
    monkeypatch.setattr(model, "forward", spy)
    counts = generate._generate_hf(model, tok, prompts, 24, 0.0, 1.0, 0)[1]
    assert shapes[0] == (12, None)                                         # the prefill, whole batch
    alive = [sum(n > step for n in counts) for step in range(1, max(counts))]
    assert [rows for rows, _ in shapes[1:]] == alive and all(rows == kv for rows, kv in shapes[1:])


def test_generation_config_with_other_processors_keeps_model_generate(tiny, monkeypatch):
    """A model whose generation_config asks for a processor the loop does not apply (here a repetition penalty)
    is generated by model.generate, so its answers still follow its generation_config."""
    _, tok = tiny
    model, prompts = _eos_prone(tok), _prompts(tok, 4)
    model.generation_config.repetition_penalty = 1.5
    calls, real = [], model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    steps = {}
    generate._generate_hf(model, tok, prompts, 8, 0.0, 1.0, 0, True, steps)
    assert calls == [1] and "finished_row_steps" in steps
    model.generation_config.repetition_penalty = 1.0
    generate._generate_hf(model, tok, prompts, 8, 0.0, 1.0, 0, True, {})
    assert calls == [1]


def test_stats_and_rows_equal_with_and_without_eviction(tmp_path, tiny):
    """generate_answers gives the same rows evicting or not; stats count the decode row-steps of both."""
    _, tok = tiny
    model = _eos_prone(tok)
    records = [{"id": f"r{i}", "prompt": "q" * (1 + (i * 7) % 11) + str(i), "response": "h"} for i in range(12)]
    stats = {True: {}, False: {}}
    rows = {evict: generate_answers(model, tok, records, tmp_path / f"{evict}.jsonl", max_new_tokens=24, batch_size=6,
                                    stats=stats[evict], evict_finished=evict) for evict in (True, False)}
    assert rows[True] == rows[False]
    assert stats[True]["finished_row_steps"] == 0 < stats[False]["finished_row_steps"]
    assert stats[True]["new_tokens"] == stats[False]["new_tokens"]
    assert (stats[False]["decode_row_steps"] - stats[False]["finished_row_steps"] == stats[True]["decode_row_steps"])


def test_sampling_reproducible_for_seed(tmp_path, tiny):
    """Sampling with the same seed gives the same answers; another seed gives different ones."""
    model, tok = tiny
    kw = dict(max_new_tokens=8, batch_size=2, temperature=1.0, top_p=0.95)
    a = generate_answers(model, tok, _records(), tmp_path / "a.jsonl", seed=1, **kw)
    b = generate_answers(model, tok, _records(), tmp_path / "b.jsonl", seed=1, **kw)
    c = generate_answers(model, tok, _records(), tmp_path / "c.jsonl", seed=2, **kw)
    assert a == b and a != c


def test_shards_cover_once_and_merge_in_order(tmp_path):
    """Rank shards partition the records; rows from per-rank partial files merge back in input order."""
    records = _records(7)
    shards = [shard_records(records, r, 3) for r in range(3)]
    assert sorted(r["id"] for s in shards for r in s) == sorted(r["id"] for r in records)
    out = str(tmp_path / "g.jsonl")
    assert partial_path(out, 0, 1) == out + ".partial" and partial_path(out, 2, 3) == out + ".partial.2"
    for rank, shard in enumerate(shards):
        write_jsonl(partial_path(out, rank, 3), [{"id": r["id"], "prompt": r["prompt"], "generated": "x"} for r in shard])
    rows = merge_rows(records, done_rows(out, records))
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    with pytest.raises(ValueError, match=r"record r0: no generated answer \(7 missing\)"):
        merge_rows(records, {})


def test_two_ranks_generate_their_shards_and_rank0_merges(tmp_path, tiny, monkeypatch):
    """Simulated torchrun with 2 ranks: each generates only its shard into its own partial file and rank 0
    writes the full ordered file (rank 1 is stopped at its first barrier, as if waiting for rank 0)."""
    model, tok = tiny
    records, out = _records(6), tmp_path / "g.jsonl"
    real, seen = generate._generate_hf, []
    monkeypatch.setattr(generate, "_generate_hf", lambda m, t, ids, *a: (seen.extend(ids), real(m, t, ids, *a))[1])

    class Waiting(Exception):
        pass

    def barrier_stop():
        raise Waiting

    monkeypatch.setattr(generate, "_dist", lambda: (1, 2))
    monkeypatch.setattr(torch.distributed, "barrier", barrier_stop)
    with pytest.raises(Waiting):
        generate_answers(model, tok, records, out, **KW)
    assert sorted(r["id"] for r in read_jsonl_tolerant(f"{out}.partial.1")) == ["r1", "r3", "r5"] and len(seen) == 3
    monkeypatch.setattr(generate, "_dist", lambda: (0, 2))
    monkeypatch.setattr(torch.distributed, "barrier", lambda: None)
    rows = generate_answers(model, tok, records, out, **KW)
    assert len(seen) == 6 and [r["id"] for r in rows] == [r["id"] for r in records]
    assert sorted(os.listdir(tmp_path)) == ["g.jsonl"]


def test_cli_demo_and_bad_file(tmp_path, tiny_model_dir, capsys):
    """The CLI writes --max-prompts demo rows; a malformed data file exits with a file:line message."""
    out = tmp_path / "g.jsonl"
    main(["--model", tiny_model_dir, "--data", "demo", "--out", str(out), "--max-prompts", "3",
          "--max-new-tokens", "2", "--device", "cpu"])
    rows = read_jsonl(out)
    assert len(rows) == 3 and all("answer" in r for r in rows)
    assert "3 answers" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p2"}\n')
    with pytest.raises(SystemExit, match=rf"^generate.py: {bad}:2: missing field 'response'"):
        main(["--model", tiny_model_dir, "--data", str(bad), "--out", str(tmp_path / "x.jsonl")])


def test_cli_chat_template_that_raises_is_one_line(tmp_path, tiny_model_dir):
    """generate.py on a model whose chat template calls raise_exception: one line naming the model directory,
    before any answer is generated (no Jinja traceback)."""
    from test_model import model_with_template
    path = model_with_template(tiny_model_dir, tmp_path, "{{ raise_exception('System role not supported') }}")
    out = tmp_path / "g.jsonl"
    with pytest.raises(SystemExit, match=rf"^generate.py: {path}: the chat template cannot be rendered: it calls raise_exception: "
                                         r"'System role not supported'") as err:
        main(["--model", str(path), "--data", "demo", "--out", str(out), "--max-prompts", "2", "--device", "cpu"])
    assert "\n" not in str(err.value) and not out.exists() and not pathlib.Path(f"{out}.partial").exists()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_vllm_backend_missing_is_one_line_error(tmp_path):
    """--backend vllm without vLLM installed is a one-line refusal (generate.py and train.py prefix their names)."""
    with pytest.raises(errors.Refusal, match="needs vLLM installed: pip install vllm, or use the hf backend"):
        generate_answers("some-model", None, _records(1), tmp_path / "g.jsonl", backend="vllm")


def test_long_prompt_keeps_its_last_max_prompt_length_tokens(tmp_path, tiny, monkeypatch):
    """A huge prompt is cut like data.tokenize_pair cuts it (its last tokens, the assistant header kept)."""
    model, tok = tiny
    records = [{"id": "long", "prompt": "x" * 20_000 + " the end?", "response": "h"}, *_records(2)]
    seen, real = [], generate._generate_hf
    monkeypatch.setattr(generate, "_generate_hf", lambda m, t, ids, *a: seen.extend(ids) or real(m, t, ids, *a))
    rows = generate_answers(model, tok, records, tmp_path / "g.jsonl", max_prompt_length=24, **KW)
    assert len(rows) == 3 and max(map(len, seen)) == 24
    assert seen[0] == chat_prompt_ids(tok, records[0]["prompt"])[-24:]
    assert tok.decode(seen[0]).endswith("the end?<|im_end|>\n<|im_start|>assistant\n")
    assert sorted(map(len, seen[1:])) == sorted(len(chat_prompt_ids(tok, r["prompt"])) for r in records[1:])


def test_cli_passes_the_prompt_limit_and_checks_sampling_flags(tmp_path, tiny_model_dir, monkeypatch):
    seen = {}

    def fake(*a, stats, **kw):
        seen.update(kw)
        stats.update(answers=0, new_tokens=0, seconds=0.0, tokens_per_s=0.0)
        return []
    monkeypatch.setattr(generate, "generate_answers", fake)
    argv = ["--model", tiny_model_dir, "--out", str(tmp_path / "g.jsonl"), "--max-prompts", "1", "--device", "cpu"]
    main(argv + ["--max-prompt-length", "7"])
    assert seen["max_prompt_length"] == 7 and generate.parse_args(argv).max_prompt_length == 512
    for bad in (["--top-p", "-3"], ["--temperature", "inf"], ["--max-prompt-length", "0"]):
        with pytest.raises(SystemExit) as err:
            main(argv + bad)
        assert "\n" not in str(err.value) and bad[0] in str(err.value)
    with pytest.raises(SystemExit, match=r"--flaw-rate must be in \[0, 1\], got 2 \(see --help\)$"):  # train.py's words
        main(argv + ["--flaw-rate", "2"])
