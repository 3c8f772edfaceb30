"""One DNPO iteration, end to end: `python train.py --iter k` = generate → judge → label → train → save.

    start model  = --base-model (k = 0), else --start-model DIR or <run-dir>/iter{k-1}/model;  reference = its copy
    1 generate   iter{k}/generated.jsonl   the start model answers every training prompt
    2 judge      iter{k}/judged.jsonl      scores of the human and the generated answer
    3 label      iter{k}/pairs.jsonl       DSL: higher score = chosen (k = 0 or --no-dsl: human = chosen)
    4 train      iter{k}/metrics.jsonl, logps.jsonl, checkpoint/state.pt   the hand-written loop below
                 (each metrics row also to --report-to tensorboard | wandb: tracking.py, rank 0)
    5 save       iter{k}/model/ (save_pretrained), summary.json; config.json is written first

Every stage skips work already done, and training resumes from its last checkpoint, so rerunning the
same command after a crash or Ctrl-C continues where it stopped. Shapes: B pairs per micro-batch
(2B rows: chosen then rejected), T tokens, V vocabulary, d hidden size. The math lives in loss.py
(Eq. 1–3, 9) and noise.py (Eq. 5–6); this file only wires it. The run directory: rundir.py; the data
order: sampler.py; the resumable state: checkpoint.py.

Read `run_iteration` (the five stages, at the end) and `train` (the loop); every other function is a helper
named by what it does: `setup` builds what the loop works with (`Loop`), `optimizer_step` is one step of
Eq. 1–9 with its update (what the benchmarks time), `resume` / `save_checkpoint` the checkpoint, `diverged`
the stop when a number goes non-finite (nothing non-finite is ever saved).

Where this departs from, or fills a gap in, the paper:
1. Iteration 0 is plain SPIN (no DSL, no noise) whatever --dsl/--noise say, as in the paper (§4.1).
2. The noise generator is freshly initialised at the start of every iteration (seeded by --seed and
   k); the paper does not say whether φ carries over. Its optimizer is the policy's kind with its own
   learning rate --noise-lr (one optimizer, two parameter groups, one LR schedule for both).
3. The generator reads the reference's `hidden_states[-1]`, which in HF Llama/Mistral is the output of
   the final RMSNorm, i.e. exactly the input of lm_head (test_train.py checks lm_head(h) == logits).
4. Defaults the paper does not give: noise α = noise.DEFAULT_ALPHA (1.0, argued in noise.py) and
   generator lr 1e-3 (--noise-lr; RMSprop moves each of W's V·d entries by ~lr per step, so the
   pre-softplus output moves by up to ~lr·Σ|h|: about 1 per step for d = 576, more for d = 4096, where
   a lower --noise-lr may be wanted); generation greedy with max 512 new tokens (paper preset);
   --batch-size is per process (the HF per_device_train_batch_size that Table 3 most likely lists);
   gradient clipping at norm 1.0 (HF); Table 3's "linear" schedule is transformers'
   get_linear_schedule_with_warmup (lr 0 → peak over ceil(0.1·steps), then linear decay to 0);
   logps.jsonl, the start/end log-probs behind Fig. 2/10 (record_logps: the first --logp-examples pairs;
   under --dist fsdp from step.PolicyLogps, the sharded root, computed on every rank, written by rank 0;
   otherwise from the fp32 policy's full logits: the same numbers up to float rounding).
5. Policy weights are kept in fp32 (master copy) with bf16 autocast on CUDA; the reference copy is held
   in the compute dtype and generates; its training-time numbers (step.ReferenceCache) are computed by
   the policy itself before its first update (step.py, departure 2), after which the copy is freed
   unless the hidden-state cache is over budget; the saved model is cast to --dtype. Judging runs even at iteration 0 (its
   scores feed the DSL flip statistics) although iteration 0 trains on human = chosen.
6. Multi-GPU: torchrun → DDP or FSDP2 for the policy (--dist; distributed.py, with sharded DCP
   checkpoints), the generator replicated with its gradients all-reduced by hand, generation sharded
   across ranks, judging and all file writing on rank 0. memplan.py prints the bytes per rank first.
"""
import argparse
import contextlib
import copy
import dataclasses
import math
import pathlib
import time

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

import checkpoint as ckpt
import data
import distributed
import errors
import generate
import judge as judges
import memplan
import model as models
import noise as noises
import packing
import rundir
import runlock
import sampler
import stages
import step as steps
import tracking
from loss import sequence_logps
from config import TRAINING_KEYS, build_parser, check_judge, parse_args


