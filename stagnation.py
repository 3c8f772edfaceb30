"""Fig. 2 / Fig. 10 from fresh generations: for each iter{k}/model of a run, the summed (and per-token)
log-probs under that model of the human answers and of the model's *own* answers to the same training
prompts. `python eval.py logps RUN_DIR [--n 64]` writes

    RUN_DIR/eval/logps_iter{k}.jsonl     one row per prompt: id, human_logp, human_tokens, generated_logp,
                                         generated_tokens, generated (the model's answer)
    RUN_DIR/eval/logps_settings.json     n, and per iteration the model and where its answers came from

The model's own answers are iter{k+1}/generated.jsonl when iteration k+1 started from iter{k}/model (its
config.json's start_model is that directory; with train.py --start-model it is not), otherwise a fresh
generation pass (generate.py, resumable) over the same prompts into eval/logps_generated_iter{k}.jsonl,
with the run's decoding settings (max_new_tokens, temperature, top_p, seed). The log-probs use training's
own code: the human answer is the "chosen" and the generation the "rejected" side of one pair for
data.tokenize_pair and data.collate_pairs, scored by loss.sequence_logps. Every file is written
atomically; a finished iteration is skipped on a rerun; another --n is refused.

Where this departs from, or fills a gap in, the paper:
1. The paper does not say which or how many prompts its histograms use: here the first --n (default 64)
   training prompts of the run (its --data, --max-prompts and --seed).
2. The "margin" summarising a panel is mean human − mean generated log-prob under the same model (not the
   β-scaled training margin m, which is relative to a reference model); its 95% interval is the normal
   interval of the mean of the paired per-prompt differences.
3. Answers are truncated by training's rule (the run's max_length / max_prompt_length), so the log-prob
   of a long answer covers its first tokens only, as in training.
"""
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import generate
import model as model_lib
from loss import IGNORE_INDEX, sequence_logps

Z95 = 1.959963984540054  # the two-sided 95 % normal quantile (eval.py's intervals too)


def answer_logps(model, tokenizer, rows, max_length, max_prompt_length, batch_size=8):
    """Summed log-probs and answer-token counts of rows' "human" and "generated" answers under model."""
    device, out = next(model.parameters()).device, []
    for i in tqdm(range(0, len(rows), batch_size), desc="log-probs", file=sys.stderr, leave=False):
        chunk = rows[i:i + batch_size]
        examples = [data.tokenize_pair(tokenizer, {"prompt": r["prompt"], "chosen": r["human"], "rejected": r["generated"]},
                                       max_length, max_prompt_length) for r in chunk]
        batch = {k: v.to(device) for k, v in data.collate_pairs(examples, tokenizer.pad_token_id).items()}  # (2B, T)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (2B, T, V)
        logps = sequence_logps(logits, batch["labels"]).tolist()  # (2B,): human rows, then generated rows
        counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1).tolist()
        B = len(chunk)
        out += [{"id": r["id"], "human_logp": logps[j], "human_tokens": counts[j], "generated_logp": logps[B + j],
                 "generated_tokens": counts[B + j], "generated": r["generated"]} for j, r in enumerate(chunk)]
    return out


