"""The memory plan: bytes per rank of one training run, printed before any work, and a refusal when
it cannot fit the device.

    component            DDP / one process          FSDP (W ranks)
    policy parameters    4·P (fp32 master)          4·P / W
    gradients            4·P                        4·P / W
    optimizer state      s·4·P (RMSprop s=1, AdamW s=2)   s·4·P / W
    DDP buckets          4·P (W > 1; DDP's default gradient_as_bucket_view=False keeps a second copy)
    FSDP working set     —                          (root + 2 layers)·(c + 4): all-gathered params in the
                                                    compute dtype and their unsharded fp32 gradients
    reference            c·P, replicated (generation uses it whole; see distributed.py)
    noise generator      (V·d + V)·4·(2 + s): weights, gradients, optimizer state (--noise trainable)
    reference cache      step.ReferenceCache's rejected-answer hidden states (noise on): at most
                         --ref-cache-gb, and at most history × max_prompts × max_length × d × c
    activations          below, for N = 2·B·T tokens of one micro-batch

P parameters, c bytes of the compute dtype, d hidden size, k the key/value width (kv heads × head
dim), I the MLP width, L layers, V vocabulary, T = --max-length, B = --batch-size. Activations: a
decoder layer keeps per token 8·d (the fp32 inputs of its two RMSNorms) + c·(5·d + 3·k + 4·I) (normed
input, q, k, v, rotated q and k, attention output; normed input, gate, up, silu(gate), their product);
with --gradient-checkpointing only each layer's input (N·d·r, r the residual-stream bytes: 4 with fp32
master weights under autocast, c under FSDP's bf16 parameters) plus one layer being recomputed;
lm_head: the last hidden states plus one 256-token chunk of fp32 logits (step.PolicyLogps), or the
whole (N, V) logits with --no-precompute-ref; the noise adds one chunk's six (chunk, V) fp32 tensors
and the reference's per-step pass over the B rejected rows. The load-and-generation peak (before FSDP
shards the policy: the fp32 policy, the reference and the KV cache of one generation batch) is checked
too.

Where this departs from, or fills a gap in, the paper:
1. Nothing in the math; the paper gives no memory figures. The activation count is an estimate (it
   ignores allocator fragmentation, CUDA context and NCCL buffers): a run fits when its plan is at
   most HEADROOM (90 %) of the device's memory. FSDP's padding of each tensor to a multiple of W is
   ignored (< W elements per tensor).
"""
import dataclasses

import torch

import errors
import model as models

GIB = 2 ** 30
HEADROOM = 0.9  # the fraction of device memory a plan may use
FSDP_AUTO_PARAMS = 10 ** 9  # --dist auto: FSDP under torchrun from this many policy parameters on


@dataclasses.dataclass
class Shape:
    """What the plan needs of a model: exact parameter counts and the widths of its tensors."""
    params: int  # P (tied embeddings counted once)
    layer_params: int  # one decoder layer
    layers: int  # L
    hidden: int  # d
    kv: int  # k = kv heads × head dim
    intermediate: int  # I
    vocab: int  # V

    @property
    def root_params(self):  # what FSDP's root group holds: embeddings, final norm, lm_head
        return self.params - self.layers * self.layer_params