@dataclasses.dataclass
class RunState:
    """How this run was started, kept apart from the parsed flags (config.RUN_STATE, recorded with the
    training flags): the number of processes, the resolved start model, the sha256 of the pairs trained on
    (known after labelling), and the data-parallel mode memplan chose."""
    world_size: int
    start_model: str
    pairs_sha256: str | None = None
    dist: str = "auto"

    def over(self, args):
        """The flags with this state over them: what checkpoints, stage records and summaries record."""
        return argparse.Namespace(**{**vars(args), **dataclasses.asdict(self)})

# ----------------------------------------------------------------------------- helpers
def training_prompts(args):
    """The training prompts of this run (--data, --max-prompts, --seed, --flaw-rate)."""
    return data.load_prompts(args.data, split="train", max_prompts=args.max_prompts or None, seed=args.seed,
                             flaw_rate=args.flaw_rate)


def lone_warmup_step(n_pairs, world, args):
    """The one-line refusal when training on n_pairs would be one optimizer step taken at lr 0, else None.
    The linear warmup gives its first step lr 0 (transformers' schedule: lr · step / warmup_steps); with one
    step in all, the iteration would save the start model unchanged under its own name. Refused rather than
    warned: a warning scrolls past, and the iteration's numbers would then be the start model's."""
    total = sampler.steps_per_epoch(n_pairs, world, args.batch_size, args.grad_accum) * args.epochs
    if total == 1 and math.ceil(args.warmup_ratio * total) >= 1:
        return (f"train.py: iter {args.iter}: {n_pairs} pair(s) make one optimizer step (--batch-size "
                f"{args.batch_size} × {world} process(es) × --grad-accum {args.grad_accum}, --epochs {args.epochs}), "
                f"and the linear warmup (--warmup-ratio {args.warmup_ratio:g}) takes it at lr 0, so the model would "
                f"not change; pass --warmup-ratio 0, a smaller --batch-size, more --epochs or more prompts")
    return None


def generate_stage(it, model, tokenizer):
    """Stage 1: the start model answers every training prompt (generate.py shards them across ranks)."""
    args, out = it.args, it.it_dir / "generated.jsonl"
    if it.main_proc:  # record what the answers are made from before the first one is written
        stages.begin(it.it_dir, "generate", it.flags["generate"], it.inputs["generate"])
    distributed.barrier()
    generate.generate_answers(model, tokenizer, it.records, str(out), max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                              batch_size=args.gen_batch_size, backend=args.gen_backend,
                              max_prompt_length=args.max_prompt_length)
    if it.main_proc:
        stages.finish(it.it_dir, "generate", out.name)


def label_stage(it):
    """Stages 2–3 on rank 0: judge both answers, then DSL pairs; every rank then reads the pairs."""
    args, it_dir = it.args, it.it_dir
    stats = {}
    if it.main_proc:
        judged_path, pairs_path = it_dir / "judged.jsonl", it_dir / "pairs.jsonl"
        generated = stages.sha256_file(it_dir / "generated.jsonl")
        stages.begin(it_dir, "judge", it.flags["judge"], {"generated.jsonl": generated})
        if judged_path.is_file():
            print(f"[2/5] judge: {judged_path} exists, skipped")
            judged = data.read_jsonl(judged_path)
        else:
            judge = judges.judge_from_args(args, cache_path=it.run_dir / "judge_cache.jsonl", device=args.device)
            judged, summary = judges.judge_records(data.read_jsonl(it_dir / "generated.jsonl"), judge, judged_path,
                                                   max_missing=args.judge_max_missing)
            print(judges.format_summary(summary))
        stages.finish(it_dir, "judge", judged_path.name)
        stages.begin(it_dir, "label", it.flags["label"], {"judged.jsonl": stages.sha256_file(judged_path)})
        pairs, stats = data.dsl_pairs(judged, args.dsl)  # Sec. 4.1 DSL (or human = chosen)
        if pairs_path.is_file():
            print(f"[3/5] label: {pairs_path} exists, skipped")
        else:
            data.write_jsonl(pairs_path, pairs)
        stages.finish(it_dir, "label", pairs_path.name)
        stats["flip_rate"] = judges.dsl_flip_rate(judged)
    distributed.barrier()
    pairs = data.history_pairs(it.run_dir, args.iter, args.history, seed=args.seed)  # α-SPIN 50:50 mix; h = 1: this iteration
    if not pairs:  # DSL keeps every pair but identical ones (a missing score keeps the human answer chosen)
        raise SystemExit(f"train.py: {it_dir / 'pairs.jsonl'} holds no pairs: every generated answer equals its "
                         f"human answer ({stats.get('identical', '?')} of {stats.get('n', '?')}), so there is nothing "
                         f"to prefer; the start model already gives the data's answers (sample with --temperature "
                         f"or use other prompts)")
    return pairs, stats


