"""The training step's loss without redundant work: the frozen reference is run once per iteration,
and the policy's answer log-probs come from its last hidden states through lm_head in chunks.

    ReferenceCache.build   one no-grad reference pass over every pair, before epoch 1: the summed
                           log π_ref of chosen and rejected answers (2 floats per pair) and, when noise
                           is on, the reference's last hidden states at the rejected answer tokens
                           (N⁻ × d), from which noise.noisy_answer_logps recomputes z = lm_head(h)
                           with a copy of the start model's lm_head. train.py runs it with the policy
                           before its first update (the reference is the start model, so its numbers
                           come out in the policy's own numerics) and then frees the reference model
    PolicyLogps            the policy as a module returning (2B,) answer log-probs
                           (loss.chunked_answer_logps), on padded or packed rows: what DDP wraps
    cached_batch_loss      Eq. 1–9 on one micro-batch from the two

The reference is frozen for the whole iteration, so this is the same computation as batch_loss below
(the reference inside the step, `--no-precompute-ref`), up to float rounding of matmuls of another
shape: test_step.py checks loss terms and gradients agree to 1e-5 and that the noise draws
the same ε for the same tokens.

Where this departs from, or fills a gap in, the paper:
1. Nothing in the math: the paper's implementation detail (reference forward per step, as in TRL
   without `precompute_ref_log_probs`) is replaced by an equal computation. The hidden-state cache
   is held in fp32; when it would exceed --ref-cache-gb (UltraChat-scale runs: 20k pairs × ~300
   answer tokens × 4096 × 4 bytes ≈ 98 GB) only the log-probs are cached and each step runs the
   reference model (held in the compute dtype) over its B rejected rows for the noise.
2. Numerics of the reference: computed from the policy before its first update, under the policy's
   autocast, the reference log-probs equal the policy's own at step 0 up to batch-shape rounding, so
   the margins start at 0 in bf16 as in fp32. A separate bf16 copy of the reference (the paper's
   setting, and this code's before) differs from the fp32-master policy under autocast by ~0.5 nats
   per sequence on SmolLM2-135M, a margin of ~0.05 at β = 0.1 before any training.
"""
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

import noise as noises
import packing
from loss import MARGIN_DIAGNOSTICS, answer_states, chunked_answer_logps, dnpo_loss, margin_diagnostics, sequence_logps

DIAGNOSTICS = MARGIN_DIAGNOSTICS + noises.TOKEN_DIAGNOSTICS  # per step in metrics.jsonl (loss.py 6, noise.py 9)


@dataclass(frozen=True)
class Objective:
    """What the step's loss depends on, named (not the whole flag namespace): β and ℓ of Eq. 1–3, the noise
    kind ("trainable" Eq. 5–6, "fixed" App. H, "none" = SPIN), α of Eq. 9, σ of fixed noise, and the answer
    tokens per chunk of lm_head + log-softmax (memory only)."""
    beta: float
    alpha: float
    noise: str = "trainable"
    loss_type: str = "sigmoid"
    noise_sigma: float = noises.DEFAULT_SIGMA
    chunk_size: int = 256

    @classmethod
    def of(cls, args):
        """From train.py's flags."""
        return cls(beta=args.beta, alpha=args.noise_alpha, noise=args.noise, loss_type=args.loss_type,
                   noise_sigma=args.noise_sigma, chunk_size=args.noise_chunk_size)


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


def _rejected(states, targets, seq_ids, num):
    """The rejected answers' part of _answer_states (sequences B..2B-1), renumbered 0..B-1."""
    rejected = seq_ids >= num // 2
    return states[rejected], targets[rejected], seq_ids[rejected] - num // 2


def _head(model):
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


class PolicyLogps(nn.Module):
    """The policy as a module: a batch of B pairs, padded or packed (_answer_states) -> summed answer
    log-probs (2B,), chosen rows first; with rejected_states=True also (states, targets, seq_ids) of the
    rejected answers' tokens (what ReferenceCache keeps for the noise)."""

    def __init__(self, model, chunk_size=256, fp32_head=True):
        super().__init__()
        self.model, self.chunk_size, self.fp32_head = model, chunk_size, fp32_head

    def forward(self, batch, rejected_states=False):
        weight, bias = _head(self.model)
        states, targets, seq_ids, num = _answer_states(self.model, batch)
        logps = chunked_answer_logps(states, targets, seq_ids, num, weight, bias, self.chunk_size, self.fp32_head)
        return (logps, *_rejected(states, targets, seq_ids, num)) if rejected_states else logps


