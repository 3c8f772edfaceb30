"""Batched, resumable generation of the current model's answers to the training prompts.

  python generate.py --model smollm2-135m --data demo --out runs/x/generated.jsonl --max-prompts 16
  torchrun --nproc_per_node 4 generate.py --model DIR --data FILE --out FILE      # one shard per rank

Rows {"id", "prompt", "human", "generated"} (+ "answer" when the record has one) are appended to
`<out>.partial` (`<out>.partial.<rank>` under torchrun) and flushed after every batch; a rerun skips
the ids already there and the final file is written atomically, in input order, once every id is done.

Where this departs from, or fills a gap in, the paper:
1. Decoding: not specified by the paper (SPIN samples); the default here is greedy (temperature 0),
   which makes iterations reproducible; --temperature/--top-p switch to sampling, seeded per batch
   (torch.manual_seed(seed + batch index)), so a sampled run is reproducible only for the same batches.
2. Order and empty answers: prompts are sorted by tokenized length (longest first) to cut padding; the
   answer is the decoded new tokens with special tokens skipped and whitespace stripped. An empty answer
   is kept as "" (the judge scores it), never dropped.
3. Chat template: the prompt is the chat template of a single user turn; any system prompt is the template's default.
4. Long prompts: a prompt longer than max_prompt_length tokens keeps its LAST max_prompt_length tokens
   (data.py, departure "Truncation": the assistant header stays): a huge prompt costs bounded memory. Training cuts
   a prompt only when prompt + answer exceed max_length, so a prompt of more than max_prompt_length
   tokens may be answered from its end yet trained on in full (or cut to the same end).
"""
import argparse
import functools
import glob
import importlib.util
import math
import os
import sys
import time

import torch
from tqdm import tqdm

import errors

from data import (append_jsonl, chat_prompt_ids, load_prompts, open_append, pad_rows, read_jsonl,
                  read_jsonl_tolerant, truncate_prompt, write_jsonl)
from model import load_model, pick_device, resolve_model

# --- resumable bookkeeping (pure functions, tested without a model or a process group) ----------------


def shard_records(records, rank, world):
    """The records rank `rank` of `world` generates: every world-th record starting at rank."""
    return records[rank::world]


def partial_path(out_path, rank=0, world=1):
    """Where a rank appends finished rows: <out>.partial, or <out>.partial.<rank> under torchrun."""
    return f"{out_path}.partial" if world == 1 else f"{out_path}.partial.{rank}"


def done_rows(out_path, records):
    """{id: row} already generated for these records, from the final file and every partial file."""
    by_id = {r["id"]: r for r in records}
    paths = ([out_path] if os.path.exists(out_path) else []) + sorted(glob.glob(glob.escape(out_path) + ".partial*"))
    done = {}
    for path in paths:
        for row in (read_jsonl(path) if path == out_path else read_jsonl_tolerant(path)):
            rid = row.get("id")
            if rid in by_id and rid not in done:
                if row.get("prompt") != by_id[rid]["prompt"]:
                    raise ValueError(f"{path}: record {rid} has a different prompt than the input; delete the file to start over")
                done[rid] = row
    return done


def merge_rows(records, done):
    """Rows in the order of `records`, one per id; ValueError naming the first id without a row."""
    missing = [r["id"] for r in records if r["id"] not in done]
    if missing:
        raise ValueError(f"record {missing[0]}: no generated answer ({len(missing)} missing)")
    return [done[r["id"]] for r in records]