# ----------------------------------------------------------------------------- divergence
# The flags that can make each part non-finite, most suspect first when none stands out: "loss" = the loss or
# gradient norm before the optimizer step (the weights were finite), "policy" / "noise" = that network's
# weights after the step, "optimizer" = the optimizer's state (moments) at a checkpoint.
SUSPECTS = {"loss": ("beta", "noise_sigma", "noise_init_variance", "noise_lr", "lr"),
            "policy": ("lr", "beta", "max_grad_norm"),
            "noise": ("noise_lr", "noise_init_variance", "beta"),
            "optimizer": ("lr", "beta", "max_grad_norm")}


def divergence_cause(args, part) -> str:
    """The flags most likely behind a non-finite `part` (SUSPECTS), as 'FLAG VALUE (why)' phrases: a weight
    decay with lr · wd ≥ 1 first (every step scales the weights by 1 − lr · wd, so their size grows
    geometrically), then each suspect raised ≥ 10× above its preset default, most raised first, then clipping
    turned off under plain SGD; with none of these, the part's first suspect (lower it)."""
    defaults = build_parser(args.preset).parse_args(["--iter", str(args.iter)])
    found = []
    peak = args.noise_lr if part == "noise" else args.lr
    if args.weight_decay * peak >= 1:
        found.append(f"--weight-decay {args.weight_decay:g} (× lr {peak:g} ≥ 1: each step multiplies the weights by "
                     f"1 − lr·wd)")
    raised = []
    for key in SUSPECTS[part]:
        if key == "max_grad_norm":
            if args.max_grad_norm == 0 and args.optimizer == "sgd":  # the update is lr · the raw gradient
                raised.append((1.0, "--max-grad-norm 0 (plain SGD without clipping: the step is lr × the "
                                             "raw gradient)"))
            continue
        if not {"noise_sigma": args.noise == "fixed", "noise_lr": args.noise == "trainable",
                "noise_init_variance": args.noise == "trainable"}.get(key, True):  # a flag this run does not use
            continue
        value, default = getattr(args, key), getattr(defaults, key)
        if default and value >= 10 * default:
            raised.append((value / default, f"--{key.replace('_', '-')} {value:g} ({value / default:.3g}× the "
                                             f"default {default:g})"))
    found += [text for _, text in sorted(raised, key=lambda r: -r[0])]
    if not found:
        key = SUSPECTS[part][0] if part != "loss" else "lr"
        found.append(f"--{key.replace('_', '-')} {getattr(args, key):g} (lower it)")
    return "; ".join(found)


def diverged(args, step, what, part, state_path):
    """Stop in one line: the step, what went non-finite, that nothing of it is saved, which checkpoint is kept
    (every written checkpoint passed these checks), and the likely cause."""
    kept = (f"the last checkpoint ({state_path.parent}, finite) is kept" if state_path.exists() else
            "no checkpoint was written yet, so a rerun starts this iteration at step 0")
    raise SystemExit(f"train.py: iter {args.iter} step {step}: {what}; stopped, nothing of this step saved, {kept}; "
                     f"likely cause: {divergence_cause(args, part)}")


# ----------------------------------------------------------------------------- logps.jsonl (Fig. 2/10 histograms)
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


def record_logps(loop, pairs, stage):
    """logps.jsonl's rows of `stage` ("start" begins the file, "end" follows the start rows kept in it), computed
    on every rank under FSDP (from its root, a collective), else on rank 0 from the policy; written by rank 0."""
    args, path = loop.args, loop.it_dir / "logps.jsonl"
    if not args.logp_examples or not (loop.main_proc or loop.fsdp):
        return
    rows = policy_logps_rows(loop.module if loop.fsdp else loop.policy, loop.examples, pairs, args.logp_examples,
                             stage, loop.pad_id, loop.device, args.batch_size)
    if loop.main_proc:
        keep = [r for r in data.read_jsonl(path) if r["stage"] == "start"] if stage == "end" and path.is_file() else []
        data.write_jsonl(path, keep + rows)


# ----------------------------------------------------------------------------- the training loop
OPTIMIZERS = {"rmsprop": torch.optim.RMSprop, "adamw": torch.optim.AdamW,
              "sgd": torch.optim.SGD}  # plain SGD: the update is the gradient, a common factor is not normalised away
