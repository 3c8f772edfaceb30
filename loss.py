"""The SPIN/DPO margin and the DNPO joint loss, as pure functions of tensors and floats.

Notation (used in every shape comment of loss.py and noise.py): B sequences (or pairs), T tokens per
sequence, V vocabulary entries, d hidden size. A "sequence log-prob" is log π(y | x) summed over the
answer tokens only (labels != -100); logits at position t score the token at t+1 (HF convention).

    margin (Eq. 1–3)   m = β[(log π_θ(y⁺) − log π_ref(y⁺)) − (log π_θ(y⁻) − log π_ref(y⁻))],  ℓ(m) = −log σ(m)
    noisy margin       m̃(θ, φ, ε) = m with log π_ref(y⁻) replaced by log π̃_ref(y⁻; φ, ε)   (Eq. 6, noise.py)
    joint loss (Eq. 9) L = ℓ(m̃(θ, sg φ, ε₁)) − ℓ(m̃(sg θ, φ, ε₂)) + α·mean(σ²)

Departures from, and gaps filled in, the paper:
1. Eq. 9 is reconstructed (the paper's equations survive only as numbers): the min-max is solved in one
   step by one scalar whose first term trains only the policy and whose second only the noise
   generator; `sg` is implemented by `.detach()` inside `dnpo_loss`, so a caller cannot route a gradient
   the wrong way by forgetting a detach (the ε₁ log-probs, the reference log-probs and, in the noise
   term, the policy log-probs are detached here).
2. The hinge variant is the SPIN repository's `relu(1 − m)`; the paper uses only the sigmoid loss.
3. Rewards, margins and reward accuracy are logging quantities and are detached. `margin` is the clean
   margin when `ref_rejected_logps` is passed, else the ε₁ noisy margin (identical for `--noise none`).
4. Without a noise term (`--noise none|fixed`) `noise_loss` and `variance_penalty` are zero tensors and
   `loss` is the model term itself (nothing added), so `--noise none` reproduces SPIN bit for bit.
5. `sequence_logps` upcasts to at least float32 before the logsumexp; for bf16 logits this upcast is one
   (B, T, V) float32 copy that autograd keeps; no log-softmax tensor is kept for the backward pass.
   `chunked_answer_logps` (what train.py uses, through step.PolicyLogps; `chunked_sequence_logps` is its
   padded-batch form, used by the tests) goes further: it takes the last hidden states and applies lm_head
   to answer tokens only, chunk by chunk, recomputing each chunk in backward.
6. Diagnostics (not in the paper): `margin_diagnostics` compares the clean and the noisy margin of each
   pair. Since m̃ − m does not depend on θ, ∇_θ ℓ(m̃) = −w(m̃)·∇_θ m with the DPO weight w = σ(−m), so the
   noise changes the policy's update only through the per-pair weights; an optimizer that normalises
   the gradient's scale (Adam, RMSprop) removes a common factor, and what is left is how the weights'
   *shares* move: weight_shift = ½ Σ_i |w̃_i/Σw̃ − w_i/Σw| (0: same direction, 1: disjoint pairs).
7. Precision (the paper trains in bf16 and says no more): under bf16 (`--dtype bf16`, CUDA autocast, FSDP's
   mixed precision) the transformer body computes in bf16 but `chunked_answer_logps` runs lm_head and the
   log-softmax in float32 from the body's states (`fp32_head`, `--fp32-head`, on by default): bf16 logits
   of magnitude ~20 come in steps of 0.125, ~0.03–0.06 nats per token summed over the answer, inside a
   margin scaled by β. Under FSDP's bf16 mixed precision the head's weight arrives in bf16 (the policy's
   param dtype) and is upcast; the matmul and log-softmax are float32. `--no-fp32-head` is the all-bf16
   path (TRL's DPOTrainer under bf16), kept to measure the difference (`python -m bench --only cpu_bf16`).
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
LOSS_TYPES = ("sigmoid", "hinge")
MARGIN_DIAGNOSTICS = ("margin_offset", "margin_offset_std", "dpo_weight", "dpo_weight_noisy", "dpo_weight_ratio",
                      "weight_shift")


def sequence_logps(logits, labels):
    """Summed answer-token log-probs.

    logits (B, T, V) any float dtype; labels (B, T) long, -100 on prompt and padding.
    Returns (B,) in float32 (float64 for float64 logits). A row without answer tokens gets 0.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (B, T)")
    logits = logits[:, :-1]  # (B, T-1, V): position t predicts token t+1
    labels = labels[:, 1:]  # (B, T-1)
    mask = labels != IGNORE_INDEX  # (B, T-1)
    safe_labels = labels.masked_fill(~mask, 0)  # any valid index; masked out below
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # compute in ≥ fp32
    target_logits = logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    token_logps = target_logits - torch.logsumexp(logits, dim=-1)  # Eq. 1–3: log π(y_t) = z_y − lse(z)
    return (token_logps * mask).sum(-1)  # (B,)