def _full(tensor):
    """A parameter as one local tensor (an FSDP-sharded DTensor is gathered: a collective)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class ReferenceCache:
    """What the loss needs of the frozen reference, for every pair of the iteration."""

    def __init__(self, logps, hidden, targets, head, reference=None):
        self.logps = logps  # (n, 2) float32: log π_ref(chosen), log π_ref(rejected)
        self.hidden, self.targets = hidden, targets  # per pair: (n_i, d), (n_i,) rejected answer tokens, or None
        self.head = head  # (weight (V, d), bias (V,) or None): the reference's lm_head, for z = lm_head(h)
        self.reference = reference  # the reference model, for the per-step fallback when hidden is None

    @classmethod
    @torch.no_grad()
    def build(cls, module, examples, pad_id, device, batch_size, with_hidden, autocast, max_gb=4.0, progress=True,
              pack=True, reference=None):
        """One pass of `module` (a PolicyLogps; train.py passes the policy's before its first update: the
        reference is the start model, so this is the reference computed in the policy's own numerics, and
        the margins start at 0 under bf16 autocast too) over `examples`, longest first so batches pad
        little. with_hidden: keep the rejected answers' hidden states if they fit in max_gb, else only the
        log-probs, and the steps run `reference` for the noise; pack: one shared-prompt row per pair."""
        n = len(examples)
        tokens = sum(len(e["rejected_labels"]) for e in examples)  # ≥ answer tokens: a bound for the budget
        keep_hidden = with_hidden and tokens * module.model.config.hidden_size * 4 <= max_gb * 2 ** 30
        if with_hidden and not keep_hidden and reference is None:
            raise ValueError("the rejected hidden states exceed --ref-cache-gb and no reference model was given")
        weight, bias = _head(module.model)
        head = (_full(weight).detach().clone(), _full(bias).detach().clone() if bias is not None else None)
        logps = torch.zeros(n, 2, dtype=torch.float32)
        hidden, targets = ([None] * n, [None] * n) if keep_hidden else (None, None)
        order = sorted(range(n), key=lambda i: -packing.row_length(examples[i], pack))
        collate, was_training = packing.collate(pack), module.training
        module.eval()  # no dropout: the reference is a deterministic function
        for start in tqdm(range(0, n, batch_size), desc="reference", disable=not progress, leave=False):
            idx = order[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
            with autocast:
                lp, states, tgt, rows = module(batch, rejected_states=True)  # (2b,), rejected (N, d), (N,), (N,)
            b = len(idx)
            logps[idx, 0], logps[idx, 1] = lp[:b].float().cpu(), lp[b:].float().cpu()
            if keep_hidden:  # the rejected answer of pair j
                for j, i in enumerate(idx):
                    hidden[i], targets[i] = states[rows == j].float(), tgt[rows == j]  # boolean indexing copies
        module.train(was_training)
        if hasattr(module, "reshard"):  # an FSDP root keeps its parameters gathered after a forward: shard them again
            module.reshard()
        return cls(logps, hidden, targets, head, reference if with_hidden and not keep_hidden else None)

    @property
    def needs_reference(self):
        """Whether the steps still run the reference model (the hidden states did not fit)."""
        return self.reference is not None

    def rejected_tokens(self, idx, batch):
        """(hidden (N, d), targets (N,), seq_ids (N,)) of the micro-batch's rejected answers, in its row order."""
        b = len(idx)
        if self.hidden is None and "state_index" in batch:  # over budget, packed: the reference on the B rows
            with torch.no_grad():
                return _rejected(*_answer_states(self.reference, batch))
        if self.hidden is None:  # over budget, padded: the reference on the B rejected rows
            with torch.no_grad():
                h = _decoder_hidden(self.reference, batch["input_ids"][b:], batch["attention_mask"][b:])
            return answer_states(h, batch["labels"][b:])
        seq = [torch.full((len(self.targets[i]),), j, dtype=torch.long) for j, i in enumerate(idx)]
        device = batch["input_ids"].device
        return (torch.cat([self.hidden[i] for i in idx]).to(device), torch.cat([self.targets[i] for i in idx]).to(device),
                torch.cat(seq).to(device))