METRICS = ("loss", "model_loss", "noise_loss", "variance_penalty", "margin", "noisy_margin", "reward_acc", "sigma2",
           *steps.DIAGNOSTICS)  # loss.py's names, logged as they are


def train(args, policy, reference, tokenizer, pairs, it_dir, device, rank, world):
    """Stage 4: the hand-written loop on `args` = the flags with the RunState over them (RunState.over).
    Returns the metrics rows of this iteration."""
    examples = [data.tokenize_pair(tokenizer, p, args.max_length, args.max_prompt_length)
                for p in tqdm(pairs, desc="tokenize", disable=rank != 0, leave=False)]
    if refusal := lone_warmup_step(len(examples), world, args):  # the pairs are known only now (DSL drops some)
        raise errors.Refusal(refusal)
    loop = setup(args, policy, reference, examples, tokenizer.pad_token_id, it_dir, device, rank, world)
    step = resume(loop)  # 0, or the step of the last checkpoint
    if step == 0:
        record_logps(loop, pairs, "start")
    tracker = tracking.open_run(args.report_to if loop.main_proc else "none", it_dir, vars(args), step)
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    policy.train()
    t_start = time.time()
    done = 0  # steps taken by this process (--stop-after-steps)
    bar = tqdm(total=loop.total_steps, initial=step, desc=f"iter {args.iter} train", disable=not loop.main_proc)
    while step < loop.total_steps:
        t0 = time.time()
        row = optimizer_step(loop, step, loop.step_batches(step))  # Eq. 1–9, backward, clip, update
        tokens = row.pop("tokens")
        step += 1
        done += 1
        row = dict(iter=args.iter, step=step, epoch=(step - 1) // loop.steps_per_epoch, **row,
                   tokens_per_s=tokens * world / (time.time() - t0), time_s=time.time() - t_start)
        if loop.main_proc:
            with data.open_append(loop.metrics_path) as fh:
                data.append_jsonl(fh, row)
            tracker.log(row, step)
            tqdm.write(log_line(row, loop, time.time() - t0))
            bar.update(1)
        if step % args.save_every == 0 or step % loop.steps_per_epoch == 0:
            save_checkpoint(loop, step)
        if done == args.stop_after_steps and step < loop.total_steps:
            raise errors.Refusal(f"stopped after {done} steps (--stop-after-steps); rerun to resume")
    bar.close()
    tracker.close()
    record_logps(loop, pairs, "end")
    return rundir.read_metrics(loop.metrics_path) if loop.main_proc else []