def _dist():
    """(rank, world) of an initialised torch.distributed process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# --- backends ----------------------------------------------------------------------------------------


@torch.no_grad()
def _generate_hf(model, tokenizer, prompt_ids, max_new_tokens, temperature, top_p, seed):
    """Answers (and new-token counts) for one batch of tokenized prompts: left padding, KV cache."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, attention_mask = pad_rows(prompt_ids, pad, side="left")                 # (B, T)
    width = input_ids.shape[1]
    kwargs = dict(max_new_tokens=max_new_tokens, use_cache=True, pad_token_id=pad)
    if model.generation_config.eos_token_id is None:
        kwargs["eos_token_id"] = tokenizer.eos_token_id
    if temperature > 0:
        torch.manual_seed(seed)
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    device = next(model.parameters()).device
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs)
    new = out[:, width:].cpu()                                                          # (B, new)
    eos = kwargs.get("eos_token_id", model.generation_config.eos_token_id)
    eos = set(eos if isinstance(eos, list) else [eos])
    counts = []
    for row in new.tolist():                            # tokens up to and including the first EOS
        ends = [j for j, t in enumerate(row) if t in eos]
        counts.append(ends[0] + 1 if ends else len(row))
    texts = [tokenizer.decode(row[:n], skip_special_tokens=True).strip() for row, n in zip(new.tolist(), counts)]
    return texts, counts


VLLM_MISSING = ("the vllm backend needs vLLM installed: pip install vllm, or use the hf backend (generate.py "
                "--backend hf, train.py --gen-backend hf)")


@functools.lru_cache(maxsize=1)
def _vllm_engine(model_name, seed):
    try:
        from vllm import LLM
    except ImportError:
        raise errors.Refusal(VLLM_MISSING) from None
    return LLM(model=model_name, seed=seed)


def _generate_vllm(model_name, prompts, max_new_tokens, temperature, top_p, seed, max_prompt_length=None):
    llm = _vllm_engine(model_name, seed)
    from vllm import SamplingParams

    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed,
                            truncate_prompt_tokens=max_prompt_length)  # vLLM keeps the last k tokens
    outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=True)
    return [o.outputs[0].text.strip() for o in outs], [len(o.outputs[0].token_ids) for o in outs]


# --- the function the driver calls ----------------------------------------------------------------------


def generate_answers(model, tokenizer, records, out_path, *, max_new_tokens=256, temperature=0.0, top_p=1.0,
                     seed=0, batch_size=8, backend="hf", stats=None, max_prompt_length=None) -> list[dict]:
    """Generate an answer per record into out_path (resumable, atomic, input order); returns the rows.
    With backend="vllm", `model` is a model directory or hub id. `stats`, if a dict, receives
    answers, new_tokens, seconds and tokens_per_s of this call's generation. A prompt longer than
    max_prompt_length tokens keeps its last max_prompt_length (departure "Long prompts"; None = no limit)."""
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate record ids in the input (first: {next(i for i in ids if ids.count(i) > 1)})")
    if backend not in ("hf", "vllm"):
        raise ValueError(f"unknown backend {backend!r} (hf|vllm)")
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise errors.Refusal(VLLM_MISSING)
    rank, world = _dist()
    if os.path.exists(out_path):
        final = {row.get("id"): row for row in read_jsonl(out_path)}
        if all(i in final for i in ids):
            return merge_rows(records, final)                               # already complete: no rewrite
    done = done_rows(out_path, records)
    todo = [r for r in shard_records(records, rank, world) if r["id"] not in done]
    mine = partial_path(out_path, rank, world)
    t0, n_tokens = time.perf_counter(), 0
    if todo:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        if backend == "hf":
            enc = {r["id"]: truncate_prompt(chat_prompt_ids(tokenizer, r["prompt"]), max_prompt_length) for r in todo}
            todo.sort(key=lambda r: -len(enc[r["id"]]))                   # longest first: less padding, OOM early
        batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
        with open_append(mine) as fh, tqdm(total=len(todo), desc=f"generate[{rank}]",
                                                          disable=rank != 0, file=sys.stderr) as bar:
            for b, batch in enumerate(batches):
                if backend == "hf":
                    texts, counts = _generate_hf(model, tokenizer, [enc[r["id"]] for r in batch], max_new_tokens,
                                                 temperature, top_p, seed + b)
                else:
                    texts, counts = _generate_vllm(model, [r["prompt"] for r in batch], max_new_tokens,
                                                   temperature, top_p, seed, max_prompt_length)
                for r, text in zip(batch, texts):
                    row = {"id": r["id"], "prompt": r["prompt"], "human": r.get("response"), "generated": text}
                    if "answer" in r:
                        row["answer"] = r["answer"]
                    append_jsonl(fh, row)
                n_tokens += sum(counts)
                bar.update(len(batch))
    seconds = time.perf_counter() - t0
    if stats is not None:
        stats.update(answers=len(todo), new_tokens=n_tokens, seconds=seconds, tokens_per_s=n_tokens / max(seconds, 1e-9))
    if world > 1:
        torch.distributed.barrier()                                         # every shard is on disk
    if rank == 0:
        rows = merge_rows(records, done_rows(out_path, records))
        write_jsonl(out_path, rows)
        for path in glob.glob(glob.escape(out_path) + ".partial*"):
            os.remove(path)
    if world > 1:
        torch.distributed.barrier()                                         # the final file exists
    return merge_rows(records, done_rows(out_path, records))


