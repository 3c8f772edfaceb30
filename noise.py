"""The trainable noise generator (Eq. 5) and the noisy reference log-probs of rejected answers (Eq. 6).

`plain_noisy_sequence_logps` is Eq. 5–6 in three lines on whole tensors, for reading and testing;
`noisy_sequence_logps` / `noisy_answer_logps` compute the same chunk by chunk, and
`noisy_answer_logps_pair` both draws of a trainable-noise step (ε₁, ε₂) from one z and σ² per chunk
(what training runs).

Notation as in loss.py: B sequences, T tokens, V vocabulary entries, d hidden size; N = number of answer
tokens in the batch (labels != -100 after the shift), c = chunk_size.

    Eq. 5   σ²_t = softplus(W h_t + b),  W ∈ R^{V×d}, b ∈ R^V, h_t the reference's last hidden state
    Eq. 6   z̃_t = z_t + σ_t ⊙ ε_t,  ε_t ~ N(0, I);   log π̃_ref(y) = Σ_t log_softmax(z̃_t)[y_t]

Departures from, and gaps filled in, the paper:
1. Activation: softplus keeps σ² > 0 with a gradient everywhere (the paper names a fully connected
   layer and no activation). σ = sqrt(max(σ², tiny)) so that the gradient stays finite if σ² underflows.
2. Initialisation (not in the paper): W = 0 and b = softplus⁻¹(init_variance), so training starts with
   the same small noise σ² = DEFAULT_INIT_VARIANCE = 1e-2 (σ = 0.1 logits) on every token and entry,
   independent of h. That noise moves a token's expected log-prob by about −σ²/2·(1 − Σ_v p_v²) ≥ −0.005
   nats: the start is essentially the clean reference and the generator learns how much noise to add.
   W = 0 is no symmetry trap: ∂L/∂W = (∂L/∂(Wh+b)) hᵀ differs per row.
3. Fixed noise (App. H, σ not given there): FixedNoise(σ) adds N(0, σ²) with no parameters;
   DEFAULT_SIGMA = 0.1 = sqrt(DEFAULT_INIT_VARIANCE), i.e. the trainable generator frozen at its start.
4. Default α (not given in the paper): DEFAULT_ALPHA = 1.0. With mean(σ²) over N·V entries the penalty
   pulls each bias entry b_v with α/V·softplus'(b_v); to second order (E[lse(z + σε)] ≈ lse(z) +
   Σ_v σ²_v p_v(1 − p_v)/2) the noise term pushes it up with β·σ(−m̃)·Σ_t p_tv(1 − p_tv)/2 per pair,
   ≈ β·σ(−m̃)·T_ans/(2V) for an entry of average probability 1/V. The two balance at
   α ≈ β·σ(−m̃)·T_ans/2, i.e. α ≈ 1 for β = 0.1, σ(−m̃) ≈ 0.5 and T_ans ≈ 40 answer tokens (the demo
   task's scale): likely entries get noise, the many unlikely ones are held near zero. Scale α with the
   answer length (about 10 for UltraChat-length answers).
5. Detaching: the reference hidden states and logits are constants (detached here); with
   generator_grad=False the generator runs under no_grad, so the model term of Eq. 9 cannot reach φ.
6. Chunking: only answer tokens are computed, c at a time; with generator_grad=True each chunk runs under
   torch.utils.checkpoint, so the (c, V) variance/noise/noisy-logit tensors are recomputed in backward and
   peak extra memory stays O(c·V), not O(N·V), in forward and in backward.
7. ε per chunk: chunk k draws ε from its own generator seeded base_seed + k, base_seed drawn from `rng`
   (or from torch's global RNG when rng is None), on the logits' device. The checkpoint recompute therefore
   sees the same ε; two calls (ε₁, ε₂) draw different base seeds; ε differs between CPU and CUDA.
8. One pass for ε₁ and ε₂ (noisy_answer_logps_pair): the same numbers as the two calls, with z and σ²
   computed once per chunk and, while the chunks' graphs fit in 1 GiB, no checkpoint recompute.
9. Diagnostics (not in the paper, which shows only the KL-noise figures of Sec. 5.5): pass a dict as
   `stats` and it receives, for the draw the model term sees (ε₁), the mean over rejected answer tokens of
   KL(softmax z_t ‖ softmax z̃_t) ("kl_noise"), of σ²_t at the answer's own token y_t ("sigma2_target")
   and of σ²_t over the DIAGNOSTIC_TOPK largest reference logits ("sigma2_topk"); the mean over all V
   entries is mean σ² itself. Computed without a graph from the chunk's z and δ = σ ⊙ ε, in cache-sized
   tiles, once per chunk (a checkpoint recompute skips them): ~45 ms of CPU per demo step, < 1 % of it.
10. Defaults after the noise study (noise_study.py): --noise-lr 1e-3, α = 1 and σ² = 1e-2 at the start stay.
   No setting of the sweep (noise learning rate, α, initial variance, optimizer) gave a gain over SPIN, so
   nothing argues for other values; the numbers, and why AdamW undoes even a live noise (it raises every
   pair's DPO weight alike, loss.py departure 6), are in docs/noise.md.
"""
import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from loss import IGNORE_INDEX, sequence_logps