# ----------------------------------------------------------------------------- what the loop works with
@dataclasses.dataclass
class Loop:
    """What the training loop works with, built by `setup`: the flags, the policy (its parameters are what the
    optimizer updates) and `model`, what the step calls (step.PolicyLogps, or the CausalLM itself with
    --no-precompute-ref; DDP-wrapped under --dist ddp; sharded in place under --dist fsdp, then `module` is
    FSDP's root), the reference (cached, or run in each step), the noise network (None for SPIN) and the
    generator of its draws, one optimizer and schedule, the tokenized pairs and where the iteration writes."""
    args: argparse.Namespace
    policy: torch.nn.Module
    module: torch.nn.Module
    model: object
    reference: object
    cache: object
    noise_net: object
    noise_rng: torch.Generator
    optimizer: torch.optim.Optimizer
    scheduler: object
    objective: steps.Objective
    examples: list
    pad_id: int
    pack: bool
    autocast: object
    it_dir: pathlib.Path
    device: torch.device
    rank: int = 0
    world: int = 1
    diagnostics: bool = True  # the noise diagnostics of step.DIAGNOSTICS (off only to time their cost, bench)
    _orders: dict = dataclasses.field(default_factory=dict)

    main_proc = property(lambda self: self.rank == 0)
    fsdp = property(lambda self: self.args.dist == "fsdp")
    noise_params = property(lambda self: list(self.noise_net.parameters()) if self.noise_net is not None else [])
    steps_per_epoch = property(lambda self: sampler.steps_per_epoch(len(self.examples), self.world,
                                                                    self.args.batch_size, self.args.grad_accum))
    total_steps = property(lambda self: self.steps_per_epoch * self.args.epochs)
    metrics_path = property(lambda self: self.it_dir / "metrics.jsonl")
    state_path = property(lambda self: self.it_dir / "checkpoint" / "state.pt")

    def order(self, epoch):
        """The epoch's data order over all ranks: a function of seed, iteration and epoch only (sampler.py)."""
        if epoch not in self._orders:
            seed = self.args.seed + 7919 * self.args.iter
            order = sampler.epoch_order(len(self.examples), seed, epoch)
            if self.args.group_by_length:
                lengths = [packing.row_length(e, self.pack) for e in self.examples]
                order = sampler.length_grouped_order(order, lengths, self.world * self.args.batch_size, seed, epoch)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def step_batches(self, step):
        """This rank's micro-batches (lists of pair indices) of optimizer step `step` (0-based)."""
        micro = sampler.rank_microbatches(self.order(step // self.steps_per_epoch), self.rank, self.world,
                                          self.args.batch_size)
        i = step % self.steps_per_epoch
        return micro[i * self.args.grad_accum:(i + 1) * self.args.grad_accum]


def setup(args, policy, reference, examples, pad_id, it_dir, device, rank=0, world=1, progress=True) -> Loop:
    """Build, in the order that matters: the noise network (Eq. 5, fresh each iteration: departure 2) and its RNG;
    the policy as the step calls it (FSDP shards it before the optimizer exists); the reference cache, from the
    policy before any update (step.py); then the optimizer and schedule."""
    compute_dtype = models.pick_dtype(device, args.dtype)  # bf16 autocast on CUDA; fp32 on CPU unless --dtype bf16
    autocast = torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)
    torch.manual_seed(args.seed * 1000 + args.iter)
    noise_net = noises.make_noise(args.noise, policy.config.hidden_size, policy.config.vocab_size,
                                  alpha=args.noise_alpha, sigma=args.noise_sigma, init_variance=args.noise_init_variance)
    noise_net = noise_net.to(device) if noise_net is not None else None
    noise_rng = torch.Generator(device=device).manual_seed(args.seed * 1000 + args.iter * 10 + rank)  # ε₁, ε₂
    module = distributed.prepare(policy, args, device)
    pack = args.pack_pairs and args.precompute_ref and packing.supported(policy)  # one shared-prompt row per pair
    cache = None
    if args.precompute_ref:  # the frozen reference, once per iteration
        cache = steps.ReferenceCache.build(module, examples, pad_id, device, args.batch_size, args.noise != "none",
                                           autocast, args.ref_cache_gb, progress=progress and rank == 0, pack=pack,
                                           reference=reference)
        if not cache.needs_reference:  # the reference model is no longer used: memory for the policy
            freed = steps.release(reference)
            if progress and rank == 0:
                print(f"[4/5] train: reference cached; the reference model freed ({freed / 2 ** 20:.0f} MiB)")
    total_steps = sampler.steps_per_epoch(len(examples), world, args.batch_size, args.grad_accum) * args.epochs
    optimizer, scheduler = build_optimizer(args, policy, noise_net, total_steps)
    return Loop(args=args, policy=policy, module=module, model=distributed.wrap(module, args.dist, device),
                reference=reference, cache=cache, noise_net=noise_net, noise_rng=noise_rng, optimizer=optimizer,
                scheduler=scheduler, objective=steps.Objective.of(args), examples=examples, pad_id=pad_id, pack=pack,
                autocast=autocast, it_dir=pathlib.Path(it_dir), device=device, rank=rank, world=world)


def build_optimizer(args, policy, noise_net, total_steps):
    """One optimizer, two parameter groups (policy at --lr, noise network at --noise-lr), one schedule for both:
    transformers' linear warmup over ceil(--warmup-ratio · steps), then linear decay to 0 (departure 4)."""
    groups = [dict(params=[p for p in policy.parameters() if p.requires_grad], lr=args.lr)]
    if noise_net is not None and list(noise_net.parameters()):
        groups.append(dict(params=list(noise_net.parameters()), lr=args.noise_lr))
    optimizer = OPTIMIZERS[args.optimizer](groups, lr=args.lr, weight_decay=args.weight_decay)
    return optimizer, get_linear_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * total_steps), total_steps)


