import importlib.util
import json
import re

import pytest
import torch

from data import (check_file, collate_pairs, drop_torn_line, dsl_pairs, history_pairs, load_records, pad_rows, prompt_id,
                  read_jsonl, read_jsonl_tolerant, tokenize_pair, truncate_prompt, write_jsonl)


def _write(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines), encoding="utf-8")
    return str(path)


# --- JSONL and formats


def test_read_jsonl_bad_line_names_file_and_line(tmp_path):
    """A malformed line raises ValueError starting with file:line."""
    path = _write(tmp_path / "x.jsonl", [{"a": 1}, "{oops", {"b": 2}])
    with pytest.raises(ValueError, match=rf"^{path}:2: invalid JSON"):
        read_jsonl(path)
    path = _write(tmp_path / "y.jsonl", [{"a": 1}, "[1, 2]"])
    with pytest.raises(ValueError, match=rf"^{path}:2: expected a JSON object"):
        read_jsonl(path)


def test_write_jsonl_roundtrip_leaves_no_tmp(tmp_path):
    """write_jsonl then read_jsonl returns the records (unicode kept) and leaves only the final file."""
    records = [{"id": "1", "text": "héllo ✓"}, {"id": "2", "n": [1, 2]}]
    write_jsonl(tmp_path / "sub" / "out.jsonl", records)
    assert read_jsonl(tmp_path / "sub" / "out.jsonl") == records
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["out.jsonl"]


def test_atomic_writes_are_world_readable_and_survive_a_failure(tmp_path):
    """write_json/write_jsonl give 0644 files; an exception mid-write keeps the old file and no tmp file."""
    import data
    path = tmp_path / "s.json"
    data.write_json(path, {"b": 1, "a": "é"})
    assert path.stat().st_mode & 0o777 == 0o644 and json.loads(path.read_text()) == {"a": "é", "b": 1}

    def rows():
        yield {"id": 1}
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        write_jsonl(path, rows())
    assert json.loads(path.read_text()) == {"a": "é", "b": 1} and [p.name for p in tmp_path.iterdir()] == ["s.json"]


def test_each_format_parses(tmp_path):
    """Plain, UltraChat and SPIN lines normalise to the same id/prompt/response; a missing id is the prompt hash."""
    path = _write(tmp_path / "d.jsonl", [
        {"id": "a", "prompt": "P1", "response": "R1", "answer": "7"},
        {"prompt_id": "b", "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "P2"},
                                        {"role": "assistant", "content": "R2"}, {"role": "user", "content": "more"}]},
        {"real": [{"role": "user", "content": "P3"}, {"role": "assistant", "content": "R3"}],
         "generated": [{"role": "user", "content": "P3"}, {"role": "assistant", "content": "G3"}]},
    ])
    assert load_records(path) == [
        {"id": "a", "prompt": "P1", "response": "R1", "answer": "7"},
        {"id": "b", "prompt": "P2", "response": "R2"},
        {"id": prompt_id("P3"), "prompt": "P3", "response": "R3"},
    ]


@pytest.mark.parametrize("line, reason", [
    ({"prompt": "P"}, "missing field 'response'"),
    ({"prompt": "  ", "response": "R"}, "empty or non-string prompt"),
    ({"prompt": "P", "response": ""}, "empty or non-string response"),
    ({"messages": [{"role": "user", "content": "P"}]}, "no assistant turn"),
    ({"text": "x"}, "unknown format"),
    ("not json", "invalid JSON"),
    ({"id": "a", "prompt": "Q", "response": "R"}, "duplicate id 'a'"),
])
def test_bad_line_message_and_skip(tmp_path, line, reason):
    """Each bad line gives "file:line: reason"; with skip_bad it is skipped and counted."""
    path = _write(tmp_path / "d.jsonl", [{"id": "a", "prompt": "P0", "response": "R0"}, line,
                                         {"id": "c", "prompt": "P2", "response": "R2"}])
    with pytest.raises(ValueError, match=rf"^{path}:2: .*{reason}"):
        load_records(path)
    records, skipped = load_records(path, skip_bad=True, return_skipped=True)
    assert skipped == 1 and [r["id"] for r in records] == ["a", "c"]


