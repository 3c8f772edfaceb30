"""The training step's loss without redundant work: the frozen reference is run once per iteration,
and the policy's answer log-probs come from its last hidden states through lm_head in chunks.

    ReferenceCache.build   one no-grad reference pass over every pair, before epoch 1: the summed
                           log π_ref of chosen and rejected answers (2 floats per pair) and, when noise
                           is on, the reference's last hidden states at the rejected answer tokens
                           (N⁻ × d), from which noise.noisy_answer_logps recomputes z = lm_head(h);
                           release_reference() then frees the reference's decoder layers
    PolicyLogps            the policy as a module returning (2B,) answer log-probs
                           (loss.chunked_sequence_logps): what DDP wraps
    cached_batch_loss      Eq. 1–9 on one micro-batch from the two

The reference is frozen for the whole iteration, so this is the same computation as batch_loss below
(the reference inside the step, `--no-precompute-ref`), up to float rounding of matmuls of another
shape: test_step.py checks loss terms and gradients agree to 1e-5 and that the noise draws
the same ε for the same tokens.

Where this departs from, or fills a gap in, the paper:
1. Nothing in the math: the paper's implementation detail (reference forward per step, as in TRL
   without `precompute_ref_log_probs`) is replaced by an equal computation. The hidden-state cache
   is held in the reference's dtype; when it would exceed --ref-cache-gb (UltraChat-scale runs:
   20k pairs × ~300 answer tokens × 4096 × 2 bytes ≈ 49 GB) only the log-probs are cached and each
   step runs the reference over its B rejected rows for the noise (half of the old reference cost).
"""
import torch
from torch import nn
from tqdm import tqdm

import data
import noise as noises
import packing
from loss import answer_states, chunked_answer_logps, dnpo_loss, sequence_logps


def _decoder_hidden(model, input_ids, attention_mask, position_ids=None):
    """Last hidden states (B, T, d): the decoder stack without lm_head (the input of lm_head)."""
    return model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state


def _answer_states(model, batch):
    """(states (N, d), targets (N,), seq_ids (N,), 2B) of the answer tokens of a batch of B pairs, padded
    (data.collate_pairs: 2B rows, labels) or packed (packing.pack_pairs: B rows, state_index)."""
    if "state_index" not in batch:
        hidden = _decoder_hidden(model, batch["input_ids"], batch["attention_mask"])  # (2B, T, d)
        return (*answer_states(hidden, batch["labels"]), hidden.shape[0])
    mask = packing.attention_mask_for(batch["attention_mask"], model)
    hidden = _decoder_hidden(model, batch["input_ids"], mask, batch["position_ids"])  # (B, T, d)
    return hidden.flatten(0, 1)[batch["state_index"]], batch["targets"], batch["seq_ids"], 2 * hidden.shape[0]


def _head(model):
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


class PolicyLogps(nn.Module):
    """The policy as a module: a batch of B pairs, padded or packed (_answer_states) -> summed answer
    log-probs (2B,), chosen rows first."""

    def __init__(self, model, chunk_size=256):
        super().__init__()
        self.model, self.chunk_size = model, chunk_size

    def forward(self, batch):
        weight, bias = _head(self.model)
        return chunked_answer_logps(*_answer_states(self.model, batch), weight, bias, self.chunk_size)