def release(model):
    """Free every parameter and buffer of a model that is no longer used (the reference once the cache
    holds what the steps need); the module stays but computes nothing. Returns the bytes freed."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}.values()  # tied weights once
    freed = sum(t.numel() * t.element_size() for t in tensors)
    for t in tensors:
        t.data = torch.empty(0, dtype=t.dtype, device=t.device)
    return freed


def cached_batch_loss(policy_logps, cache, idx, batch, noise_net, objective, noise_rng, autocast, diagnostics=True):
    """Eq. 1–9 on one micro-batch (pairs `idx`): the policy forward only; the reference from the cache.
    diagnostics: add DIAGNOSTICS to the returned dict (off only to time their cost, bench.py)."""
    B = len(idx)
    with autocast:
        logps = policy_logps(batch)  # (2B,)
    policy_chosen, policy_rejected = logps[:B], logps[B:]
    ref = cache.logps[idx].to(logps.device)
    ref_chosen, ref_rejected = ref[:, 0], ref[:, 1]
    sigma2, noisy_ref_rejected_eps1, noisy_ref_rejected_eps2, variance_mean = 0.0, None, None, None
    stats = dict.fromkeys(noises.TOKEN_DIAGNOSTICS, 0.0)  # the ε₁ draw's, filled by noise.py (0 without noise)
    if objective.noise != "none":
        hidden, targets, seq_ids = cache.rejected_tokens(idx, batch)
        weight, bias = cache.head  # z = lm_head(h) with the reference's (the start model's) lm_head
        common = dict(head_bias=bias, chunk_size=objective.chunk_size, rng=noise_rng,
                      stats=stats if diagnostics else None)
        if objective.noise == "trainable":  # Eq. 6 under ε₁ (no graph) and ε₂ (graph to the noise network), one z and σ²
            noisy_ref_rejected_eps1, noisy_ref_rejected_eps2, variance_mean = noises.noisy_answer_logps_pair(
                hidden, targets, seq_ids, B, weight, noise_net, **common)
        else:  # fixed noise: ε₁ only, no noise term
            noisy_ref_rejected_eps1 = noises.noisy_answer_logps(hidden, targets, seq_ids, B, weight, noise_net,
                                                                generator_grad=False, **common)
        sigma2 = variance_mean.item() if variance_mean is not None else objective.noise_sigma ** 2
    out = dnpo_loss(policy_chosen, policy_rejected, ref_chosen,
                    noisy_ref_rejected_eps1 if noisy_ref_rejected_eps1 is not None else ref_rejected,
                    noisy_ref_rejected_eps2, variance_mean, objective.beta, objective.alpha, objective.loss_type,
                    ref_rejected_logps=ref_rejected)  # Eq. 9 (noise none: exactly SPIN)
    if diagnostics:
        out.update(margin_diagnostics(out["margin"], out["noisy_margin"], objective.loss_type), **stats)
    out["sigma2"] = sigma2
    out["tokens"] = int(batch["tokens"]) if "tokens" in batch else int(batch["attention_mask"].sum())
    return out


def batch_loss(policy, reference, noise_net, batch, objective, noise_rng, autocast):
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
                            output_hidden_states=objective.noise != "none")
    ref_logps = sequence_logps(ref_out.logits, labels)  # (2B,)
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = policy_logps[:B], policy_logps[B:], ref_logps[:B], ref_logps[B:]
    sigma2, stats = 0.0, dict.fromkeys(noises.TOKEN_DIAGNOSTICS, 0.0)
    if objective.noise == "none":  # exactly SPIN: the clean reference, no noise term
        out = dnpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, None, None, objective.beta,
                        objective.alpha, objective.loss_type, ref_rejected_logps=ref_rejected)
    else:
        noise_inputs = (ref_out.logits[B:], ref_out.hidden_states[-1][B:], labels[B:])  # (B,T,V), (B,T,d), (B,T)
        noisy_ref_rejected_eps1 = noises.noisy_sequence_logps(*noise_inputs, noise_net, generator_grad=False,  # Eq. 6, ε₁
                                                  chunk_size=objective.chunk_size, rng=noise_rng, stats=stats)
        noisy_ref_rejected_eps2, variance_mean = None, None
        if objective.noise == "trainable":
            noisy_ref_rejected_eps2, variance_mean = noises.noisy_sequence_logps(  # Eq. 6, ε₂, grad to the noise network
                *noise_inputs, noise_net, generator_grad=True, chunk_size=objective.chunk_size, rng=noise_rng,
                return_variance=True)
            sigma2 = variance_mean.item()
        else:
            sigma2 = objective.noise_sigma ** 2
        out = dnpo_loss(policy_chosen, policy_rejected, ref_chosen, noisy_ref_rejected_eps1, noisy_ref_rejected_eps2,
                        variance_mean, objective.beta, objective.alpha, objective.loss_type, ref_rejected_logps=ref_rejected)  # Eq. 9
    out.update(margin_diagnostics(out["margin"], out["noisy_margin"], objective.loss_type), **stats)
    out["sigma2"] = sigma2
    out["tokens"] = int(attention_mask.sum())
    return out