DEFAULT_INIT_VARIANCE = 1e-2
DEFAULT_SIGMA = math.sqrt(DEFAULT_INIT_VARIANCE)
DEFAULT_ALPHA = 1.0
NOISE_KINDS = ("trainable", "fixed", "none")
DIAGNOSTIC_TOPK = 10
TOKEN_DIAGNOSTICS = ("kl_noise", "sigma2_target", "sigma2_topk")  # departure 9
DIAGNOSTIC_TILE_BYTES = 2 ** 19  # rows of (c, V) per pass of _diagnostic_sums on a CPU (2 for V = 49152)


def inverse_softplus(y):
    """x with softplus(x) = y, for y > 0 (float)."""
    return y + math.log(-math.expm1(-y))  # log(exp(y) − 1), stable for small and large y


class NoiseGenerator(nn.Module):
    """Eq. 5: σ² = softplus(W h + b), one variance per token and vocabulary entry."""

    def __init__(self, hidden_size, vocab_size, init_variance=DEFAULT_INIT_VARIANCE, init_std=0.0):
        super().__init__()
        if not init_variance > 0:
            raise ValueError(f"init_variance must be > 0, got {init_variance}")
        self.proj = nn.Linear(hidden_size, vocab_size)  # W (V, d), b (V,)
        nn.init.normal_(self.proj.weight, std=init_std) if init_std > 0 else nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, inverse_softplus(init_variance))  # Eq. 5 init: softplus(b) = init_variance

    def forward(self, hidden):  # (..., d) -> (..., V)
        return nn.functional.softplus(self.proj(hidden))  # Eq. 5


class FixedNoise(nn.Module):
    """App. H ablation: constant variance σ², no parameters (so no noise term in Eq. 9)."""

    def __init__(self, sigma=DEFAULT_SIGMA, vocab_size=None):
        super().__init__()
        if not sigma >= 0:
            raise ValueError(f"fixed noise sigma must be >= 0, got {sigma}")
        self.sigma, self.vocab_size = float(sigma), vocab_size

    def forward(self, hidden):  # (..., d) -> (..., V), or (..., 1) broadcastable when vocab_size is None
        width = self.vocab_size or 1
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        variance = torch.full((1,) * hidden.dim(), self.sigma ** 2, dtype=dtype, device=hidden.device)
        return variance.expand(*hidden.shape[:-1], width)  # App. H: constant σ², a view (no (..., V) memory)