class ReferenceCache:
    """What the loss needs of the frozen reference, for every pair of the iteration."""

    def __init__(self, reference, logps, hidden, targets, chunk_size, needs_reference=True):
        self.reference = reference  # kept for its lm_head (and for the per-step fallback when hidden is None)
        self.needs_reference = needs_reference  # False: no noise, the steps never run the reference
        self.logps = logps  # (n, 2) float32: log π_ref(chosen), log π_ref(rejected)
        self.hidden, self.targets = hidden, targets  # per pair: (n_i, d), (n_i,) rejected answer tokens, or None
        self.chunk_size = chunk_size

    @classmethod
    @torch.no_grad()
    def build(cls, reference, examples, pad_id, device, batch_size, with_hidden, autocast, chunk_size=256,
              max_gb=4.0, progress=True, pack=True):
        """One pass over `examples` (longest first, so batches pad little); with_hidden: keep the
        rejected answers' hidden states if they fit in max_gb, else only the log-probs; pack: one
        shared-prompt row per pair (packing.py), else two padded rows."""
        n = len(examples)
        tokens = sum(len(e["rejected_labels"]) for e in examples)  # ≥ answer tokens: a bound for the budget
        d, itemsize = reference.config.hidden_size, next(reference.parameters()).element_size()
        keep_hidden = with_hidden and tokens * d * itemsize <= max_gb * 2 ** 30
        logps = torch.zeros(n, 2, dtype=torch.float32)
        hidden, targets = ([None] * n, [None] * n) if keep_hidden else (None, None)
        order = sorted(range(n), key=lambda i: -len(examples[i]["chosen_input_ids"]) - len(examples[i]["rejected_input_ids"]))
        for start in tqdm(range(0, n, batch_size), desc="reference", disable=not progress, leave=False):
            idx = order[start:start + batch_size]
            collate = packing.pack_pairs if pack else data.collate_pairs
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
            with autocast:
                states, tgt, rows, num = _answer_states(reference, batch)
                weight, bias = _head(reference)
                lp = chunked_answer_logps(states, tgt, rows, num, weight, bias, chunk_size)  # (2b,)
            b = len(idx)
            logps[idx, 0], logps[idx, 1] = lp[:b].float().cpu(), lp[b:].float().cpu()
            if keep_hidden:  # the rejected answer of pair j is sequence b + j
                for j, i in enumerate(idx):
                    hidden[i], targets[i] = states[rows == b + j].clone(), tgt[rows == b + j].clone()
        return cls(reference, logps, hidden, targets, chunk_size, needs_reference=with_hidden)

    def release_reference(self):
        """Free the reference's decoder layers once they are no longer needed (the hidden states are cached,
        or no noise: only its lm_head is used from here on); the embedding/lm_head stay. The reference module
        is emptied in place, so the caller's handle to it no longer computes anything. Returns the bytes freed."""
        if self.hidden is None and self.needs_reference:  # over budget: the steps still run the reference
            return 0
        decoder = self.reference.get_decoder()
        freed = sum(p.numel() * p.element_size() for p in decoder.layers.parameters())
        decoder.layers = nn.ModuleList()
        return freed

    def rejected_tokens(self, idx, batch):
        """(hidden (N, d), targets (N,), seq_ids (N,)) of the micro-batch's rejected answers, in its row order."""
        b = len(idx)
        if self.hidden is None and "state_index" in batch:  # over budget, packed: the reference on the B rows
            with torch.no_grad():
                states, targets, seq_ids, _ = _answer_states(self.reference, batch)
            rejected = seq_ids >= b
            return states[rejected], targets[rejected], seq_ids[rejected] - b
        if self.hidden is None:  # over budget, padded: the reference on the B rejected rows
            with torch.no_grad():
                h = _decoder_hidden(self.reference, batch["input_ids"][b:], batch["attention_mask"][b:])
            return answer_states(h, batch["labels"][b:])
        seq = [torch.full((len(self.targets[i]),), j, dtype=torch.long) for j, i in enumerate(idx)]
        device = batch["input_ids"].device
        return (torch.cat([self.hidden[i] for i in idx]).to(device), torch.cat([self.targets[i] for i in idx]).to(device),
                torch.cat(seq).to(device))


