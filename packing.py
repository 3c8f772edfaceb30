"""Shared-prompt packing: a pair's chosen and rejected answers in one row, behind one copy of the prompt.

A pair (x, y⁺, y⁻) is usually two rows, [x y⁺] and [x y⁻], so the prompt x goes through the model twice.
Packed, it is one row [x y⁺ y⁻] with

    position ids   0 … |x|−1 | |x| … |x|+|y⁺|−1 | |x| … |x|+|y⁻|−1     (y⁻ restarts where y⁺ started)
    attention      causal, except that y⁻ does not see y⁺ (y⁺ cannot see y⁻, which comes after it)

so every answer token attends to exactly the tokens it attended to in its own row, at the same positions,
and gets the same hidden state up to the float rounding of matmuls of another shape (test_packing.py:
log-probs and gradients equal to 1e-5 in fp32). The first token of y⁻ is predicted by the last prompt
state, not by the last state of y⁺, so answer log-probs are read at explicit state positions
(`state_index`) rather than by the usual one-token shift. This is prefix sharing (Wang et al. 2024,
"Accelerating Direct Preference Optimization with Prefix Sharing"). On the demo task (prompts of 43
tokens with the chat template, answers of 11 and 23) a pair takes 77 positions instead of 2 × 66 padded.

    pack_pairs(examples, pad_id)   B tokenized pairs (data.tokenize_pair) -> one packed batch:
        input_ids (B, T), position_ids (B, T), attention_mask (B, 1, T, T) bool (True: may attend),
        state_index (N,) into the flattened (B·T) hidden states: the state predicting each answer token,
        targets (N,) those tokens, seq_ids (N,) in [0, 2B): b for y⁺ of pair b, B + b for y⁻ (the row
        order of data.collate_pairs), tokens () the number of real positions
    attention_mask_for(mask, model)   the bool mask as the model's attention implementation wants it
    supported(model)                  whether the model takes a custom 4D mask (sdpa, eager)
    packed_length(example)            the packed row's length
    row_length(example, packed)       what a micro-batch is padded to (train.py groups micro-batches by it)
    collate(packed)                   pack_pairs or data.collate_pairs

Where this departs from the paper:
1. Nothing in the math: an equal computation with fewer positions. Padding positions attend only to
   position 0 of their row (a fully masked row would give NaN in SDPA), and nothing attends to them.
"""
import torch

import data

PACKABLE_ATTENTION = ("sdpa", "eager")


def _prompt_length(example):
    n = next((i for i, y in enumerate(example["chosen_labels"]) if y != -100), len(example["chosen_labels"]))
    if example["chosen_input_ids"][:n] != example["rejected_input_ids"][:n] or example["rejected_labels"][n - 1] != -100:
        raise ValueError("pack_pairs: chosen and rejected rows of a pair do not share their prompt")
    return n


def pack_pairs(examples, pad_id) -> dict:
    """B tokenized pairs -> one packed batch (module docstring)."""
    B = len(examples)
    parts = []
    for e in examples:
        p = _prompt_length(e)
        parts.append((e["chosen_input_ids"][:p], e["chosen_input_ids"][p:], e["rejected_input_ids"][p:]))
    T = max(len(x) + len(y1) + len(y2) for x, y1, y2 in parts)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    segment = torch.full((B, T), -1, dtype=torch.long)  # -1 padding, 0 prompt, 1 chosen, 2 rejected
    state_index, targets, seq_ids = [], [], []
    for b, (x, y1, y2) in enumerate(parts):
        p, n = len(x), len(x) + len(y1) + len(y2)
        input_ids[b, :n] = torch.tensor(x + y1 + y2)
        position_ids[b, :n] = torch.tensor(list(range(p + len(y1))) + list(range(p, p + len(y2))))
        segment[b, :n] = torch.tensor([0] * p + [1] * len(y1) + [2] * len(y2))
        chosen_states = range(p - 1, p - 1 + len(y1))  # the state at t predicts the token at t + 1
        rejected_states = ([p - 1] + list(range(p + len(y1), n - 1)))[:len(y2)]  # y⁻'s first token: from x
        state_index += [b * T + t for t in chosen_states] + [b * T + t for t in rejected_states]
        targets += y1 + y2
        seq_ids += [b] * len(y1) + [B + b] * len(y2)
    q, k = segment[:, :, None], segment[:, None, :]  # (B, T, 1) queries, (B, 1, T) keys
    mask = torch.ones(T, T, dtype=torch.bool).tril() & (q >= 0) & ((k == 0) | (k == q))  # x: seen by all
    mask[:, :, 0] |= segment < 0  # padding queries look at position 0 (no NaN); no query looks at padding
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask[:, None],
            "state_index": torch.tensor(state_index, dtype=torch.long), "targets": torch.tensor(targets, dtype=torch.long),
            "seq_ids": torch.tensor(seq_ids, dtype=torch.long), "tokens": (segment >= 0).sum()}


def packed_length(example) -> int:
    """Positions of a pair's packed row: the prompt once plus both answers."""
    return len(example["chosen_input_ids"]) + len(example["rejected_input_ids"]) - _prompt_length(example)


def row_length(example, packed) -> int:
    """What a micro-batch holding this pair is padded to: its packed row, or the longer of its two rows."""
    return packed_length(example) if packed else max(len(example["chosen_input_ids"]), len(example["rejected_input_ids"]))


def collate(packed):
    """The micro-batch collator: pack_pairs, or data.collate_pairs (two padded rows per pair)."""
    return pack_pairs if packed else data.collate_pairs


def positions(micro_batches, examples, packed):
    """(positions, real positions) of the collated micro-batches: packed (B rows) or padded (2B rows,
    data.collate_pairs), each padded to its longest row; what padding and sharing save, for bench.py."""
    total = real = 0
    for mb in micro_batches:
        if packed:
            lengths = [packed_length(examples[i]) for i in mb]
        else:
            lengths = [len(examples[i][f"{side}_input_ids"]) for side in ("chosen", "rejected") for i in mb]
        total, real = total + len(lengths) * max(lengths, default=0), real + sum(lengths)
    return total, real


def padding_fraction(micro_batches, examples, packed=False):
    """Fraction of the collated micro-batches' positions that are padding."""
    total, real = positions(micro_batches, examples, packed)
    return 1 - real / total if total else 0.0


def supported(model) -> bool:
    """Whether `model` takes a custom 4D attention mask (flash-attention kernels do not)."""
    return getattr(model.config, "_attn_implementation", "sdpa") in PACKABLE_ATTENTION


def attention_mask_for(mask, model, dtype=torch.float32):
    """The (B, 1, T, T) bool mask for `model`: as is for SDPA; additive (0 / most negative) for eager."""
    if getattr(model.config, "_attn_implementation", "sdpa") != "eager":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