def make_noise(kind, hidden_size, vocab_size, alpha=DEFAULT_ALPHA, sigma=DEFAULT_SIGMA,
               init_variance=DEFAULT_INIT_VARIANCE):
    """`--noise` flag -> NoiseGenerator (trainable), FixedNoise (fixed) or None (none).

    alpha is validated and attached as `.alpha` to a trainable generator (noise.py never uses it).
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; expected one of {NOISE_KINDS}")
    if not alpha >= 0:
        raise ValueError(f"noise alpha must be >= 0, got {alpha}")
    if kind == "none":
        return None
    if kind == "fixed":
        return FixedNoise(sigma, vocab_size)
    generator = NoiseGenerator(hidden_size, vocab_size, init_variance=init_variance)
    generator.alpha = float(alpha)
    return generator


def plain_noisy_sequence_logps(ref_logits, ref_hidden, labels, generator, eps):
    """Eq. 5–6 as written, on whole (B, T, V) tensors: the reference the chunked paths are tested against.

    ref_logits (B, T, V), ref_hidden (B, T, d), labels (B, T) with -100; eps (B, T, V) ~ N(0, I).
    Returns (log π̃_ref(y) per sequence (B,), mean σ² over answer tokens × V). Memory O(B·T·V): training
    uses noisy_sequence_logps / noisy_answer_logps, which compute the same numbers chunk by chunk.
    """
    variance = generator(ref_hidden)                                   # Eq. 5: σ² = softplus(W h + b), (B, T, V)
    noisy_logits = ref_logits + variance.sqrt() * eps                 # Eq. 6: z̃ = z + σ ⊙ ε
    answer = labels[:, 1:] != IGNORE_INDEX                            # (B, T-1): positions t predicting y_t+1
    variance_mean = variance[:, :-1][answer].mean() if answer.any() else variance.new_zeros(())  # Eq. 9: mean(σ²)
    return sequence_logps(noisy_logits, labels), variance_mean       # Eq. 6: Σ_t log_softmax(z̃_t)[y_t]


def draw_base_seed(rng=None):
    """One draw from rng (or torch's global RNG): the base of the per-chunk ε seeds of one call."""
    device = rng.device if rng is not None else "cpu"  # a CUDA rng draws on CUDA
    return int(torch.randint(0, 2 ** 62, (1,), generator=rng, device=device).item())


def chunk_noise(base_seed, chunk_index, rows, vocab_size, dtype=torch.float32, device="cpu"):
    """ε for chunk `chunk_index`: (rows, V) standard normal from its own seeded generator."""
    gen = torch.Generator(device=device).manual_seed(base_seed + chunk_index)
    return torch.randn(rows, vocab_size, generator=gen, dtype=dtype, device=device)


def _chunk_sigma(generator, h, z):
    """(σ, σ²), each (c, V) in z's dtype, of one chunk of answer tokens with hidden states h (c, d)."""
    params = next(generator.parameters(), None)
    variance = generator(h.to(params.dtype) if params is not None else h).to(z.dtype)  # Eq. 5, (c, V)
    variance = variance.expand_as(z)
    return variance.clamp_min(torch.finfo(z.dtype).tiny).sqrt(), variance


def _noisy_token_logps(z, sigma, seed, chunk_index, targets, variance=None, sink=None):
    """log_softmax(z + σ ⊙ ε)[y] on one (c, V) chunk, ε = chunk_noise(seed, chunk_index). With a dict `sink`
    (and the chunk's variance (c, V)) also stores the chunk's _diagnostic_sums as sink[chunk_index], once:
    a checkpoint recompute finds them there and skips them."""
    eps = chunk_noise(seed, chunk_index, z.shape[0], z.shape[1], z.dtype, z.device)
    delta = sigma * eps if torch.is_grad_enabled() else eps.mul_(sigma)  # σ ⊙ ε, in ε's buffer without a graph
    noisy = z + delta  # Eq. 6: z̃ = z + σ ⊙ ε
    noisy_lse = torch.logsumexp(noisy, dim=-1)
    logps = noisy.gather(1, targets.unsqueeze(1)).squeeze(1) - noisy_lse  # Eq. 6: log_softmax(z̃)[y]
    if sink is not None and chunk_index not in sink:
        sink[chunk_index] = _diagnostic_sums(z, delta, noisy_lse, variance, targets)
    return logps


@torch.no_grad()
def _diagnostic_sums(z, delta, noisy_lse, variance, targets):
    """(4,) sums over one chunk's c tokens, no graph (departure 9): [c, Σ_t KL(softmax z_t ‖ softmax z̃_t),
    Σ_t σ²_t[y_t], Σ_t mean of σ²_t over the DIAGNOSTIC_TOPK largest z_t]; z, δ (c, V), noisy_lse (c,).

    KL(p ‖ p̃) = log Σ_v p_v e^{δ_v} − Σ_v p_v δ_v, δ = z̃ − z = σ ⊙ ε the draw's own (not a difference of
    logits): two sums of size O(σ) whose difference is O(σ²); in float32 at V = 49152 (lse ≈ 15) its error is
    ~5e-9 per token, against ~5e-7 (≈ ulp(lse)) for lse(z̃) − lse(z) − Σ p δ, the form used only where e^δ
    overflows (δ > 88).
    The passes run DIAGNOSTIC_TILE_BYTES of rows at a time in two small buffers, so that they stay in the CPU's
    cache (one tile on a GPU); z and δ are only read."""
    c, v = z.shape
    top = z.topk(min(DIAGNOSTIC_TOPK, v), dim=-1, sorted=False)  # (c, k)
    m = top.values.amax(-1, keepdim=True)  # max_v z_v
    rows = c if z.device.type != "cpu" else max(1, DIAGNOSTIC_TILE_BYTES // (v * z.element_size()))
    sums = z.new_empty(3, c)  # Σ e, Σ e δ, Σ e (e^δ − 1) per token, e = e^{z − max z} ∝ p
    e_buf, d_buf = z.new_empty(min(rows, c), v), z.new_empty(min(rows, c), v)
    for i in range(0, c, rows):
        sl, r = slice(i, i + rows), min(rows, c - i)
        e = torch.sub(z[sl], m[sl], out=e_buf[:r]).exp_()
        sums[0, sl] = e.sum(-1)
        sums[1, sl] = torch.mul(e, delta[sl], out=d_buf[:r]).sum(-1)
        sums[2, sl] = e.mul_(torch.exp(delta[sl], out=d_buf[:r]).sub_(1.0)).sum(-1)
    s, mean_delta, mean_expm1 = sums[0], sums[1] / sums[0], sums[2] / sums[0]  # Σ p δ, Σ p (e^δ − 1)
    kl = torch.where(mean_expm1.isfinite(), torch.log1p(mean_expm1) - mean_delta,  # log Σ p e^δ − Σ p δ ≥ 0 (Jensen)
                     noisy_lse - m.squeeze(1) - s.log() - mean_delta)             # lse(z̃) − lse(z) − Σ p δ
    variance = variance.detach()
    return torch.stack([kl.new_tensor(float(c)), kl.sum(), variance.gather(1, targets.unsqueeze(1)).sum(),
                        variance.gather(1, top.indices).mean(1).sum()])


def _stats_of(sink, dtype, device):
    """TOKEN_DIAGNOSTICS means from the (4,) _diagnostic_sums of every chunk in sink."""
    sums = sum(sink.values(), torch.zeros(4, dtype=dtype, device=device))
    n = max(float(sums[0]), 1.0)
    return {key: float(value) / n for key, value in zip(TOKEN_DIAGNOSTICS, sums[1:].tolist())}


def _chunk_logps(generator, gather, sl, targets, base_seed, chunk_index, dtype, sink=None):
    """Eq. 5–6 on one chunk of c answer tokens -> (token logps (c,), Σ σ² over the (c, V) block); its
    _diagnostic_sums into sink. gather(sl) -> (reference logits (c, V), hidden (c, d)) of the chunk: gathered
    (or recomputed from h by lm_head) here, so that checkpoint keeps no (c, V) copy."""
    z, h = gather(sl)
    z = z.to(dtype)  # (c, V) reference logits
    sigma, variance = _chunk_sigma(generator, h, z)
    return _noisy_token_logps(z, sigma, base_seed, chunk_index, targets[sl], variance, sink), variance.sum()


def _noisy_sums(gather, targets, seq_ids, num_seqs, vocab_size, generator, generator_grad, chunk_size, rng,
                return_variance, dtype, device, stats=None):
    """The chunk loop shared by both entry points: N answer tokens in chunks -> (num_seqs,) sums."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n = targets.numel()
    base_seed = draw_base_seed(rng)
    token_logps, variance_sums, sink = [], [], {} if stats is not None else None
    for k, start in enumerate(range(0, n, chunk_size)):
        args = (generator, gather, slice(start, start + chunk_size), targets, base_seed, k, dtype, sink)
        if generator_grad:  # recompute the (c, V) block in backward instead of keeping it (see module docstring)
            tl, vs = checkpoint(_chunk_logps, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            with torch.no_grad():
                tl, vs = _chunk_logps(*args)
        token_logps.append(tl)
        variance_sums.append(vs)
    if stats is not None:
        stats.update(_stats_of(sink, dtype, device))

    out = torch.zeros(num_seqs, dtype=dtype, device=device)
    if token_logps:
        out = out.index_add(0, seq_ids, torch.cat(token_logps))  # Eq. 6: Σ_t over answer tokens, (B,)
    if not return_variance:
        return out
    if not variance_sums:
        return out, torch.zeros((), dtype=dtype, device=device)
    return out, torch.stack(variance_sums).sum() / (n * vocab_size)  # Eq. 9: mean(σ²)


def _head_gather(hidden, head_weight, head_bias):
    """(gather, compute dtype) for chunks of answer tokens: gather(sl) -> (z = lm_head(h) (c, V), h (c, d)),
    the reference's states and lm_head detached."""
    hidden, head_weight = hidden.detach(), head_weight.detach()
    head_bias = head_bias.detach() if head_bias is not None else None
    gather = lambda sl: (torch.nn.functional.linear(hidden[sl].to(head_weight.dtype), head_weight, head_bias),  # noqa: E731
                         hidden[sl])
    return gather, torch.promote_types(hidden.dtype, torch.float32)


def _chunk_pair_logps(generator, gather, sl, targets, seed_eps1, seed_eps2, chunk_index, dtype, sink=None):
    """Both draws of Eq. 6 on one chunk from one z and one σ² (Eq. 5): the ε₁ log-probs without a graph
    (the model term sees sg φ), the ε₂ log-probs with the graph to the generator, Σ σ² with it; the ε₁
    draw's _diagnostic_sums into sink."""
    z, h = gather(sl)
    z = z.to(dtype)  # (c, V)
    sigma, variance = _chunk_sigma(generator, h, z)  # with grad to φ
    with torch.no_grad():
        eps1 = _noisy_token_logps(z, sigma, seed_eps1, chunk_index, targets[sl], variance, sink)
    eps2 = _noisy_token_logps(z, sigma, seed_eps2, chunk_index, targets[sl])
    return eps1, eps2, variance.sum()


def noisy_answer_logps_pair(hidden, targets, seq_ids, num_seqs, head_weight, generator, head_bias=None,
                            chunk_size=256, rng=None, graph_budget_bytes=2 ** 30, stats=None):
    """(log π̃_ref(y) under ε₁ without a graph, the same under ε₂ with the graph to the generator, mean σ²
    with it): the two noisy_answer_logps calls of a trainable-noise step (generator_grad False, then True)
    in one pass, so z = lm_head(h) and σ² are computed once per chunk; ε₁ and ε₂ are the ones the two calls
    would draw (two base seeds from rng, in that order). The chunks' (c, V) graphs are kept for backward
    while N·V·24 bytes fit in graph_budget_bytes (demo: ~0.2 GB), else each chunk is checkpointed and
    recomputed in backward, as noisy_answer_logps does. stats: a dict to receive the ε₁ draw's
    TOKEN_DIAGNOSTICS (departure 9)."""
    gather, dtype = _head_gather(hidden, head_weight, head_bias)
    n, V = targets.numel(), head_weight.shape[0]
    seed_eps1, seed_eps2 = draw_base_seed(rng), draw_base_seed(rng)
    keep = n * V * 24 <= graph_budget_bytes
    parts, sink = [], {} if stats is not None else None
    for k, start in enumerate(range(0, n, chunk_size)):
        args = (generator, gather, slice(start, start + chunk_size), targets, seed_eps1, seed_eps2, k, dtype, sink)
        parts.append(_chunk_pair_logps(*args) if keep else
                     checkpoint(_chunk_pair_logps, *args, use_reentrant=False, preserve_rng_state=False))
    if stats is not None:
        stats.update(_stats_of(sink, dtype, hidden.device))
    eps1, eps2 = (torch.zeros(num_seqs, dtype=dtype, device=hidden.device) for _ in range(2))
    if not parts:
        return eps1, eps2, torch.zeros((), dtype=dtype, device=hidden.device)
    eps1 = eps1.index_add(0, seq_ids, torch.cat([p[0] for p in parts]))  # Eq. 6: Σ_t over answer tokens
    eps2 = eps2.index_add(0, seq_ids, torch.cat([p[1] for p in parts]))
    return eps1, eps2, torch.stack([p[2] for p in parts]).sum() / (n * V)  # Eq. 9: mean(σ²)


def noisy_sequence_logps(ref_logits, ref_hidden, labels, generator, generator_grad, chunk_size=256,
                         rng=None, return_variance=False, stats=None):
    """Eq. 6 summed over answer tokens: log π̃_ref(y) for each of B sequences.

    ref_logits (B, T, V), ref_hidden (B, T, d) of the reference (detached here), labels (B, T) with -100.
    generator: NoiseGenerator or FixedNoise; generator_grad: keep the graph to its parameters.
    rng: torch.Generator for ε (one draw per call); same state -> same numbers.
    Returns (B,) float32 (float64 for float64 logits), and with return_variance also the scalar mean σ²
    over answer tokens × V (with grad iff generator_grad; 0 when the batch has no answer tokens).
    stats: a dict to receive this draw's TOKEN_DIAGNOSTICS (departure 9).
    """
    if ref_logits.shape[:-1] != labels.shape or ref_hidden.shape[:-1] != labels.shape:
        raise ValueError(f"ref_logits {tuple(ref_logits.shape)}, ref_hidden {tuple(ref_hidden.shape)} and "
                         f"labels {tuple(labels.shape)} disagree on (B, T)")
    dtype = torch.promote_types(ref_logits.dtype, torch.float32)  # compute in ≥ fp32
    logits = ref_logits[:, :-1].detach()  # (B, T-1, V): position t predicts token t+1
    hidden = ref_hidden[:, :-1].detach()  # (B, T-1, d)
    labels = labels[:, 1:]  # (B, T-1)
    rows, cols = (labels != IGNORE_INDEX).nonzero(as_tuple=True)  # (N,), (N,) answer positions, row-major
    gather = lambda sl: (logits[rows[sl], cols[sl]], hidden[rows[sl], cols[sl]])  # noqa: E731
    return _noisy_sums(gather, labels[rows, cols], rows, labels.shape[0], logits.shape[-1], generator,
                       generator_grad, chunk_size, rng, return_variance, dtype, logits.device, stats)


def noisy_answer_logps(hidden, targets, seq_ids, num_seqs, head_weight, generator, generator_grad,
                       head_bias=None, chunk_size=256, rng=None, return_variance=False, stats=None):
    """noisy_sequence_logps from the reference's last hidden states of the answer tokens only: the
    reference logits of each chunk are recomputed as z = lm_head(h) (Eq. 5–6 need nothing else), so
    the reference's (B, T, V) logits never exist. hidden (N, d): the state at the position predicting
    each answer token, targets (N,) those tokens, seq_ids (N,) in [0, num_seqs) the sequence of each;
    head_weight (V, d) [head_bias (V,)] the reference's lm_head (detached here). Same chunks and the
    same ε as noisy_sequence_logps for the same tokens in the same (row-major) order."""
    gather, dtype = _head_gather(hidden, head_weight, head_bias)
    return _noisy_sums(gather, targets, seq_ids, num_seqs, head_weight.shape[0], generator, generator_grad,
                       chunk_size, rng, return_variance, dtype, hidden.device, stats)