@pytest.mark.parametrize("answer, reason", [
    (None, "'answer' is null"), ("  ", "'answer' is empty"), ([5], "'answer' is a list"),
    (True, "'answer' is a boolean"), ({"a": 1}, "'answer' is an object"),
])
def test_unusable_answer_is_refused_with_file_and_line(tmp_path, answer, reason):
    """`"answer": null` (or empty, a list, a boolean) is a data bug: refused as file:line when the data loads,
    never graded against str(None); a string or a number is an answer, a record without the key has none."""
    path = _write(tmp_path / "d.jsonl", [{"id": "a", "prompt": "P0", "response": "R0", "answer": 7},
                                         {"id": "b", "prompt": "P1", "response": "R1", "answer": answer},
                                         {"id": "c", "prompt": "P2", "response": "R2"}])
    with pytest.raises(ValueError, match=rf"^{path}:2: {re.escape(reason)}") as err:
        load_records(path)
    assert "\n" not in str(err.value)
    assert [r.get("answer") for r in load_records(path, skip_bad=True)] == [7, None]


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow not installed: parquet is optional")
def test_parquet_null_answer_is_no_answer(tmp_path):
    """In parquet a column's missing value is null: a row with a null answer has no answer (the key left out)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"id": "a", "prompt": "P", "response": "R", "answer": "5"}, {"id": "b", "prompt": "Q", "response": "S"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert load_records(str(tmp_path / "d.parquet")) == rows


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow not installed: parquet is optional")
def test_parquet_matches_jsonl(tmp_path):
    """A parquet file with UltraChat rows loads to the same records as the equivalent JSONL."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"prompt_id": "x", "messages": [{"role": "user", "content": "P"}, {"role": "assistant", "content": "R"}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert load_records(str(tmp_path / "d.parquet")) == load_records(_write(tmp_path / "d.jsonl", rows))


# --- DSL pairing and history


def test_dsl_pairs_hand_scores():
    """Higher score -> chosen; tie and missing keep human chosen (counted); identical answers dropped; no-dsl keeps human."""
    rows = [dict(id=str(i), prompt=f"p{i}", human=f"h{i}", generated=f"g{i}", human_score=h, generated_score=g)
            for i, (h, g) in enumerate([(1, 9), (9, 1), (5, 5), (None, 3), (4, None), (2, 8)])]
    rows.append(dict(id="6", prompt="p6", human="same", generated=" same ", human_score=1, generated_score=9))
    pairs, stats = dsl_pairs(rows, dsl=True)
    assert stats == dict(n=7, flips=2, ties=1, missing=2, identical=1)
    assert [p["chosen_source"] for p in pairs] == ["generated", "human", "human", "human", "human", "generated"]
    assert pairs[0] == {"id": "0", "prompt": "p0", "chosen": "g0", "rejected": "h0", "chosen_source": "generated"}
    pairs, stats = dsl_pairs(rows, dsl=False)
    assert all(p["chosen"] == f"h{p['id']}" for p in pairs) and stats["flips"] == 0 and len(pairs) == 6
    with pytest.raises(ValueError, match="record 9: judged row is missing 'generated'"):
        dsl_pairs([dict(id="9", prompt="p", human="h")], dsl=True)


def test_history_pairs_window(tmp_path):
    """history h at iteration k, mix concat, concatenates iterations max(0,k-h+1)..k in order; a missing one is an error."""
    for j in range(3):
        write_jsonl(tmp_path / f"iter{j}" / "pairs.jsonl", [{"id": f"{j}-{i}"} for i in range(2)])
    assert [p["id"] for p in history_pairs(tmp_path, 2, 2, mix="concat")] == ["1-0", "1-1", "2-0", "2-1"]
    assert [p["iter"] for p in history_pairs(tmp_path, 1, 5, mix="concat")] == [0, 0, 1, 1]
    assert len(history_pairs(tmp_path, 2, 1)) == 2
    with pytest.raises(ValueError, match="iter3"):
        history_pairs(tmp_path, 3, 2)
    with pytest.raises(ValueError, match="history mix"):
        history_pairs(tmp_path, 2, 2, mix="half")


def test_history_pairs_same_size_mix(tmp_path):
    """The default α-SPIN mix has iteration k's size, an equal share from each iteration (the latest take the
    remainder), no pair twice, file order within an iteration, the same draw for the same seed."""
    for j, n in enumerate([10, 9, 9]):
        write_jsonl(tmp_path / f"iter{j}" / "pairs.jsonl", [{"id": f"{j}-{i:02d}"} for i in range(n)])
    mix = history_pairs(tmp_path, 2, 2, seed=1)
    assert len(mix) == 9 and [p["iter"] for p in mix] == [1] * 4 + [2] * 5
    assert len({p["id"] for p in mix}) == 9 and [p["id"] for p in mix] == sorted(p["id"] for p in mix)
    assert mix == history_pairs(tmp_path, 2, 2, seed=1) and mix != history_pairs(tmp_path, 2, 2, seed=2)
    assert [p["iter"] for p in history_pairs(tmp_path, 2, 3)] == [0] * 3 + [1] * 3 + [2] * 3
    assert len(history_pairs(tmp_path, 2, 2, mix="concat")) == 18


# --- tokenization and collation


def _prompt_ids(tok, prompt):
    return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                   tokenize=True, return_dict=True)["input_ids"]


