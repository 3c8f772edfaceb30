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
5. Finished rows (an efficiency choice; the answers do not change): the hf backend decodes with its own loop over
   the model and its KV cache (`_decode_evicting`), not `model.generate`. A row that has produced EOS leaves the
   batch (its input, attention mask, positions and cache rows are dropped: `Cache.batch_select_indices`), so no
   decode step is spent on an answer that has ended; `model.generate` kept every row until the batch's longest
   answer ended (317 of the 992 decode row-steps, 32 %, in `python -m bench --only generation`). The answers are
   `model.generate`'s: the same prefill and decode inputs (positions from the left-padded mask, no mask when
   nothing is padded), the argmax of the fp32 logits, and for sampling the same warpers (temperature, top-k from
   the model's generation_config or transformers' default 50, top-p) with the multinomial drawn over the whole
   batch's (B, V) shape, ended rows included, so that a seed (departure 1) consumes the same random stream and
   gives the answers `model.generate` gave. Tested token for token on the fixture model, greedy and sampled; on
   SmolLM2-135M, 16 demo prompts at batch 16, 48 new tokens: 16 of 16 identical greedy and sampled. After an
   eviction a row's logits come from a smaller batch, which BLAS may round differently in the last bits: the same
   kind of difference as between a batch and one prompt at a time. A generation_config that asks for another
   logits processor or stopping rule (a repetition penalty, min_new_tokens, bad words, stop strings, beams...) or
   an encoder-decoder model keeps one `model.generate` call per batch, as does
   `generate_answers(..., evict_finished=False)` (kept for comparison).
"""
import functools
import glob
import importlib.util
import inspect
import os
import sys
import time

import torch
from tqdm import tqdm

import errors
from cli import COUNT, fraction, POSITIVE_INT, Parser, add_generation_flags, hidden_alias

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


# generation-config fields (with their neutral values) under which model.generate applies a logits processor or a
# stopping rule that _decode_evicting does not: a model whose generation_config sets one keeps model.generate
_OTHER_PROCESSORS = dict(repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
                         encoder_no_repeat_ngram_size=0, bad_words_ids=None, sequence_bias=None, min_length=0,
                         min_new_tokens=0, forced_bos_token_id=None, forced_eos_token_id=None, remove_invalid_values=False,
                         exponential_decay_length_penalty=None, suppress_tokens=None, begin_suppress_tokens=None,
                         guidance_scale=1.0, watermarking_config=None, renormalize_logits=False, max_time=None,
                         stop_strings=None, num_beams=1, num_return_sequences=1, penalty_alpha=None,
                         prompt_lookup_num_tokens=None, assistant_early_exit=None)
_OTHER_WARPERS = dict(top_h=None, min_p=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)  # sampling only
TOP_K_DEFAULT = 50  # transformers' global default when neither the call nor the model's generation_config sets top_k


def _cache_kwarg(model):
    """The forward's name for the KV cache (transformers 5.x: `cache`, earlier releases `past_key_values`), or None."""
    params = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def _evicting_fits(model, sampling):
    """True when _decode_evicting computes what model.generate would: a decoder-only model whose forward takes
    position ids and a cache, and a generation_config that asks for no other logits processor or stopping rule."""
    params = inspect.signature(model.forward).parameters
    if getattr(model.config, "is_encoder_decoder", False) or "position_ids" not in params or _cache_kwarg(model) is None:
        return False
    gc = model.generation_config
    fields = {**_OTHER_PROCESSORS, **(_OTHER_WARPERS if sampling else {})}
    return all(getattr(gc, k, None) in (None, neutral) for k, neutral in fields.items())


