"""logps.jsonl: the policy's summed log-probs of the first --logp-examples pairs at the start and at
the end of an iteration (the histograms of Fig. 2/10, drawn by plots.py).

Where this departs from, or fills a gap in, the paper:
1. Under --dist fsdp the log-probs come from step.PolicyLogps, the sharded root (lm_head applied to
   answer tokens in chunks; bf16 parameters on CUDA), otherwise from the full logits of the fp32
   policy: the same numbers up to float rounding. Every rank computes them (FSDP's forward is a
   collective); rank 0 writes.
"""
import torch

import data
import step as steps
from loss import sequence_logps


@torch.no_grad()
def policy_logps_rows(policy, examples, pairs, n, stage, pad_id, device, batch_size):
    """logps.jsonl rows: the policy's summed log-probs of the first n pairs (for the Fig. 2/10 histograms)."""
    was_training, rows = policy.training, []
    policy.eval()
    for i in range(0, min(n, len(examples)), batch_size):
        chunk = examples[i:min(i + batch_size, n)]
        batch = {k: v.to(device) for k, v in data.collate_pairs(chunk, pad_id).items()}
        if isinstance(policy, steps.PolicyLogps):  # the FSDP root (distributed.py): its forward unshards
            logps = policy(batch).tolist()
        else:
            logps = sequence_logps(policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                   batch["labels"]).tolist()
        counts = (batch["labels"][:, 1:] != -100).sum(-1).tolist()
        for j, pair in enumerate(pairs[i:i + len(chunk)]):
            rows.append(dict(stage=stage, id=pair["id"], chosen_logp=logps[j], rejected_logp=logps[len(chunk) + j],
                             chosen_tokens=counts[j], rejected_tokens=counts[len(chunk) + j],
                             chosen_source=pair.get("chosen_source")))
    policy.train(was_training)
    return rows


def record(path, stage, policy, examples, pairs, args, pad_id, device, main_proc, collective):
    """The rows of `stage` ("start" begins the file, "end" follows the start rows kept in it), computed on
    every rank when `collective` (FSDP), else on rank 0 only, and written by rank 0."""
    if not args.logp_examples or not (main_proc or collective):
        return
    rows = policy_logps_rows(policy, examples, pairs, args.logp_examples, stage, pad_id, device, args.batch_size)
    if main_proc:
        keep = [r for r in data.read_jsonl(path) if r["stage"] == "start"] if stage == "end" and path.is_file() else []
        data.write_jsonl(path, keep + rows)