def cached_batch_loss(policy_logps, cache, idx, batch, generator, args, noise_rng, autocast):
    """Eq. 1–9 on one micro-batch (pairs `idx`): the policy forward only; the reference from the cache."""
    B = len(idx)
    with autocast:
        logps = policy_logps(batch)  # (2B,)
    policy_chosen, policy_rejected = logps[:B], logps[B:]
    ref = cache.logps[idx].to(logps.device)
    ref_chosen, ref_rejected = ref[:, 0], ref[:, 1]
    sigma2, noisy_ref_rejected_eps1, noisy_ref_rejected_eps2, variance_mean = 0.0, None, None, None
    if args.noise != "none":
        hidden, targets, seq_ids = cache.rejected_tokens(idx, batch)
        weight, bias = _head(cache.reference)  # z = lm_head(h) in the reference's dtype, as its own logits
        common = dict(head_bias=bias, chunk_size=args.noise_chunk_size, rng=noise_rng)
        noisy_ref_rejected_eps1 = noises.noisy_answer_logps(hidden, targets, seq_ids, B, weight,  # Eq. 6, ε₁
                                                            generator, generator_grad=False, **common)
        if args.noise == "trainable":  # Eq. 6, ε₂, gradient to the generator
            noisy_ref_rejected_eps2, variance_mean = noises.noisy_answer_logps(
                hidden, targets, seq_ids, B, weight, generator, generator_grad=True, return_variance=True, **common)
        sigma2 = variance_mean.item() if variance_mean is not None else args.noise_sigma ** 2
    out = dnpo_loss(policy_chosen, policy_rejected, ref_chosen,
                    noisy_ref_rejected_eps1 if noisy_ref_rejected_eps1 is not None else ref_rejected,
                    noisy_ref_rejected_eps2, variance_mean, args.beta, args.noise_alpha, args.loss_type,
                    ref_rejected_logps=ref_rejected)  # Eq. 9 (noise none: exactly SPIN)
    out["sigma2"] = sigma2
    out["tokens"] = int(batch["tokens"]) if "tokens" in batch else int(batch["attention_mask"].sum())
    return out


def batch_loss(policy, reference, generator, batch, args, noise_rng, autocast):
    """The old path (`--no-precompute-ref`), what cached_batch_loss is tested against: Eq. 1–9 on one
    micro-batch with the reference inside the step: one policy forward over 2B rows (full (2B, T, V)
    logits), one reference forward, the noise twice."""
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]  # (2B, T)
    B = input_ids.shape[0] // 2
    with autocast:
        policy_logits = policy(input_ids=input_ids, attention_mask=attention_mask).logits  # (2B, T, V)
    policy_logps = sequence_logps(policy_logits, labels)  # (2B,)
    with torch.no_grad(), autocast:
        ref_out = reference(input_ids=input_ids, attention_mask=attention_mask,
                            output_hidden_states=args.noise != "none")
    ref_logps = sequence_logps(ref_out.logits, labels)  # (2B,)
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = policy_logps[:B], policy_logps[B:], ref_logps[:B], ref_logps[B:]
    sigma2 = 0.0
    if args.noise == "none":  # exactly SPIN: the clean reference, no noise term
        out = dnpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, None, None, args.beta,
                        args.noise_alpha, args.loss_type, ref_rejected_logps=ref_rejected)
    else:
        noise_inputs = (ref_out.logits[B:], ref_out.hidden_states[-1][B:], labels[B:])  # (B,T,V), (B,T,d), (B,T)
        noisy_ref_rejected_eps1 = noises.noisy_sequence_logps(*noise_inputs, generator, generator_grad=False,  # Eq. 6, ε₁
                                                  chunk_size=args.noise_chunk_size, rng=noise_rng)
        noisy_ref_rejected_eps2, variance_mean = None, None
        if args.noise == "trainable":
            noisy_ref_rejected_eps2, variance_mean = noises.noisy_sequence_logps(  # Eq. 6, ε₂, grad to the generator
                *noise_inputs, generator, generator_grad=True, chunk_size=args.noise_chunk_size, rng=noise_rng,
                return_variance=True)
            sigma2 = variance_mean.item()
        else:
            sigma2 = args.noise_sigma ** 2
        out = dnpo_loss(policy_chosen, policy_rejected, ref_chosen, noisy_ref_rejected_eps1, noisy_ref_rejected_eps2,
                        variance_mean, args.beta, args.noise_alpha, args.loss_type, ref_rejected_logps=ref_rejected)  # Eq. 9
    out["sigma2"] = sigma2
    out["tokens"] = int(attention_mask.sum())
    return out