def _warpers(model, temperature, top_p):
    """model.generate's sampling warpers for these settings, in its order: temperature, top-k, top-p."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    top_k = model.generation_config.top_k
    top_k = TOP_K_DEFAULT if top_k is None else top_k
    warpers = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    if top_k:
        warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return warpers


def _pick(logits, warpers, live, batch):
    """The next token of each live row from its (live, V) logits: argmax (warpers None), or a multinomial draw
    after the warpers, drawn over the whole batch's (batch, V) shape, ended rows included (a one-hot stand-in),
    so that a seed consumes the random stream model.generate consumed while it kept ended rows."""
    scores = logits.float()                                                 # as generate: processors in fp32
    if warpers is None:
        return scores.argmax(-1)
    for warper in warpers:
        scores = warper(None, scores)
    probs = torch.softmax(scores, dim=-1)                                   # (live, V)
    if len(live) == batch:
        return torch.multinomial(probs, num_samples=1).squeeze(1)
    rows = torch.tensor(live, device=probs.device)
    full = probs.new_zeros(batch, probs.shape[-1])                          # (batch, V)
    full[:, 0] = 1.0
    full[rows] = probs
    return torch.multinomial(full, num_samples=1).squeeze(1)[rows]


def _decode_evicting(model, input_ids, attention_mask, max_new_tokens, eos, warpers, counters):
    """New token ids of each row: model.generate's greedy / multinomial loop over the model and its KV cache, except
    that a row which has produced EOS leaves the batch (its input, mask, positions and cache rows are dropped), so
    each decode forward runs on unfinished rows only. The prefill and the decode inputs are generate's: position
    ids from the left-padded mask, the mask left out when nothing is padded, logits of the last position."""
    device = next(model.parameters()).device
    cache_name = _cache_kwarg(model)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    ids, mask = input_ids.to(device), attention_mask.to(device)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)           # (B, T)
    if bool((mask == 1).all()):
        mask = None                                                         # generate drops an all-ones mask
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, return_dict=True, **extra)
    cache, logits = getattr(out, cache_name), out.logits[:, -1]            # (B, V)
    del out
    batch = ids.shape[0]
    live = list(range(batch))                                               # the batch row of each live row
    new = [[] for _ in range(batch)]
    positions = positions[:, -1:]                                           # (B, 1)
    for step in range(max_new_tokens):
        tokens = _pick(logits, warpers, live, batch)                        # (live,)
        keep = []
        for i, (row, token) in enumerate(zip(live, tokens.tolist())):
            new[row].append(token)
            if token not in eos:
                keep.append(i)
        if not keep or step + 1 == max_new_tokens:
            break
        if len(keep) < len(live):                                           # evict the rows that just ended
            idx = torch.tensor(keep, device=device)
            cache.batch_select_indices(idx)
            tokens, positions = tokens[idx], positions[idx]
            mask = None if mask is None else mask[idx]
            live = [live[i] for i in keep]
        positions = positions + 1
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                       return_dict=True, **{cache_name: cache}, **extra).logits[:, -1]
        counters["decode_row_steps"] += len(live)
    return new


def _generate_whole(model, input_ids, attention_mask, max_new_tokens, pad, eos, sampling, temperature, top_p, counters):
    """New token ids of each row (pad after its EOS) from one model.generate call, which keeps ended rows."""
    kwargs = dict(max_new_tokens=max_new_tokens, use_cache=True, pad_token_id=pad)
    if model.generation_config.eos_token_id is None:
        kwargs["eos_token_id"] = eos
    if sampling:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    device = next(model.parameters()).device
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs)
    new = out[:, input_ids.shape[1]:].cpu()                                 # (B, new)
    counters["decode_row_steps"] += new.shape[0] * max(new.shape[1] - 1, 0)
    return new.tolist()


@torch.no_grad()
def _generate_hf(model, tokenizer, prompt_ids, max_new_tokens, temperature, top_p, seed, evict=True, counters=None):
    """Answers (and new-token counts) for one batch of tokenized prompts: left padding, KV cache. evict: rows that
    have ended leave the batch (_decode_evicting; departure 5); False, or a generation_config our loop does not
    reproduce: one model.generate call. `counters`, if a dict, accumulates decode_row_steps (rows × decode forwards
    after the prefill) and finished_row_steps (those spent on rows that had already produced EOS)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, attention_mask = pad_rows(prompt_ids, pad, side="left")                 # (B, T)
    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    eos = {e for e in (eos if isinstance(eos, list) else [eos]) if e is not None}
    sampling = temperature > 0
    if sampling:
        torch.manual_seed(seed)
    steps = {"decode_row_steps": 0}
    if evict and _evicting_fits(model, sampling):
        new = _decode_evicting(model, input_ids, attention_mask, max_new_tokens, eos,
                               _warpers(model, temperature, top_p) if sampling else None, steps)
    else:
        new = _generate_whole(model, input_ids, attention_mask, max_new_tokens, pad,
                              tokenizer.eos_token_id, sampling, temperature, top_p, steps)
    counts = []
    for row in new:                                     # tokens up to and including the first EOS
        ends = [j for j, t in enumerate(row) if t in eos]
        counts.append(ends[0] + 1 if ends else len(row))
    texts = [tokenizer.decode(row[:n], skip_special_tokens=True).strip() for row, n in zip(new, counts)]
    if counters is not None:
        needed = sum(max(n - 1, 0) for n in counts)    # a row's first token comes from the prefill
        counters["decode_row_steps"] = counters.get("decode_row_steps", 0) + steps["decode_row_steps"]
        counters["finished_row_steps"] = counters.get("finished_row_steps", 0) + steps["decode_row_steps"] - needed
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
                     seed=0, batch_size=8, backend="hf", stats=None, max_prompt_length=None,
                     evict_finished=True) -> list[dict]:
    """Generate an answer per record into out_path (resumable, atomic, input order); returns the rows.
    With backend="vllm", `model` is a model directory or hub id. `stats`, if a dict, receives
    answers, new_tokens, seconds and tokens_per_s of this call's generation (hf: also decode_row_steps and
    finished_row_steps, see _generate_hf). A prompt longer than max_prompt_length tokens keeps its last
    max_prompt_length (departure "Long prompts"; None = no limit). evict_finished=False: one model.generate
    call per batch, ended rows kept to the end (the old path, for comparison; departure "Finished rows")."""
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
    t0, n_tokens, steps = time.perf_counter(), 0, {"decode_row_steps": 0, "finished_row_steps": 0}
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
                                                 temperature, top_p, seed + b, evict_finished, steps)
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
        stats.update(answers=len(todo), new_tokens=n_tokens, seconds=seconds, tokens_per_s=n_tokens / max(seconds, 1e-9),
                     **(steps if backend == "hf" else {}))
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
    p = Parser(prog="generate.py", description=__doc__.split("\n\n")[0])
    # --- data
    p.add_argument("--model", required=True, help="HF hub id, model directory, or smollm2-135m (embedded)")
    p.add_argument("--data", default="demo", help="dataset JSONL/parquet file, or 'demo' for the built-in task")
    p.add_argument("--split", default="train", choices=["train", "eval"], help="demo split (ignored for files)")
    p.add_argument("--out", required=True, help="output JSONL (rows id, prompt, human, generated)")
    p.add_argument("--max-prompts", type=POSITIVE_INT, default=None, help="use the first N prompts (default: all)")
    p.add_argument("--skip-bad", action="store_true", help="skip and count malformed dataset lines (default: fail)")
    p.add_argument("--flaw-rate", type=fraction, default=0.3,
                   help="demo: fraction of flawed human answers (0 = none; default %(default)s)")
    p.add_argument("--seed", type=COUNT, default=0, help="demo data and sampling seed (default %(default)s)")
    # --- decoding: train.py's and eval.py's names (cli.add_generation_flags); the older spellings stay hidden aliases
    decoding = p.add_argument_group("generation")
    flags = add_generation_flags(decoding, max_new_tokens=256)
    hidden_alias(decoding, "--batch-size", flags["gen_batch_size"])
    hidden_alias(decoding, "--backend", flags["gen_backend"])
    decoding.add_argument("--max-prompt-length", type=POSITIVE_INT, default=512,
                          help="keep the last N prompt tokens (default %(default)s)")
    # --- hardware
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="default: bf16 on capable CUDA, else fp32")
    args = p.parse_args(argv)
    if not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p:g}")
    return args


def main(argv=None):
    args = parse_args(argv)
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
        if args.gen_backend == "vllm":
            model, tokenizer = resolve_model(args.model), None
        else:
            model, tokenizer = load_model(args.model, device=pick_device(device), dtype=args.dtype)
        stats = {}
        rows = generate_answers(model, tokenizer, records, args.out, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                batch_size=args.gen_batch_size, backend=args.gen_backend, stats=stats,
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
