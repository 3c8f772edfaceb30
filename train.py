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
(Eq. 1–3, 9) and noise.py (Eq. 5–6); this file only wires it. Checkpoint plumbing: checkpoint.py.

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
import runlock
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
    total = ckpt.steps_per_epoch(n_pairs, world, args.batch_size, args.grad_accum) * args.epochs
    if total == 1 and math.ceil(args.warmup_ratio * total) >= 1:
        return (f"train.py: iter {args.iter}: {n_pairs} pair(s) make one optimizer step (--batch-size "
                f"{args.batch_size} × {world} process(es) × --grad-accum {args.grad_accum}, --epochs {args.epochs}), "
                f"and the linear warmup (--warmup-ratio {args.warmup_ratio:g}) takes it at lr 0, so the model would "
                f"not change; pass --warmup-ratio 0, a smaller --batch-size, more --epochs or more prompts")
    return None


def generate_stage(args, model, tokenizer, it_dir, rank, flags, inputs, records):
    """Stage 1: the start model answers every training prompt (generate.py shards them across ranks)."""
    out = it_dir / "generated.jsonl"
    if rank == 0:  # record what the answers are made from before the first one is written
        stages.begin(it_dir, "generate", flags["generate"], inputs["generate"])
    distributed.barrier()
    generate.generate_answers(model, tokenizer, records, str(out), max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                              batch_size=args.gen_batch_size, backend=args.gen_backend,
                              max_prompt_length=args.max_prompt_length)
    if rank == 0:
        stages.finish(it_dir, "generate", out.name)


def label_stage(args, it_dir, run_dir, rank, flags):
    """Stages 2–3 on rank 0: judge both answers, then DSL pairs; every rank then reads the pairs."""
    stats = {}
    if rank == 0:
        judged_path, pairs_path = it_dir / "judged.jsonl", it_dir / "pairs.jsonl"
        generated = stages.sha256_file(it_dir / "generated.jsonl")
        stages.begin(it_dir, "judge", flags["judge"], {"generated.jsonl": generated})
        if judged_path.is_file():
            print(f"[2/5] judge: {judged_path} exists, skipped")
            judged = data.read_jsonl(judged_path)
        else:
            judge = judges.make_judge(args.judge, model=args.judge_model, base_url=args.judge_base_url,
                                      scale=args.judge_scale, mode=args.judge_mode,
                                      cache_path=run_dir / "judge_cache.jsonl", concurrency=args.judge_concurrency,
                                      api_key_env=args.judge_api_key_env, device=args.device)
            judged, summary = judges.judge_records(data.read_jsonl(it_dir / "generated.jsonl"), judge, judged_path,
                                                   max_missing=args.judge_max_missing)
            print(judges.format_summary(summary))
        stages.finish(it_dir, "judge", judged_path.name)
        stages.begin(it_dir, "label", flags["label"], {"judged.jsonl": stages.sha256_file(judged_path)})
        pairs, stats = data.dsl_pairs(judged, args.dsl)  # Sec. 4.1 DSL (or human = chosen)
        if pairs_path.is_file():
            print(f"[3/5] label: {pairs_path} exists, skipped")
        else:
            data.write_jsonl(pairs_path, pairs)
        stages.finish(it_dir, "label", pairs_path.name)
        stats["flip_rate"] = judges.dsl_flip_rate(judged)
    distributed.barrier()
    pairs = data.history_pairs(run_dir, args.iter, args.history, seed=args.seed)  # α-SPIN 50:50 mix; h = 1: this iteration
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


def record_logps(path, stage, policy, examples, pairs, args, pad_id, device, main_proc, collective):
    """The rows of `stage` ("start" begins the file, "end" follows the start rows kept in it), computed on
    every rank when `collective` (FSDP), else on rank 0 only, and written by rank 0."""
    if not args.logp_examples or not (main_proc or collective):
        return
    rows = policy_logps_rows(policy, examples, pairs, args.logp_examples, stage, pad_id, device, args.batch_size)
    if main_proc:
        keep = [r for r in data.read_jsonl(path) if r["stage"] == "start"] if stage == "end" and path.is_file() else []
        data.write_jsonl(path, keep + rows)