def model_shape(config, trust_remote_code=False):
    """Shape of the CausalLM of an HF config, counted exactly on the meta device (no memory, ~1 s for 7B)."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    layers = model.get_decoder().layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Shape(params=sum(p.numel() for p in model.parameters()),
                 layer_params=sum(p.numel() for p in layers[0].parameters()), layers=len(layers),
                 hidden=config.hidden_size, kv=(getattr(config, "num_key_value_heads", None) or heads) * head_dim,
                 intermediate=config.intermediate_size, vocab=config.vocab_size)


def resolve_dist(requested, world, params):
    """'none' (one process), 'ddp' or 'fsdp'; auto = FSDP under torchrun for models of ≥ 1 B parameters."""
    if world == 1:
        return "none"
    if requested == "auto":
        return "fsdp" if params >= FSDP_AUTO_PARAMS else "ddp"
    return requested


def layer_token_bytes(shape, c):
    """Bytes one decoder layer keeps per token for its backward (see the module docstring)."""
    d, k, i = shape.hidden, shape.kv, shape.intermediate
    return 8 * d + c * (5 * d + 3 * k + 4 * i)


def plan(shape, *, world, dist, optimizer="rmsprop", noise="trainable", compute_bytes=2, batch_size=4, length=1024,
         gradient_checkpointing=True, precompute_ref=True, ref_cache_bytes=4 * GIB, chunk_size=256,
         gen_batch_size=32, gen_length=1024):
    """Bytes per rank of each component (an ordered dict), its total and the load-and-generation peak."""
    P, c, d, V, L = shape.params, compute_bytes, shape.hidden, shape.vocab, shape.layers
    states = {"rmsprop": 1, "adamw": 2, "sgd": 0}[optimizer]  # fp32 states per parameter (SGD without momentum: none)
    shard = world if dist == "fsdp" else 1
    mixed = dist == "fsdp" and c < 4  # FSDP's MixedPrecisionPolicy: params all-gathered in the compute dtype
    residual = c if mixed else 4
    N = 2 * batch_size * length
    noisy = noise != "none"
    p = {"policy parameters (fp32)": 4 * P // shard,
         "gradients (fp32)": 4 * P // shard,
         f"optimizer state ({states} × fp32)": states * 4 * P // shard,
         "DDP gradient buckets": 4 * P if dist == "ddp" else 0,
         "FSDP working set": (shape.root_params + 2 * shape.layer_params) * ((c if mixed else 4) + 4)
         if dist == "fsdp" else 0,
         "reference (replicated)": c * P,
         "noise generator (+grads, state)": (V * d + V) * 4 * (2 + states) if noise == "trainable" else 0,
         "reference cache": int(ref_cache_bytes) if noisy and precompute_ref else 0}
    per_token = layer_token_bytes(shape, c)
    layers = L * N * d * residual + N * per_token if gradient_checkpointing else L * N * per_token
    head = N * d * residual + 3 * chunk_size * V * 4 if precompute_ref else N * V * (c + 8)
    ref_step = 0
    if noisy:  # one chunk of the noise; the reference over the B rejected rows (cache over its budget)
        ref_step = 6 * chunk_size * V * 4 + ((N // 2) * (c * d + per_token) if precompute_ref else 0)
    if not precompute_ref:  # the reference inside every step: all its hidden states and its logits
        ref_step += N * (L + 1) * d * c + N * V * c
    p["activations"] = layers + head + ref_step
    load = 4 * P + c * P + gen_batch_size * gen_length * L * 2 * shape.kv * c  # before sharding: + KV cache
    return p, sum(p.values()), load


def fits(total, load, device_bytes):
    return max(total, load) <= HEADROOM * device_bytes


def suggest(shape, device_bytes, **kw):
    """The flags (a string) that make a plan fit, trying in turn --dist fsdp, --gradient-checkpointing,
    more GPUs (a single process), halving --batch-size (with --grad-accum keeping the batch); None if none."""
    flags, kw, batch = [], dict(kw), kw["batch_size"]
    if kw["world"] > 1 and kw["dist"] != "fsdp":
        kw["dist"], flags = "fsdp", flags + ["--dist fsdp"]
    if not kw["gradient_checkpointing"]:
        kw["gradient_checkpointing"], flags = True, flags + ["--gradient-checkpointing"]
    candidates = [(kw, flags)]
    if kw["world"] == 1:
        candidates += [({**kw, "world": w, "dist": "fsdp"}, [f"torchrun --nproc_per_node {w} train.py --dist fsdp"] + flags)
                       for w in (2, 4, 8)]
    for base, base_flags in list(candidates):
        b = batch
        while b > 1:
            b //= 2
            candidates.append(({**base, "batch_size": b}, base_flags + [f"--batch-size {b} --grad-accum {batch // b}"]))
    for cand, cand_flags in candidates:
        if fits(*plan(shape, **cand)[1:], device_bytes):
            return " ".join(cand_flags)
    return None


def _size(n):
    return f"{n / GIB:8.2f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:8.2f} MiB"


def format_plan(components, total, load, shape, kw, device_bytes=None):
    """The plan as a few printable lines."""
    params = f"{shape.params / 1e9:.2f} B" if shape.params >= 1e8 else f"{shape.params / 1e6:.2f} M"
    head = (f"memory plan per rank: {kw['dist']} over {kw['world']} rank(s), {params} parameters, {kw['optimizer']}, "
            f"{kw['compute_bytes']}-byte compute dtype, batch {kw['batch_size']} × {kw['length']} tokens, "
            f"gradient checkpointing {'on' if kw['gradient_checkpointing'] else 'off'}")
    lines = [head] + [f"  {name:<34} {_size(value)}" for name, value in components.items() if value]
    budget = f" of {device_bytes / GIB:.1f} GiB ({HEADROOM:.0%} usable)" if device_bytes else ""
    lines.append(f"  {'total (training)':<34} {_size(total)}{budget}")
    lines.append(f"  {'load and generation peak':<34} {_size(load)}")
    return "\n".join(lines)


def preflight(args, world, device, say=print):
    """Resolve --dist, print the plan (rank 0) and refuse, in one line, a run that cannot fit the GPU."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(models.resolve_model(args.start_model), trust_remote_code=args.trust_remote_code)
    shape = model_shape(config, args.trust_remote_code)
    dist = resolve_dist(args.dist, world, shape.params)
    if world == 1 and args.dist in ("ddp", "fsdp"):
        say(f"train.py: --dist {args.dist} ignored: a single process (run under torchrun to shard)")
    kw = dict(world=world, dist=dist, optimizer=args.optimizer, noise=args.noise,
              compute_bytes=models.pick_dtype(device, args.dtype).itemsize, batch_size=args.batch_size,
              length=args.max_length, gradient_checkpointing=bool(args.gradient_checkpointing),
              precompute_ref=args.precompute_ref, ref_cache_bytes=cache_bound(args, shape, device),
              chunk_size=args.noise_chunk_size, gen_batch_size=args.gen_batch_size,
              gen_length=args.max_prompt_length + args.max_new_tokens)
    device_bytes = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    say(format_plan(*plan(shape, **kw), shape, kw, device_bytes))
    if device_bytes and args.memory_check:
        check(shape, kw, device_bytes, str(device))
    return dist


def cache_bound(args, shape, device):
    """step.ReferenceCache keeps the hidden states of every rejected answer only if all fit in --ref-cache-gb:
    at most that, and at most history × max_prompts pairs of max_length tokens."""
    c = models.pick_dtype(device, args.dtype).itemsize
    budget = int(args.ref_cache_gb * GIB)
    return min(budget, args.history * args.max_prompts * args.max_length * shape.hidden * c) if args.max_prompts else budget


def check(shape, kw, device_bytes, where="the GPU"):
    """An errors.Refusal (one line) naming the flags that would make the plan fit, when it does not."""
    _, total, load = plan(shape, **kw)
    if fits(total, load, device_bytes):
        return
    hint = suggest(shape, device_bytes, **kw)
    hint = f"try {hint}" if hint else "no batch size or GPU count tried fits: use a smaller model"
    raise errors.Refusal(f"the memory plan needs {max(total, load) / GIB:.1f} GiB per rank but {where} has "
                         f"{device_bytes / GIB:.1f} GiB ({HEADROOM:.0%} usable); {hint} (or --no-memory-check)")