def test_tokenize_pair_labels_mask_exactly_prompt(tiny_tokenizer):
    """Labels are -100 on exactly the chat-template prompt; the rest is answer + EOS and decodes to the answer."""
    pair = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "five, I think"}
    out = tokenize_pair(tiny_tokenizer, pair)
    n_prompt = len(_prompt_ids(tiny_tokenizer, pair["prompt"]))
    for side in ("chosen", "rejected"):
        ids, labels = out[f"{side}_input_ids"], out[f"{side}_labels"]
        assert labels[:n_prompt] == [-100] * n_prompt and -100 not in labels[n_prompt:]
        assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tiny_tokenizer.eos_token_id
        assert tiny_tokenizer.decode(ids[n_prompt:-1]) == pair[side]
        assert tiny_tokenizer.decode(ids[:n_prompt]).endswith("<|im_start|>assistant\n")


def test_tokenize_pair_truncation_rule(tiny_tokenizer):
    """Too long: the prompt keeps its last max_prompt_length tokens, answers their first max_length - prompt."""
    pair = {"prompt": "q" * 200, "chosen": "a" * 100, "rejected": "b" * 10}
    full = _prompt_ids(tiny_tokenizer, pair["prompt"])
    out = tokenize_pair(tiny_tokenizer, pair, max_length=64, max_prompt_length=40)
    assert out["chosen_input_ids"][:40] == full[-40:] == out["rejected_input_ids"][:40]
    a, b = (tiny_tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in "ab")
    assert out["chosen_labels"][40:] == [a] * 24 and len(out["chosen_input_ids"]) == 64
    assert out["rejected_labels"][40:] == [b] * 10 + [tiny_tokenizer.eos_token_id]
    short = tokenize_pair(tiny_tokenizer, {"prompt": "hi", "chosen": "x", "rejected": "y"}, max_length=64, max_prompt_length=4)
    assert short["chosen_input_ids"][:-2] == list(_prompt_ids(tiny_tokenizer, "hi"))       # fits: untouched
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_pair(tiny_tokenizer, pair, max_length=64, max_prompt_length=64)


def test_collate_pairs_layout(tiny_tokenizer):
    """Rows 0..B-1 chosen, B..2B-1 rejected, right padded with pad id, labels -100 and attention 0 on padding."""
    ex = [tokenize_pair(tiny_tokenizer, {"prompt": p, "chosen": c, "rejected": r})
          for p, c, r in [("a", "long chosen answer", "r"), ("bb", "c", "rejected!")]]
    pad = tiny_tokenizer.pad_token_id
    batch = collate_pairs(ex, pad)
    rows = [e["chosen_input_ids"] for e in ex] + [e["rejected_input_ids"] for e in ex]
    labels = [e["chosen_labels"] for e in ex] + [e["rejected_labels"] for e in ex]
    width = max(map(len, rows))
    assert batch["input_ids"].shape == (4, width) and batch["input_ids"].dtype == torch.long
    for i in range(4):
        n = len(rows[i])
        assert batch["input_ids"][i].tolist() == rows[i] + [pad] * (width - n)
        assert batch["labels"][i].tolist() == labels[i] + [-100] * (width - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)


# --- hardening: non-UTF-8 input, a directory as --data, torn lines, the prompt truncation helper


def test_non_utf8_line_names_file_and_line(tmp_path):
    """Bytes that are not UTF-8 are a ValueError "file:line: not valid UTF-8", in every reader."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "p", "response": "r"}\n{"prompt": "caf\xe9", "response": "r"}\n')
    for read in (load_records, read_jsonl):
        with pytest.raises(ValueError, match=rf"^{path}:2: not valid UTF-8 \(byte 0xe9 at column 16\)"):
            read(str(path))
    with pytest.raises(ValueError, match=rf"^{path}:2: corrupt line .*not valid UTF-8"):
        read_jsonl_tolerant(str(path))


def test_directory_is_not_a_dataset(tmp_path):
    with pytest.raises(ValueError, match=rf"^{tmp_path}: is a directory"):
        load_records(str(tmp_path))
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'nope'}: no such file"):
        check_file(str(tmp_path / "nope"))


def test_drop_torn_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    drop_torn_line(path)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n' and read_jsonl(path) == [{"step": 1}, {"step": 2}]
    drop_torn_line(tmp_path / "absent.jsonl")
    assert not (tmp_path / "absent.jsonl").exists()


def test_truncate_prompt_keeps_the_end():
    assert truncate_prompt([1, 2, 3, 4, 5], 2) == [4, 5] and truncate_prompt([1, 2], 5) == [1, 2]
    assert truncate_prompt([1, 2, 3], None) == [1, 2, 3]


def test_pad_rows_left_and_right():
    """Rows are padded on the asked side to the longest; the mask is 1 exactly on each row's own entries."""
    ids, mask = pad_rows([[1, 2, 3], [4]], 0, side="left")
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_rows([[1, 2, 3], [4]], -100)
    assert ids.tolist() == [[1, 2, 3], [4, -100, -100]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="padding side"):
        pad_rows([[1]], 0, side="middle")
