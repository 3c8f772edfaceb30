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


def test_empty_generation_kept(tmp_path, tiny, monkeypatch):
    """An answer that is only EOS is recorded as "" rather than dropped."""
    model, tok = tiny
    monkeypatch.setattr(model, "generate", lambda input_ids, attention_mask, **kw: torch.cat(
        [input_ids, torch.full((input_ids.shape[0], 2), tok.eos_token_id)], dim=1))
    rows = generate_answers(model, tok, _records(3), tmp_path / "g.jsonl", **KW)
    assert [r["generated"] for r in rows] == ["", "", ""]


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