# --- CLI -----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # --- data
    p.add_argument("--model", required=True, help="HF hub id, model directory, or smollm2-135m (embedded)")
    p.add_argument("--data", default="demo", help="dataset JSONL/parquet file, or 'demo' for the built-in task")
    p.add_argument("--split", default="train", choices=["train", "eval"], help="demo split (ignored for files)")
    p.add_argument("--out", required=True, help="output JSONL (rows id, prompt, human, generated)")
    p.add_argument("--max-prompts", type=int, default=None, help="use the first N prompts (default: all)")
    p.add_argument("--skip-bad", action="store_true", help="skip and count malformed dataset lines (default: fail)")
    p.add_argument("--flaw-rate", type=float, default=0.3, help="demo: fraction of flawed human answers (0 = none)")
    # --- decoding
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer")
    p.add_argument("--max-prompt-length", type=int, default=512, help="keep the last N prompt tokens (default 512)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--seed", type=int, default=0, help="demo data and sampling seed")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate() call")
    # --- hardware
    p.add_argument("--backend", default="hf", choices=["hf", "vllm"], help="hf (transformers) or vllm if installed")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="bf16|fp16|fp32 (default: bf16 on capable CUDA, else fp32)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.max_new_tokens < 1 or args.batch_size < 1 or args.max_prompt_length < 1:
        raise SystemExit("generate.py: --max-new-tokens, --max-prompt-length and --batch-size must be >= 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0 and 0 < args.top_p <= 1):
        raise SystemExit(f"generate.py: --temperature must be finite and >= 0 and --top-p in (0, 1], got "
                         f"{args.temperature}, {args.top_p}")
    try:
        records = load_prompts(args.data, split=args.split, max_prompts=args.max_prompts, seed=args.seed,
                               flaw_rate=args.flaw_rate, skip_bad=args.skip_bad)
        device = args.device
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
            cuda = torch.cuda.is_available()
            torch.distributed.init_process_group("nccl" if cuda else "gloo")
            if cuda:
                device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                torch.cuda.set_device(device)
        if args.backend == "vllm":
            model, tokenizer = resolve_model(args.model), None
        else:
            model, tokenizer = load_model(args.model, device=pick_device(device), dtype=args.dtype)
        stats = {}
        rows = generate_answers(model, tokenizer, records, args.out, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                batch_size=args.batch_size, backend=args.backend, stats=stats,
                                max_prompt_length=args.max_prompt_length)
    except (ValueError, OSError) as e:  # bad input rejected by a library function (errors.Refusal too): one line
        raise SystemExit(errors.one_line("generate.py", e)) from None
    except KeyboardInterrupt:
        raise SystemExit(f"generate.py: interrupted; rerun the same command to resume from {args.out}.partial") from None
    if _dist()[0] == 0:
        print(f"{args.out}: {len(rows)} answers; this run generated {stats['answers']} answers, "
              f"{stats['new_tokens']} tokens in {stats['seconds']:.1f} s ({stats['tokens_per_s']:.1f} tokens/s)",
              file=sys.stderr)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