# ----------------------------------------------------------------------------- one optimizer step
def optimizer_step(loop, step, micro, timer=None, on_micro_batch=None):
    """Optimizer step `step` (0-based) on `micro`, its micro-batches (lists of pair indices): Eq. 1–9 on each with
    one backward (policy and noise network), the noise network's gradients averaged by hand across ranks,
    clipping, the update, and the finiteness checks around it. Returns its metrics row: the mean over
    micro-batches (and ranks) of METRICS, grad_norm (before clipping), lr, tokens. timer(name) (a context
    manager: collate, forward, backward, optimizer) and on_micro_batch(out) are the benchmarks' probes."""
    timer = timer or (lambda name: contextlib.nullcontext())
    args = loop.args
    sums, tokens = torch.zeros(len(METRICS), dtype=torch.float64), 0
    for j, idx in enumerate(micro):
        with timer("collate"):
            batch = {k: v.to(loop.device) for k, v in
                     packing.collate(loop.pack)([loop.examples[i] for i in idx], loop.pad_id).items()}
        with distributed.grad_sync(loop.model, j == len(micro) - 1 or loop.world == 1):
            with timer("forward"):
                if loop.cache is not None:  # the reference from the cache (step.py)
                    out = steps.cached_batch_loss(loop.model, loop.cache, idx, batch, loop.noise_net, loop.objective,
                                                  loop.noise_rng, loop.autocast, diagnostics=loop.diagnostics)
                else:  # --no-precompute-ref: the reference model inside the step
                    out = steps.batch_loss(loop.model, loop.reference, loop.noise_net, batch, loop.objective,
                                           loop.noise_rng, loop.autocast)
            with timer("backward"):
                (out["loss"] / len(micro)).backward()
        if on_micro_batch is not None:
            on_micro_batch(out)
        values = [out.get(k, math.nan) for k in METRICS]  # NaN: the diagnostics turned off (bench only)
        sums += torch.tensor([float(v.detach().mean()) if torch.is_tensor(v) else v for v in values],
                             dtype=torch.float64)
        tokens += out["tokens"]
    with timer("optimizer"):
        if loop.world > 1:  # the noise network is not DDP-wrapped: average its gradients by hand
            for p in loop.noise_params:
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
            sums = sums.to(loop.device)
            dist.all_reduce(sums, op=dist.ReduceOp.AVG)
        row = dict(zip(METRICS, (sums.cpu() / len(micro)).tolist()))
        # FSDP: over all shards; with clipping off (0) the norm is measured and logged, the gradients untouched
        grad_norm = distributed.clip_grad_norm(loop.policy.parameters(), args.max_grad_norm)
        if loop.noise_params and args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(loop.noise_params, args.max_grad_norm)
        if not (math.isfinite(row["loss"]) and torch.isfinite(grad_norm)):
            diverged(args, step + 1, f"non-finite loss {row['loss']} or gradient norm {float(grad_norm)}", "loss",
                     loop.state_path)
        lr = loop.scheduler.get_last_lr()[0]
        loop.optimizer.step()
        if not distributed.all_finite([*loop.policy.parameters(), *loop.noise_params]):  # before any of it is saved
            part = "noise" if distributed.all_finite(loop.policy.parameters()) else "policy"
            diverged(args, step + 1, f"the {'noise network' if part == 'noise' else 'policy'} weights are non-finite "
                     "after the optimizer step", part, loop.state_path)
        loop.scheduler.step()
        loop.optimizer.zero_grad(set_to_none=True)
    return dict(row, grad_norm=float(grad_norm), lr=lr, tokens=tokens)


def log_line(row, loop, seconds):
    """The step's line on the console (metrics.jsonl holds every number)."""
    noise = (f"m−m̃ {row['margin_offset']:.3f} | KL {row['kl_noise']:.2g} | w-shift {row['weight_shift']:.3f} | "
             if loop.args.noise != "none" else "")
    return (f"iter {loop.args.iter} | step {row['step']}/{loop.total_steps} | loss {row['loss']:.4f} | model "
            f"{row['model_loss']:.4f} | noise {row['noise_loss']:.4f} | margin {row['margin']:.3f} | "
            f"acc {row['reward_acc']:.2f} | σ² {row['sigma2']:.4g} | {noise}lr {row['lr']:.2e} | "
            f"{row['tokens_per_s']:.0f} tok/s | {seconds * 1000:.0f} ms")