def _same_dir(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # a path recorded relative to another working directory: regenerate instead
        return False


def reusable_generations(run_dir, k, n):
    """iter{k+1}/generated.jsonl's first n rows when iteration k+1 started from iter{k}/model, else None."""
    nxt = Path(run_dir) / f"iter{k + 1}"
    if not ((nxt / "config.json").is_file() and (nxt / "generated.jsonl").is_file()):
        return None
    start = data.read_json(nxt / "config.json").get("start_model")
    if not start or not _same_dir(start, Path(run_dir) / f"iter{k}" / "model"):
        return None
    rows = data.read_jsonl(nxt / "generated.jsonl")[:n]
    return rows if len(rows) == n else None


def compute_logps(run_dir, n=64, device=None, batch_size=8):
    """Write eval/logps_iter{k}.jsonl for every iter{k}/model of run_dir; returns {k: margin_summary}."""
    run_dir = Path(run_dir)
    out_dir = run_dir / "eval"
    ks = [k for k in data.iterations(run_dir) if (run_dir / f"iter{k}" / "model" / "config.json").is_file()]
    if not ks:
        raise ValueError(f"{run_dir}: no iter*/model to evaluate (is this a run directory?)")
    if n < 1:
        raise ValueError(f"--n must be ≥ 1, got {n}")
    settings_path = out_dir / "logps_settings.json"
    settings = data.read_json(settings_path) if settings_path.is_file() else {"n": n, "iterations": {}}
    if settings["n"] != n:
        raise ValueError(f"{out_dir}/logps_iter*.jsonl hold n={settings['n']} prompts, asked for {n}; "
                         f"pass --n {settings['n']} or delete {settings_path} and those files")
    for k in ks:
        out, model_dir = out_dir / f"logps_iter{k}.jsonl", run_dir / f"iter{k}" / "model"
        if out.is_file() and str(k) in settings["iterations"]:
            print(f"iter{k}: {out} exists, skipped", file=sys.stderr)
            continue
        config = data.read_json(run_dir / f"iter{k}" / "config.json")
        policy, tokenizer = model_lib.load_model(str(model_dir), device=device)
        rows, source = reusable_generations(run_dir, k, n), f"iter{k + 1}/generated.jsonl"
        if rows is None:
            records = data.load_prompts(config.get("data"), split="train", max_prompts=config.get("max_prompts") or None,
                                        seed=config.get("seed", 0))[:n]
            source = f"eval/logps_generated_iter{k}.jsonl (fresh)"
            print(f"iter{k}: generating answers to {len(records)} training prompts with {model_dir}", file=sys.stderr)
            rows = generate.generate_answers(policy, tokenizer, records, str(out_dir / f"logps_generated_iter{k}.jsonl"),
                                             max_new_tokens=config.get("max_new_tokens", 256),
                                             temperature=config.get("temperature", 0.0), top_p=config.get("top_p", 1.0),
                                             seed=config.get("seed", 0), batch_size=batch_size)
        data.write_jsonl(out, answer_logps(policy, tokenizer, rows, config.get("max_length", 1024),
                                           config.get("max_prompt_length", 512), batch_size))
        del policy
        settings["iterations"][str(k)] = {"model": str(model_dir), "generations": source, "n": len(rows)}
        data.write_json(settings_path, settings)
    return read_summaries(run_dir)


def read_summaries(run_dir, per_token=False) -> dict:
    """{k: margin_summary(rows)} for every eval/logps_iter{k}.jsonl of run_dir (k ascending)."""
    out_dir = Path(run_dir) / "eval"
    return {k: margin_summary(data.read_jsonl(p), per_token) for k in data.iterations(run_dir)
            if (p := out_dir / f"logps_iter{k}.jsonl").is_file()}


def margin_summary(rows, per_token=False) -> dict:
    """n, mean human and generated (per-token) log-prob, margin = their difference and its 95% interval."""
    human, generated = (np.array([r[f"{side}_logp"] / (max(r[f"{side}_tokens"], 1) if per_token else 1)
                                  for r in rows], dtype=float) for side in ("human", "generated"))
    if not rows:
        raise ValueError("no log-prob rows to summarise")
    diff = human - generated  # paired: the same prompt's two answers under the same model
    margin = float(diff.mean())
    half = Z95 * diff.std(ddof=1) / math.sqrt(len(diff)) if len(diff) > 1 else None
    return {"n": len(rows), "human_mean": float(human.mean()), "generated_mean": float(generated.mean()),
            "margin": margin, "margin_95": None if half is None else (margin - half, margin + half),
            "human": human.tolist(), "generated": generated.tolist()}