def answer_states(hidden, labels):
    """(states (N, d), targets (N,), row of each (N,)) of the answer tokens of (B, T) rows, row-major: the
    state at position t is the one that predicts token t+1."""
    labels = labels[:, 1:]
    rows, cols = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
    return hidden[:, :-1][rows, cols], labels[rows, cols], rows


def _chunk_token_logps(hidden, weight, bias, targets):
    z = F.linear(hidden, weight, bias)  # (c, V) logits of one chunk of answer tokens
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    return z.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(z, dim=-1)  # Eq. 1–3, (c,)


def chunked_sequence_logps(hidden, weight, labels, bias=None, chunk_size=256):
    """sequence_logps(F.linear(hidden, weight, bias), labels) without the (B, T, V) logits.

    hidden (B, T, d) last hidden states (the input of lm_head), weight (V, d) [bias (V,)] the lm_head,
    labels (B, T). Only answer positions go through lm_head (chunked_answer_logps). Returns (B,) in
    ≥ float32, with gradients to hidden, weight and bias.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on (B, T)")
    h, targets, rows = answer_states(hidden, labels)
    return chunked_answer_logps(h, targets, rows, hidden.shape[0], weight, bias, chunk_size)


def chunked_answer_logps(states, targets, seq_ids, num_seqs, weight, bias=None, chunk_size=256, fp32_head=True):
    """Summed log-probs of answer tokens from the states that predict them: states (N, d), targets (N,),
    seq_ids (N,) in [0, num_seqs). lm_head runs chunk_size tokens at a time, each chunk under
    torch.utils.checkpoint, so at most one (chunk, V) block exists in forward and in backward (it is
    recomputed). fp32_head: lm_head's matmul and the log-softmax in float32 whatever the autocast and the
    states' dtype (a bf16 body's states are upcast; gradients flow back in their dtype): bf16 logits of
    magnitude ~20 are rounded to steps of 0.125 (departure 7). Returns (num_seqs,) in ≥ float32."""
    dtype = torch.promote_types(torch.promote_types(states.dtype, weight.dtype), torch.float32)  # ≥ float32
    if fp32_head and (states.dtype != dtype or weight.dtype != dtype or torch.is_autocast_enabled(states.device.type)):
        with torch.autocast(states.device.type, enabled=False):
            return chunked_answer_logps(states.to(dtype), targets, seq_ids, num_seqs, weight.to(dtype),
                                        bias.to(dtype) if bias is not None else None, chunk_size, fp32_head=False)
    grad = torch.is_grad_enabled() and (states.requires_grad or weight.requires_grad)
    parts = [checkpoint(_chunk_token_logps, states[i:i + chunk_size], weight, bias, targets[i:i + chunk_size],
                        use_reentrant=False) if grad else
             _chunk_token_logps(states[i:i + chunk_size], weight, bias, targets[i:i + chunk_size])
             for i in range(0, targets.numel(), chunk_size)]
    dtype = torch.promote_types(states.dtype, torch.float32)
    out = torch.zeros(num_seqs, dtype=dtype, device=states.device)
    return out.index_add(0, seq_ids, torch.cat(parts).to(dtype)) if parts else out  # (num_seqs,)


def spin_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
              beta, loss_type="sigmoid"):
    """SPIN/DPO loss (Eq. 1–3). All inputs (B,) sequence log-probs; beta the temperature β.

    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)); rewards are detached.
    loss_type: "sigmoid" −log σ(m) (the paper) or "hinge" relu(1 − m) (SPIN repository).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    pi_logratios = policy_chosen_logps - policy_rejected_logps  # (B,)
    ref_logratios = ref_chosen_logps - ref_rejected_logps  # (B,)
    margins = beta * (pi_logratios - ref_logratios)  # Eq. 1–3: m
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(margins)  # Eq. 1–3: ℓ(m) = −log σ(m)
    else:
        losses = torch.relu(1 - margins)  # SPIN repository's hinge alternative
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def _check_shapes(**tensors):
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1 or any(len(s) != 1 for s in shapes.values()):
        raise ValueError(f"dnpo_loss expects (B,) log-probs of one shape, got {shapes}")


def dnpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
              noisy_ref_rejected_logps_model, noisy_ref_rejected_logps_noise, variance_mean,
              beta, alpha, loss_type="sigmoid", ref_rejected_logps=None):
    """The DNPO joint loss (Eq. 9). Log-probs are (B,); variance_mean is a scalar.

    noisy_ref_rejected_logps_model: log π̃_ref(y⁻) under ε₁ (the clean reference for --noise none);
    noisy_ref_rejected_logps_noise: log π̃_ref(y⁻) under ε₂ with grad to the generator, None = no noise term;
    variance_mean: mean σ² with grad to the generator, None = no α term;
    ref_rejected_logps: the clean reference, only for logging the clean margins.
    Returns dict(loss, model_loss, noise_loss, variance_penalty, margin (B,), noisy_margin (B,),
    chosen_rewards, rejected_rewards, reward_acc); loss = model_loss + noise_loss + variance_penalty. The keys
    are the metrics.jsonl column names (train.py logs each one's batch mean under the same name).
    """
    _check_shapes(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                  ref_chosen_logps=ref_chosen_logps, noisy_ref_rejected_logps_model=noisy_ref_rejected_logps_model,
                  noisy_ref_rejected_logps_noise=noisy_ref_rejected_logps_noise,
                  ref_rejected_logps=ref_rejected_logps)
    if variance_mean is not None and variance_mean.dim() != 0:
        raise ValueError(f"variance_mean must be a scalar tensor, got shape {tuple(variance_mean.shape)}")
    ref_chosen_logps = ref_chosen_logps.detach()  # the reference is frozen

    # Eq. 9, model term: ℓ(m̃(θ, sg φ, ε₁)), gradient to the policy only
    model_losses, chosen_rewards, noisy_rejected_rewards = spin_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
        noisy_ref_rejected_logps_model.detach(), beta, loss_type)
    model_loss = model_losses.mean()
    loss = model_loss
    zero = torch.zeros((), dtype=model_loss.dtype, device=model_loss.device)

    noise_loss = zero
    if noisy_ref_rejected_logps_noise is not None:
        # Eq. 9, noise term: −ℓ(m̃(sg θ, φ, ε₂)), gradient to the noise generator only
        noise_losses, _, _ = spin_loss(
            policy_chosen_logps.detach(), policy_rejected_logps.detach(), ref_chosen_logps,
            noisy_ref_rejected_logps_noise, beta, loss_type)
        noise_loss = -noise_losses.mean()
        loss = loss + noise_loss

    variance_penalty = zero
    if variance_mean is not None:
        variance_penalty = alpha * variance_mean  # Eq. 9, α·mean(σ²)
        loss = loss + variance_penalty

    noisy_margins = chosen_rewards - noisy_rejected_rewards  # β-scaled m̃ under ε₁, detached
    if ref_rejected_logps is not None:
        rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    else:
        rejected_rewards = noisy_rejected_rewards
    margins = chosen_rewards - rejected_rewards
    return dict(
        loss=loss, model_loss=model_loss, noise_loss=noise_loss, variance_penalty=variance_penalty,
        margin=margins, noisy_margin=noisy_margins,
        chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
        reward_acc=(chosen_rewards > rejected_rewards).float().mean(),
    )


def dpo_weights(margins, loss_type="sigmoid"):
    """|∂ℓ/∂m| per pair (B,): σ(−m) for the sigmoid loss, 1[m < 1] for the hinge."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    return torch.sigmoid(-margins) if loss_type == "sigmoid" else (margins < 1).to(margins.dtype)


@torch.no_grad()
def margin_diagnostics(margins, noisy_margins, loss_type="sigmoid"):
    """What the noise does to one batch's margins (departure 6), as floats: the offset m − m̃ (mean, and
    its standard deviation over pairs, 0 for one pair), the mean DPO weights w(m) and w(m̃), the ratio of
    those means (1: the noise leaves the pairs' weights alone) and weight_shift, the total-variation
    distance between the pairs' weight shares (a batch with every weight 0 has uniform shares)."""
    margins, noisy_margins = margins.double(), noisy_margins.double()
    offset = margins - noisy_margins
    w, w_noisy = dpo_weights(margins, loss_type), dpo_weights(noisy_margins, loss_type)

    def shares(x):
        total = x.sum()
        return x / total if total > 0 else torch.full_like(x, 1 / x.numel())
    mean_w, mean_noisy = float(w.mean()), float(w_noisy.mean())
    return dict(margin_offset=float(offset.mean()),
                margin_offset_std=float(offset.std()) if offset.numel() > 1 else 0.0,
                dpo_weight=mean_w, dpo_weight_noisy=mean_noisy,
                dpo_weight_ratio=mean_noisy / mean_w if mean_w > 0 else float(mean_noisy == 0),
                weight_shift=float(0.5 * (shares(w_noisy) - shares(w)).abs().sum()))