# ----------------------------------------------------------------------------- checkpoint and resume
def save_checkpoint(loop, step):
    """The resumable state after `step` steps (checkpoint.py; DCP shards under FSDP): a collective, every rank
    calls it. Never written non-finite: the weights are checked after every step, the optimizer state here."""
    if not distributed.all_finite(distributed.state_tensors(loop.optimizer.state)):
        diverged(loop.args, step, "the optimizer state is non-finite", "optimizer", loop.state_path)
    noise_rng_states = distributed.gather(loop.noise_rng.get_state(), loop.world)
    meta = dict(scheduler=loop.scheduler.state_dict(), rng=ckpt.rng_state(), noise_rng=noise_rng_states, step=step,
                epoch=step // loop.steps_per_epoch, args=vars(loop.args))
    if loop.fsdp:  # every rank writes its shards
        distributed.save_sharded(loop.state_path, loop.module, loop.noise_net, loop.optimizer, meta)
    elif loop.main_proc:
        ckpt.save_checkpoint(loop.state_path, dict(
            meta, policy=loop.policy.state_dict(), optimizer=loop.optimizer.state_dict(),
            noise_net=loop.noise_net.state_dict() if loop.noise_net is not None else None,
            data_order=loop.order((step - 1) // loop.steps_per_epoch)))


def resume(loop) -> int:
    """The step of the last checkpoint, its state loaded into the loop's objects (refused if written under other
    training flags or non-finite); 0 for a fresh start. Rank 0 drops metrics rows of steps after it."""
    args, state_path = loop.args, loop.state_path
    distributed.check_format(state_path, args.dist)
    state = distributed.load_meta(state_path) if loop.fsdp else ckpt.load_checkpoint(state_path)
    if state is None:
        if loop.main_proc:  # a fresh start: forget any metrics of a run killed before its first checkpoint
            data.write_jsonl(loop.metrics_path, [])
        return 0
    live = (loop.noise_net, loop.optimizer, loop.scheduler, loop.noise_rng)
    if loop.fsdp:
        step = distributed.restore_sharded(state, args, TRAINING_KEYS, loop.rank, loop.module, *live)
    else:
        step = ckpt.restore(state, state_path, args, TRAINING_KEYS, loop.rank, loop.policy, *live)
    if not distributed.all_finite([*loop.policy.parameters(), *loop.noise_params,
                                   *distributed.state_tensors(loop.optimizer.state)]):  # written before this check
        raise errors.Refusal(f"{state_path} holds non-finite weights or optimizer state (saved by a diverged run); "
                             f"delete {state_path.parent} to restart iteration {args.iter} at step 0")
    if loop.main_proc:
        print(f"[4/5] train: resuming {state['dir'] if loop.fsdp else state_path} at step {step}/{loop.total_steps}")
        rows = rundir.read_metrics(loop.metrics_path)
        data.write_jsonl(loop.metrics_path, [r for r in rows if r["step"] <= step])  # drop unsaved steps
    return step


# ----------------------------------------------------------------------------- main
def main(argv=None):
    """`python train.py --iter k ...`: one iteration; a refusal of any module (ValueError, errors.Refusal, OSError)
    ends the process in one line (errors.one_line), the one exit point of this command."""
    try:
        return run_iteration(argv)
    except (ValueError, OSError) as e:  # user input rejected by a library function (bad record, file, judge setting)
        raise SystemExit(errors.one_line("train.py", e)) from None


def run_iteration(argv=None):
    """Iteration k: the five stages of the module docstring, each skipping work already done."""
    it = begin(parse_args(argv))  # flags and inputs checked, run directory locked, config.json written
    if it is None:  # this iteration's model exists: nothing to do
        return
    policy, reference, tokenizer = load_start_model(it)  # the policy in fp32, the reference a frozen copy
    generate_stage(it, reference, tokenizer)             # 1 generate: the start model answers every prompt
    pairs, stats = label_stage(it)                       # 2 judge, 3 label (DSL)
    it.run.pairs_sha256 = stages.sha256_json(pairs)      # in TRAINING_KEYS: a checkpoint never resumes on other pairs
    if it.main_proc:
        stages.begin(it.it_dir, "train", it.flags["train"], {"pairs": it.run.pairs_sha256})
    t_train = time.time()
    rows = train(it.settings(), policy, reference, tokenizer, pairs, it.it_dir, it.device, it.rank, it.world)  # 4
    save_stage(it, policy, tokenizer, pairs, stats, rows, time.time() - t_train)  # 5 save
    distributed.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclasses.dataclass
class Iteration:
    """Iteration k of a run, as the stages see it: the flags, how the run was started (RunState), this process
    (rank, world, device), the directories, each stage's recorded flags and inputs (stages.py), the training
    prompts and the start time."""
    args: argparse.Namespace
    run: RunState
    rank: int
    world: int
    device: torch.device
    run_dir: pathlib.Path
    it_dir: pathlib.Path
    flags: dict
    inputs: dict
    records: list
    t_start: float

    main_proc = property(lambda self: self.rank == 0)

    def settings(self):
        """The flags with the RunState over them: what checkpoints, stage records and summaries record."""
        return self.run.over(self.args)

    def say(self, *a, **k):
        if self.main_proc:
            print(*a, **k)


def begin(args):
    """Everything before the model loads, in order: the judge's settings, the run directory's lock (one writer),
    the stage records of this iteration and of --history (outputs of other settings are never reused), the start
    model's chat template, the prompts, then config.json. None when the iteration's model already exists."""
    check_judge(args)  # the judge's URL and API key, before the model loads
    t_start = time.time()
    rank, world, device = distributed.setup_distributed(args.device)
    run_dir = pathlib.Path(args.run_dir)
    it_dir = run_dir / f"iter{args.iter}"
    start = rundir.given_start_model(args.start_model, args.iter) or rundir.start_model_of(
        args.run_dir, args.iter, args.base_model, "" if args.preset == "demo" else f" --preset {args.preset}")
    start = stages.canonical_model(start)  # one directory however spelled: the stage records and checkpoint compare it
    run = RunState(world_size=world, start_model=start, dist=args.dist)
    if rank == 0:  # one writer per run directory, until this process ends (runlock.py)
        runlock.hold(run_dir, "train.py")
    flags, inputs = stages.stage_flags(run.over(args), TRAINING_KEYS, run_dir, models.EMBEDDED)
    stages.check_all(it_dir, flags, inputs)
    stages.check_history(run_dir, args.iter, args.history)
    if (it_dir / "model" / "config.json").is_file():
        if rank == 0:
            print(f"iter {args.iter}: {it_dir / 'model'} exists, nothing to do")
            rundir.print_summary(it_dir)
        return None
    models.load_tokenizer(run.start_model, args.trust_remote_code)  # its chat template renders (one line if not)
    records = training_prompts(args)  # at most one pair each (α-SPIN too): a run without a real step stops here
    if refusal := lone_warmup_step(len(records), world, args):
        raise errors.Refusal(refusal)
    rundir.prepare_iteration_dir(it_dir, rank)  # writable; leftovers of a killed write removed
    if rank == 0:  # the flags and how the run was started; no API key, no URL credentials
        data.write_json(it_dir / "config.json", stages.public_args(vars(run.over(args))))
    return Iteration(args=args, run=run, rank=rank, world=world, device=device, run_dir=run_dir, it_dir=it_dir,
                     flags=flags, inputs=inputs, records=records, t_start=t_start)


def load_start_model(it):
    """(policy, reference, tokenizer): the start model as the policy in fp32 (master weights) and a frozen copy in
    the compute dtype as the reference (departure 5), after the memory plan (memplan.py) accepted the run."""
    args = it.args
    ckpt.seed_everything(args.seed + args.iter)
    it.say(f"iter {args.iter}: start {it.run.start_model} | dsl {args.dsl} | noise {args.noise} | world {it.world}")
    it.run.dist = memplan.preflight(it.settings(), it.world, it.device, it.say)  # refuses a plan that cannot fit
    if note := models.slow_bf16_note(it.device, args.dtype):
        it.say(note)
    policy, tokenizer = models.load_model(it.run.start_model, device=it.device, dtype="fp32",
                                          trust_remote_code=args.trust_remote_code)
    if not distributed.all_finite(policy.parameters()):  # e.g. the model of a diverged run saved before this check
        raise errors.Refusal(f"the start model {it.run.start_model} holds non-finite weights (saved by a diverged "
                             f"run); retrain it, or pass another --start-model")
    reference = copy.deepcopy(policy).to(models.pick_dtype(it.device, args.dtype)).eval().requires_grad_(False)
    return policy, reference, tokenizer


def save_stage(it, policy, tokenizer, pairs, stats, rows, train_s):
    """Stage 5: iter{k}/model (cast to --dtype; gathered from the shards under FSDP, a collective) and
    summary.json; the checkpoint is deleted unless --keep-checkpoint."""
    save_dtype = models.pick_dtype(it.device, it.args.dtype)
    if it.run.dist == "fsdp":
        distributed.save_full_model(policy, tokenizer, it.it_dir / "model", save_dtype)
    if not it.main_proc:
        return
    if it.run.dist != "fsdp":
        if not distributed.all_finite(policy.to(save_dtype).parameters(), collective=False):  # as saved
            raise errors.Refusal(f"iter {it.args.iter}: the trained weights overflow {save_dtype} when cast for "
                                 f"saving; nothing saved")
        models.save_model(policy, tokenizer, it.it_dir / "model")
    data.write_json(it.it_dir / "summary.json", rundir.summarize(it.settings(), pairs, stats, rows, train_s,
                                                                 time.time() - it.t_start))
    if not it.args.keep_checkpoint:
        (it.it_dir / "checkpoint" / "state.pt").unlink(missing_ok=True)
        distributed.remove_sharded(it.it_dir / "checkpoint" / "state.pt")
    rundir.print_summary(it.it_dir)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("train.py: interrupted; rerun the same command to resume from the last checkpoint")