# ----------------------------------------------------------------------------- the training loop
def train(args, policy, reference, tokenizer, pairs, it_dir, device, rank, world):
    """Stage 4: the hand-written loop on `args` = the flags with the RunState over them (RunState.over).
    Returns the metrics rows of this iteration."""
    main_proc, pad_id = rank == 0, tokenizer.pad_token_id
    metrics_path, logps_path, state_path = it_dir / "metrics.jsonl", it_dir / "logps.jsonl", it_dir / "checkpoint" / "state.pt"
    examples = [data.tokenize_pair(tokenizer, p, args.max_length, args.max_prompt_length)
                for p in tqdm(pairs, desc="tokenize", disable=not main_proc, leave=False)]
    if refusal := lone_warmup_step(len(examples), world, args):  # the pairs are known only now (DSL drops some)
        raise SystemExit(refusal)
    spe = ckpt.steps_per_epoch(len(examples), world, args.batch_size, args.grad_accum)
    total_steps = spe * args.epochs
    compute_dtype = models.pick_dtype(device, args.dtype)  # bf16 autocast on CUDA; fp32 on CPU unless --dtype bf16
    autocast = torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)

    # the noise network (Eq. 5): freshly initialised every iteration (departure 2)
    torch.manual_seed(args.seed * 1000 + args.iter)
    noise_net = noises.make_noise(args.noise, policy.config.hidden_size, policy.config.vocab_size,
                                  alpha=args.noise_alpha, sigma=args.noise_sigma,
                                  init_variance=args.noise_init_variance)
    noise_net = noise_net.to(device) if noise_net is not None else None
    noise_rng = torch.Generator(device=device).manual_seed(args.seed * 1000 + args.iter * 10 + rank)  # ε₁, ε₂
    fsdp, module = args.dist == "fsdp", distributed.prepare(policy, args, device)  # fsdp: sharded, before the optimizer
    logps_of = module if fsdp else policy  # the model logps.jsonl reads (FSDP: its root)
    cache = None
    pack = args.pack_pairs and args.precompute_ref and packing.supported(policy)  # one shared-prompt row per pair
    collate = packing.collate(pack)
    if args.precompute_ref:  # the frozen reference, once per iteration, from the policy before any update or resume
        cache = steps.ReferenceCache.build(module, examples, pad_id, device, args.batch_size, args.noise != "none",
                                           autocast, args.ref_cache_gb, progress=main_proc, pack=pack,
                                           reference=reference)
        if not cache.needs_reference:  # the reference model is no longer used: memory for the policy
            freed = steps.release(reference)
            if main_proc:
                print(f"[4/5] train: reference cached; the reference model freed ({freed / 2 ** 20:.0f} MiB)")

    # one optimizer, two parameter groups (policy, noise network), one linear warmup + decay schedule
    groups = [dict(params=[p for p in policy.parameters() if p.requires_grad], lr=args.lr)]
    noise_params = list(noise_net.parameters()) if noise_net is not None else []
    if noise_params:
        groups.append(dict(params=noise_params, lr=args.noise_lr))
    if args.optimizer == "rmsprop":
        optimizer = torch.optim.RMSprop(groups, lr=args.lr, weight_decay=args.weight_decay)
    elif args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    else:  # plain SGD: the update is the gradient itself, so a common factor on the pairs' weights is not normalised away
        optimizer = torch.optim.SGD(groups, lr=args.lr, weight_decay=args.weight_decay)
    warmup_steps = math.ceil(args.warmup_ratio * total_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)

    # resume from the last checkpoint, if any
    distributed.check_format(state_path, args.dist)
    step, state = 0, distributed.load_meta(state_path) if fsdp else ckpt.load_checkpoint(state_path)
    if state is not None:
        if fsdp:
            step = distributed.restore_sharded(state, args, TRAINING_KEYS, rank, module, noise_net, optimizer,
                                               scheduler, noise_rng)
        else:
            step = ckpt.restore(state, state_path, args, TRAINING_KEYS, rank, policy, noise_net, optimizer, scheduler,
                                noise_rng)
        if not distributed.all_finite([*policy.parameters(), *noise_params,
                                       *distributed.state_tensors(optimizer.state)]):  # one written before this check
            raise SystemExit(f"train.py: {state_path} holds non-finite weights or optimizer state (saved by a diverged "
                             f"run); delete {state_path.parent} to restart iteration {args.iter} at step 0")
        if main_proc:
            print(f"[4/5] train: resuming {state['dir'] if fsdp else state_path} at step {step}/{total_steps}")
            rows = ckpt.read_metrics(metrics_path)
            data.write_jsonl(metrics_path, [r for r in rows if r["step"] <= step])  # drop unsaved steps
    elif main_proc:  # a fresh start: forget any metrics of a run killed before its first checkpoint
        data.write_jsonl(metrics_path, [])
    if state is None:
        record_logps(logps_path, "start", logps_of, examples, pairs, args, pad_id, device, main_proc, fsdp)
    tracker = tracking.open_run(args.report_to if main_proc else "none", it_dir, vars(args), step)  # steps > step
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    policy.train()
    ddp_policy = distributed.wrap(module, args.dist, device)
    lengths = [packing.row_length(e, pack) for e in examples]

    def save(step):
        if not distributed.all_finite(distributed.state_tensors(optimizer.state)):  # the weights: checked each step
            diverged(args, step, "the optimizer state is non-finite", "optimizer", state_path)
        noise_rng_states = distributed.gather(noise_rng.get_state(), world)  # collective: every rank
        if fsdp:  # collective: every rank writes its shards
            return distributed.save_sharded(state_path, module, noise_net, optimizer, dict(
                scheduler=scheduler.state_dict(), rng=ckpt.rng_state(), noise_rng=noise_rng_states, step=step,
                epoch=step // spe, args=vars(args)))
        if main_proc:
            ckpt.save_checkpoint(state_path, dict(
                policy=policy.state_dict(), noise_net=noise_net.state_dict() if noise_net is not None else None,
                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), rng=ckpt.rng_state(),
                noise_rng=noise_rng_states, step=step, epoch=step // spe, data_order=order, args=vars(args)))

    objective = steps.Objective.of(args)  # β, α, ℓ and the noise kind: what the loss depends on
    keys = ("loss", "model_loss", "noise_loss", "variance_penalty", "margin", "noisy_margin", "reward_acc",
            "sigma2", *steps.DIAGNOSTICS)  # loss.py's names, logged as they are
    t_start, done, epoch, order, micro_batches = time.time(), 0, None, None, None
    bar = tqdm(total=total_steps, initial=step, desc=f"iter {args.iter} train", disable=not main_proc)
    while step < total_steps:
        if step // spe != epoch:  # a new epoch's data order (a function of seed and epoch only)
            epoch = step // spe
            order = ckpt.epoch_order(len(examples), args.seed + 7919 * args.iter, epoch)
            if args.group_by_length:
                order = ckpt.length_grouped_order(order, lengths, world * args.batch_size, args.seed + 7919 * args.iter,
                                                  epoch)
            micro_batches = ckpt.rank_microbatches(order, rank, world, args.batch_size)
        t0 = time.time()
        step_micro = micro_batches[(step % spe) * args.grad_accum:(step % spe + 1) * args.grad_accum]
        sums, tokens = torch.zeros(len(keys), dtype=torch.float64), 0
        for j, idx in enumerate(step_micro):
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
            sync = j == len(step_micro) - 1 or world == 1
            with distributed.grad_sync(ddp_policy, sync):
                if cache is not None:
                    out = steps.cached_batch_loss(ddp_policy, cache, idx, batch, noise_net, objective, noise_rng,
                                                   autocast)
                else:
                    out = steps.batch_loss(ddp_policy, reference, noise_net, batch, objective, noise_rng, autocast)
                (out["loss"] / len(step_micro)).backward()  # one backward: policy and noise network
            sums += torch.tensor([float(out[k].detach().mean()) if torch.is_tensor(out[k]) else out[k] for k in keys],
                                 dtype=torch.float64)
            tokens += out["tokens"]
        if world > 1:  # the noise network is not DDP-wrapped: average its gradients by hand
            for p in noise_params:
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
            sums = sums.to(device)
            dist.all_reduce(sums, op=dist.ReduceOp.AVG)
        m = dict(zip(keys, (sums.cpu() / len(step_micro)).tolist()))
        # FSDP: over all shards; with clipping off (0) the norm is measured and logged, the gradients untouched
        grad_norm = distributed.clip_grad_norm(policy.parameters(), args.max_grad_norm)
        if noise_params and args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(noise_params, args.max_grad_norm)
        if not (math.isfinite(m["loss"]) and torch.isfinite(grad_norm)):
            diverged(args, step + 1, f"non-finite loss {m['loss']} or gradient norm {float(grad_norm)}", "loss",
                     state_path)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        if not distributed.all_finite([*policy.parameters(), *noise_params]):  # before anything of it is saved
            part = "noise" if distributed.all_finite(policy.parameters()) else "policy"
            diverged(args, step + 1, f"the {'noise network' if part == 'noise' else 'policy'} weights are non-finite "
                     "after the optimizer step", part, state_path)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step, done = step + 1, done + 1
        dt = time.time() - t0
        row = dict(iter=args.iter, step=step, epoch=epoch, **m, grad_norm=float(grad_norm), lr=lr,
                   tokens_per_s=tokens * world / dt, time_s=time.time() - t_start)
        if main_proc:
            with data.open_append(metrics_path) as fh:
                data.append_jsonl(fh, row)
            tracker.log(row, step)
            tqdm.write(f"iter {args.iter} | step {step}/{total_steps} | loss {row['loss']:.4f} | model "
                       f"{row['model_loss']:.4f} | noise {row['noise_loss']:.4f} | margin {row['margin']:.3f} | "
                       f"acc {row['reward_acc']:.2f} | σ² {row['sigma2']:.4g} | "
                       + (f"m−m̃ {row['margin_offset']:.3f} | KL {row['kl_noise']:.2g} | w-shift "
                          f"{row['weight_shift']:.3f} | " if args.noise != "none" else "") + f"lr {lr:.2e} | "
                       f"{row['tokens_per_s']:.0f} tok/s | {dt * 1000:.0f} ms")
            bar.update(1)
        if step % args.save_every == 0 or step % spe == 0:
            save(step)
        if args.stop_after_steps and done == args.stop_after_steps and step < total_steps:
            raise SystemExit(f"train.py: stopped after {done} steps (--stop-after-steps); rerun to resume")
    bar.close()
    tracker.close()
    record_logps(logps_path, "end", logps_of, examples, pairs, args, pad_id, device, main_proc, fsdp)
    return ckpt.read_metrics(metrics_path) if main_proc else []


# ----------------------------------------------------------------------------- main
def main(argv=None):
    """`python train.py --iter k ...`: one iteration; a refusal of any module (ValueError, errors.Refusal, OSError)
    ends the process in one line (errors.one_line), the one exit point of this command."""
    try:
        return run_iteration(argv)
    except (ValueError, OSError) as e:  # user input rejected by a library function (bad record, file, judge setting)
        raise SystemExit(errors.one_line("train.py", e)) from None


def run_iteration(argv=None):
    """The five stages of iteration k (module docstring), each skipping work already done."""
    args = parse_args(argv)  # every flag is checked before anything is written; never written into
    check_judge(args)  # the judge's URL and API key, before the model loads
    t_start = time.time()
    rank, world, device = distributed.setup_distributed(args.device)
    run_dir = pathlib.Path(args.run_dir)
    it_dir = run_dir / f"iter{args.iter}"
    run = RunState(world_size=world, start_model=ckpt.given_start_model(args.start_model, args.iter) or ckpt.start_model_of(
        args.run_dir, args.iter, args.base_model, "" if args.preset == "demo" else f" --preset {args.preset}"),
        dist=args.dist)
    say = print if rank == 0 else (lambda *a, **k: None)
    if rank == 0:  # one writer per run directory, until this process ends (runlock.py)
        runlock.hold(run_dir, "train.py")
    flags, inputs = stages.stage_flags(run.over(args), TRAINING_KEYS, run_dir, models.EMBEDDED)
    stages.check_all(it_dir, flags, inputs)  # outputs of other settings are never reused or overwritten
    stages.check_history(run_dir, args.iter, args.history)  # --history: the earlier pairs, checked the same way
    if (it_dir / "model" / "config.json").is_file():
        say(f"iter {args.iter}: {it_dir / 'model'} exists, nothing to do")
        return ckpt.print_summary(it_dir) if rank == 0 else None
    models.load_tokenizer(run.start_model, args.trust_remote_code)  # its chat template renders (one line if not)
    records = training_prompts(args)  # at most one pair each (α-SPIN too): a run without a real step stops here
    if refusal := lone_warmup_step(len(records), world, args):
        raise SystemExit(refusal)
    ckpt.prepare_iteration_dir(it_dir, rank)  # writable; leftovers of a killed write removed
    if rank == 0:  # the flags and how the run was started; no API key, no URL credentials
        data.write_json(it_dir / "config.json", stages.public_args(vars(run.over(args))))
    ckpt.seed_everything(args.seed + args.iter)
    say(f"iter {args.iter}: start {run.start_model} | dsl {args.dsl} | noise {args.noise} | world {world}")
    run.dist = memplan.preflight(run.over(args), world, device, say)  # prints the plan; refuses one that cannot fit

    # start model: the policy in fp32 (master weights), the reference a frozen copy in the compute dtype
    policy, tokenizer = models.load_model(run.start_model, device=device, dtype="fp32",
                                          trust_remote_code=args.trust_remote_code)
    if not distributed.all_finite(policy.parameters()):  # e.g. the model of a diverged run saved before this check
        raise SystemExit(f"train.py: the start model {run.start_model} holds non-finite weights (saved by a diverged "
                         f"run); retrain it, or pass another --start-model")
    reference = copy.deepcopy(policy).to(models.pick_dtype(device, args.dtype)).eval().requires_grad_(False)

    generate_stage(args, reference, tokenizer, it_dir, rank, flags, inputs, records)  # 1 generate (the start model)
    pairs, stats = label_stage(args, it_dir, run_dir, rank, flags)          # 2 judge, 3 label
    run.pairs_sha256 = stages.sha256_json(pairs)  # in TRAINING_KEYS: a checkpoint never resumes on other pairs
    if rank == 0:
        stages.begin(it_dir, "train", flags["train"], {"pairs": run.pairs_sha256})
    t_train = time.time()
    rows = train(run.over(args), policy, reference, tokenizer, pairs, it_dir, device, rank, world)  # 4 train

    save_dtype = models.pick_dtype(device, args.dtype)
    if run.dist == "fsdp":  # 5 save: a collective gather of the shards onto rank 0
        distributed.save_full_model(policy, tokenizer, it_dir / "model", save_dtype)
    if rank == 0:  # 5 save
        if run.dist != "fsdp":
            if not distributed.all_finite(policy.to(save_dtype).parameters(), collective=False):  # as saved
                raise SystemExit(f"train.py: iter {args.iter}: the trained weights overflow {save_dtype} when cast "
                                 f"for saving; nothing saved")
            models.save_model(policy, tokenizer, it_dir / "model")
        data.write_json(it_dir / "summary.json", ckpt.summarize(run.over(args), pairs, stats, rows,
                                                                time.time() - t_train, time.time() - t_start))
        if not args.keep_checkpoint:
            (it_dir / "checkpoint" / "state.pt").unlink(missing_ok=True)
            distributed.remove_sharded(it_dir / "checkpoint" / "state.pt")
        ckpt.print_summary(it_dir)
    distributed.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("train.py: interrupted; rerun the same command to resume from the last checkpoint")
