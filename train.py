"""One DNPO iteration, end to end: `python train.py --iter k` = generate → judge → label → train → save.

    start model  = --base-model (k = 0), else --start-model DIR or <run-dir>/iter{k-1}/model;  reference = its copy
    1 generate   iter{k}/generated.jsonl   the start model answers every training prompt
    2 judge      iter{k}/judged.jsonl      scores of the human and the generated answer
    3 label      iter{k}/pairs.jsonl       DSL: higher score = chosen (k = 0 or --no-dsl: human = chosen)
    4 train      iter{k}/metrics.jsonl, logps.jsonl, checkpoint/state.pt   the hand-written loop below
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
   logps.jsonl, the start/end log-probs behind Fig. 2/10.
5. Policy weights are kept in fp32 (master copy) with bf16 autocast on CUDA; the reference is held in
   the compute dtype; the saved model is cast to --dtype. Judging runs even at iteration 0 (its
   scores feed the DSL flip statistics) although iteration 0 trains on human = chosen.
6. Multi-GPU: torchrun → DDP or FSDP2 for the policy (--dist; distributed.py, with sharded DCP
   checkpoints), the generator replicated with its gradients all-reduced by hand, generation sharded
   across ranks, judging and all file writing on rank 0. memplan.py prints the bytes per rank first.
"""
import argparse
import copy
import math
import pathlib
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

import checkpoint as ckpt
import data
import distributed
import generate
import judge as judges
import logps_rows
import memplan
import model as models
import noise as noises
import stages
import step as steps
from loss import LOSS_TYPES, dnpo_loss, sequence_logps

# ----------------------------------------------------------------------------- settings
# A preset is a plain dict of flag defaults; a flag given on the command line overrides it.
PRESETS = {
    "demo": dict(  # embedded SmolLM2-135M, demo task, rule judge: one iteration in minutes on 2 CPU cores
        run_dir="runs/demo", base_model="smollm2-135m", data="demo", max_prompts=32, max_length=256,
        max_prompt_length=128, max_new_tokens=48, gen_batch_size=16, judge="rule", judge_model=None,
        beta=0.1, epochs=2, batch_size=8, grad_accum=1, lr=1e-6, optimizer="rmsprop", warmup_ratio=0.1,
        dtype=None, save_every=4, gradient_checkpointing=False, logp_examples=16),
    "paper": dict(  # Table 3 on zephyr-7b-sft-full, 20k UltraChat prompts, gpt-4o-mini judge
        run_dir="runs/paper", base_model="alignment-handbook/zephyr-7b-sft-full", data=None,
        max_prompts=20000, max_length=1024, max_prompt_length=512, max_new_tokens=512, gen_batch_size=32,
        judge="openai", judge_model="gpt-4o-mini", beta=0.1, epochs=3, batch_size=4, grad_accum=1,
        lr=5e-7, optimizer="rmsprop", warmup_ratio=0.1, dtype="bf16", save_every=200,
        gradient_checkpointing=True, logp_examples=64),
}
COMMON = dict(  # defaults shared by both presets
    seed=0, device=None, history=1, flaw_rate=0.3, trust_remote_code=False, temperature=0.0, top_p=1.0,
    gen_backend="hf", judge_base_url=None, judge_concurrency=8, judge_api_key_env="OPENAI_API_KEY",
    judge_max_missing=0.2, loss_type="sigmoid", noise_alpha=noises.DEFAULT_ALPHA, noise_sigma=noises.DEFAULT_SIGMA,
    noise_lr=1e-3, noise_chunk_size=256, weight_decay=0.0, max_grad_norm=1.0, keep_checkpoint=False,
    stop_after_steps=0, precompute_ref=True, ref_cache_gb=4.0, group_by_length=True)
FLOAT_FLAGS = ("beta", "lr", "noise_alpha", "noise_sigma", "noise_lr", "weight_decay", "warmup_ratio", "max_grad_norm",
               "temperature", "top_p", "judge_max_missing", "flaw_rate", "ref_cache_gb")
# Flags whose change would make a checkpoint's resumed run differ from an uninterrupted one.
TRAINING_KEYS = ("beta", "loss_type", "noise", "noise_alpha", "noise_sigma", "noise_lr", "epochs", "batch_size",
                 "grad_accum", "lr", "optimizer", "weight_decay", "warmup_ratio", "max_grad_norm", "seed",
                 "max_length", "max_prompt_length", "history", "dsl", "world_size", "start_model", "pairs_sha256",
                 "precompute_ref", "group_by_length", "dtype")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise SystemExit(f"train.py: {message} (see --help)")


def parse_args(argv=None):
    p = Parser(description="One DNPO iteration: generate, judge, label, train, save.")
    g = p.add_argument_group("run")
    g.add_argument("--iter", type=int, required=True, help="iteration k ≥ 0 (0 = plain SPIN from --base-model)")
    g.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="flag defaults (default demo)")
    g.add_argument("--run-dir", help="run directory holding iter{k}/ (demo: runs/demo, paper: runs/paper)")
    g.add_argument("--seed", type=int, help="seed of data order, noise and generator init (default 0)")
    g.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=["bf16", "fp32"], help="compute dtype (default: bf16 on CUDA, fp32 on CPU)")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="training prompts: 'demo' or a jsonl/parquet file (plain, UltraChat, SPIN)")
    g.add_argument("--max-prompts", type=int, help="use the first N prompts (0 = all; demo 32, paper 20000)")
    g.add_argument("--max-length", type=int, help="max tokens of prompt + answer (demo 256, paper 1024)")
    g.add_argument("--max-prompt-length", type=int, help="max prompt tokens (demo 128, paper 512)")
    g.add_argument("--flaw-rate", type=float, help="--data demo: fraction of flawed human answers (default 0.3)")
    g.add_argument("--history", type=int, help="train on the pairs of the last h iterations (1 = this one only)")
    g = p.add_argument_group("model and generation")
    g.add_argument("--base-model", help="start model of iteration 0: hub id, dir, or smollm2-135m (embedded)")
    g.add_argument("--start-model", help="k ≥ 1: start from this dir or hub id, not <run-dir>/iter{k-1}/model (ablate.py)")
    g.add_argument("--trust-remote-code", action="store_true", default=None, help="allow hub model code")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                   help="recompute activations in backward (paper preset: on)")
    g.add_argument("--max-new-tokens", type=int, help="generation length in tokens (demo 48, paper 512)")
    g.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy, the default)")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass (1 = off)")
    g.add_argument("--gen-batch-size", type=int, help="prompts per generation batch")
    g.add_argument("--gen-backend", choices=["hf", "vllm"], help="generation backend (default hf)")
    g = p.add_argument_group("DSL and judge")
    g.add_argument("--judge", choices=["rule", "openai", "hf"], help="judge (demo: rule, paper: openai)")
    g.add_argument("--judge-model", help="judge model name (openai: gpt-4o-mini; hf: hub id or dir)")
    g.add_argument("--judge-base-url", help="OpenAI-compatible server URL (default api.openai.com)")
    g.add_argument("--judge-concurrency", type=int, help="parallel judge requests (default 8)")
    g.add_argument("--judge-api-key-env", help="environment variable holding the API key (default OPENAI_API_KEY)")
    g.add_argument("--judge-max-missing", type=float, help="fraction of records allowed without a score (default 0.2)")
    g.add_argument("--dsl", action=argparse.BooleanOptionalAction,
                   help="dynamic sample labeling (default on for k ≥ 1; --no-dsl: human = chosen)")
    g = p.add_argument_group("DNPO")
    g.add_argument("--beta", type=float, help="β of the margin (default 0.1)")
    g.add_argument("--loss-type", choices=LOSS_TYPES, help="ℓ(m): sigmoid (paper) or hinge (SPIN repo)")
    g.add_argument("--noise", choices=["trainable", "fixed", "none"],
                   help="noise on reference logits of rejected answers (default trainable for k ≥ 1; none = SPIN)")
    g.add_argument("--noise-alpha", type=float, help="α weight of mean σ² in the loss (0 = no bound; default 1.0, see noise.py)")
    g.add_argument("--noise-sigma", type=float, help="σ of --noise fixed, in logits (default 0.1)")
    g.add_argument("--noise-lr", type=float, help="learning rate of the noise generator (default 1e-3)")
    g.add_argument("--noise-chunk-size", type=int, help="answer tokens per chunk of lm_head + log-softmax (memory)")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, help="epochs over the pairs (demo 2, paper 3)")
    g.add_argument("--batch-size", type=int, help="pairs per micro-batch per process (demo 8, paper 4)")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (1 = off)")
    g.add_argument("--lr", type=float, help="peak policy learning rate (demo 1e-6, paper 5e-7)")
    g.add_argument("--optimizer", choices=["rmsprop", "adamw"], help="optimizer (paper: rmsprop)")
    g.add_argument("--weight-decay", type=float, help="weight decay (0 = off)")
    g.add_argument("--warmup-ratio", type=float, help="fraction of steps of linear warmup, then linear decay to 0")
    g.add_argument("--max-grad-norm", type=float, help="gradient clipping norm (0 = off; default 1.0)")
    g.add_argument("--precompute-ref", action=argparse.BooleanOptionalAction,
                   help="run the frozen reference once per iteration, not in every step (default on; step.py)")
    g.add_argument("--ref-cache-gb", type=float, help="memory for the reference's rejected-answer hidden states (default 4)")
    g.add_argument("--group-by-length", action=argparse.BooleanOptionalAction,
                   help="micro-batches of pairs of similar length (less padding; default on)")
    g = p.add_argument_group("checkpoint and logging")
    g.add_argument("--save-every", type=int, help="checkpoint every N optimizer steps (and each epoch end)")
    g.add_argument("--keep-checkpoint", action="store_true", default=None,
                   help="keep iter{k}/checkpoint/ after the model is saved (default: delete it)")
    g.add_argument("--logp-examples", type=int, help="pairs whose log-probs go to logps.jsonl (0 = off; demo 16, paper 64)")
    g.add_argument("--stop-after-steps", type=int, help="debug: stop after N optimizer steps, as if killed (0 = off)")
    g = p.add_argument_group("scale-out (distributed.py, memplan.py)")
    g.add_argument("--dist", choices=["auto", "ddp", "fsdp"], default="auto",
                   help="under torchrun: DDP or FSDP2 for the policy (auto: FSDP from 1 B parameters)")
    g.add_argument("--memory-check", action=argparse.BooleanOptionalAction, default=True,
                   help="refuse a run whose memory plan does not fit the GPU (default on)")
    args = p.parse_args(argv)
    for key, value in {**COMMON, **PRESETS[args.preset]}.items():  # explicit flags win
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return check_args(args)


def check_args(args):
    """One-line errors for values no run can use; resolves the iteration-dependent DSL/noise defaults."""
    def need(ok, message):
        if not ok:
            raise SystemExit(f"train.py: {message}")
    need(args.iter >= 0, f"--iter must be ≥ 0, got {args.iter}")
    for name in FLOAT_FLAGS:  # inf and nan pass every comparison below or fail it silently
        need(math.isfinite(getattr(args, name)), f"--{name.replace('_', '-')} must be a finite number, got "
                                                 f"{getattr(args, name)}")
    need(0 < args.top_p <= 1, f"--top-p must be in (0, 1], got {args.top_p}")
    need(0 <= args.judge_max_missing <= 1, f"--judge-max-missing must be in [0, 1], got {args.judge_max_missing}")
    for name in ("beta", "lr", "epochs", "batch_size", "grad_accum", "max_length", "max_prompt_length",
                 "max_new_tokens", "history", "save_every", "noise_lr", "noise_chunk_size", "gen_batch_size"):
        need(getattr(args, name) > 0, f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("noise_alpha", "weight_decay", "max_grad_norm", "warmup_ratio", "logp_examples",
                 "stop_after_steps", "max_prompts", "temperature"):
        need(getattr(args, name) is None or getattr(args, name) >= 0, f"--{name.replace('_', '-')} must be ≥ 0")
    need(0 <= args.flaw_rate <= 1, f"--flaw-rate must be in [0, 1], got {args.flaw_rate}")
    need(args.warmup_ratio < 1, f"--warmup-ratio must be < 1, got {args.warmup_ratio}")
    need(args.max_prompt_length < args.max_length,
         f"--max-prompt-length ({args.max_prompt_length}) must be < --max-length ({args.max_length})")
    need(args.data is not None, f"--preset {args.preset} needs --data FILE (an UltraChat jsonl/parquet file)")
    need(args.judge != "hf" or args.judge_model, "--judge hf needs --judge-model (a hub id or a directory)")
    if args.data != "demo":
        try:
            data.check_file(args.data)
        except ValueError as e:
            raise SystemExit(f"train.py: --data {e}") from None
    if args.iter == 0:
        if args.dsl or args.noise not in (None, "none"):
            print("train.py: iteration 0 is plain SPIN (paper §4.1): ignoring --dsl / --noise", file=sys.stderr)
        args.dsl, args.noise = False, "none"
    args.dsl = True if args.dsl is None else args.dsl
    args.noise = args.noise or "trainable"
    need(args.noise != "fixed" or args.noise_sigma > 0, "--noise fixed needs --noise-sigma > 0")
    return args


# ----------------------------------------------------------------------------- helpers
def generate_stage(args, model, tokenizer, it_dir, rank, flags, inputs):
    """Stage 1: the start model answers every training prompt (generate.py shards them across ranks)."""
    out = it_dir / "generated.jsonl"
    records = data.load_prompts(args.data, split="train", max_prompts=args.max_prompts or None, seed=args.seed,
                                flaw_rate=args.flaw_rate)
    if rank == 0:  # record what the answers are made from before the first one is written
        stages.begin(it_dir, "generate", flags["generate"], inputs["generate"])
    ckpt.barrier()
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
    ckpt.barrier()
    pairs = data.history_pairs(run_dir, args.iter, args.history)  # α-SPIN mixing; h = 1: this iteration
    if not pairs:
        raise SystemExit(f"train.py: {it_dir / 'pairs.jsonl'} holds no pairs (every judge score missing?)")
    return pairs, stats


def batch_loss(policy, reference, generator, batch, args, noise_rng, autocast):
    """Eq. 1–9 on one micro-batch: one policy forward over 2B rows, one reference forward, the noise twice."""
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]  # (2B, T)
    B = input_ids.shape[0] // 2
    with autocast:
        policy_logits = policy(input_ids=input_ids, attention_mask=attention_mask).logits  # (2B, T, V)
    policy_logps = sequence_logps(policy_logits, labels)  # (2B,)
    with torch.no_grad(), autocast:
        ref_out = reference(input_ids=input_ids, attention_mask=attention_mask,
                            output_hidden_states=args.noise != "none")
    ref_logps = sequence_logps(ref_out.logits, labels)  # (2B,)
    pc, pr, rc, rr = policy_logps[:B], policy_logps[B:], ref_logps[:B], ref_logps[B:]
    sigma2 = 0.0
    if args.noise == "none":  # exactly SPIN: the clean reference, no noise term
        out = dnpo_loss(pc, pr, rc, rr, None, None, args.beta, args.noise_alpha, args.loss_type,
                        ref_rejected_logps=rr)
    else:
        ref_rejected = (ref_out.logits[B:], ref_out.hidden_states[-1][B:], labels[B:])  # (B,T,V), (B,T,d), (B,T)
        noisy_model = noises.noisy_sequence_logps(*ref_rejected, generator, generator_grad=False,  # Eq. 6, ε₁
                                                  chunk_size=args.noise_chunk_size, rng=noise_rng)
        noisy_noise, variance_mean = None, None
        if args.noise == "trainable":
            noisy_noise, variance_mean = noises.noisy_sequence_logps(  # Eq. 6, ε₂, grad to the generator
                *ref_rejected, generator, generator_grad=True, chunk_size=args.noise_chunk_size, rng=noise_rng,
                return_variance=True)
            sigma2 = variance_mean.item()
        else:
            sigma2 = args.noise_sigma ** 2
        out = dnpo_loss(pc, pr, rc, noisy_model, noisy_noise, variance_mean, args.beta, args.noise_alpha,
                        args.loss_type, ref_rejected_logps=rr)  # Eq. 9
    out["sigma2"] = sigma2
    out["tokens"] = int(attention_mask.sum())
    return out


# ----------------------------------------------------------------------------- the training loop
def train(args, policy, reference, tokenizer, pairs, it_dir, device, rank, world):
    """Stage 4: the hand-written loop. Returns the metrics rows of this iteration."""
    main_proc, pad_id = rank == 0, tokenizer.pad_token_id
    metrics_path, logps_path, state_path = it_dir / "metrics.jsonl", it_dir / "logps.jsonl", it_dir / "checkpoint" / "state.pt"
    examples = [data.tokenize_pair(tokenizer, p, args.max_length, args.max_prompt_length)
                for p in tqdm(pairs, desc="tokenize", disable=not main_proc, leave=False)]
    spe = ckpt.steps_per_epoch(len(examples), world, args.batch_size, args.grad_accum)
    total_steps = spe * args.epochs
    compute_dtype = models.pick_dtype(device, args.dtype)  # bf16 autocast on CUDA; fp32 on CPU unless --dtype bf16
    autocast = torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)

    # noise generator: freshly initialised every iteration (departure 2)
    torch.manual_seed(args.seed * 1000 + args.iter)
    generator = noises.make_noise(args.noise, policy.config.hidden_size, policy.config.vocab_size,
                                  alpha=args.noise_alpha, sigma=args.noise_sigma)
    generator = generator.to(device) if generator is not None else None
    noise_rng = torch.Generator(device=device).manual_seed(args.seed * 1000 + args.iter * 10 + rank)  # ε₁, ε₂
    fsdp, module = args.dist == "fsdp", distributed.prepare(policy, args, device)  # fsdp: sharded, before the optimizer
    logps_of = module if fsdp else policy  # the model logps.jsonl reads (FSDP: its root)

    # one optimizer, two parameter groups (policy, generator), one linear warmup + decay schedule
    groups = [dict(params=[p for p in policy.parameters() if p.requires_grad], lr=args.lr)]
    generator_params = list(generator.parameters()) if generator is not None else []
    if generator_params:
        groups.append(dict(params=generator_params, lr=args.noise_lr))
    if args.optimizer == "rmsprop":
        optimizer = torch.optim.RMSprop(groups, lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    warmup_steps = math.ceil(args.warmup_ratio * total_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)

    # resume from the last checkpoint, if any
    distributed.check_format(state_path, args.dist)
    step, state = 0, distributed.load_meta(state_path) if fsdp else ckpt.load_checkpoint(state_path)
    if state is not None:
        if fsdp:
            step = distributed.restore_sharded(state, args, TRAINING_KEYS, rank, module, generator, optimizer,
                                               scheduler, noise_rng)
        else:
            step = ckpt.restore(state, state_path, args, TRAINING_KEYS, rank, policy, generator, optimizer, scheduler,
                                noise_rng)
        if main_proc:
            print(f"[4/5] train: resuming {state['dir'] if fsdp else state_path} at step {step}/{total_steps}")
            rows = data.read_jsonl(metrics_path) if metrics_path.is_file() else []
            data.write_jsonl(metrics_path, [r for r in rows if r["step"] <= step])  # drop unsaved steps
    elif main_proc:  # a fresh start: forget any metrics of a run killed before its first checkpoint
        data.write_jsonl(metrics_path, [])
    if state is None:
        logps_rows.record(logps_path, "start", logps_of, examples, pairs, args, pad_id, device, main_proc, fsdp)
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    policy.train()
    cache = None
    if args.precompute_ref:  # the frozen reference, once for the whole iteration (step.py)
        cache = steps.ReferenceCache.build(reference, examples, pad_id, device, args.batch_size, args.noise != "none",
                                           autocast, args.noise_chunk_size, args.ref_cache_gb, progress=main_proc)
    ddp_policy = distributed.wrap(module, args.dist, device)
    lengths = [max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"])) for e in examples]

    def save(step):
        noise_rng_states = ckpt.gather(noise_rng.get_state(), world)  # collective: every rank
        if fsdp:  # collective: every rank writes its shards
            return distributed.save_sharded(state_path, module, generator, optimizer, dict(
                scheduler=scheduler.state_dict(), rng=ckpt.rng_state(), noise_rng=noise_rng_states, step=step,
                epoch=step // spe, args=vars(args)))
        if main_proc:
            ckpt.save_checkpoint(state_path, dict(
                policy=policy.state_dict(), generator=generator.state_dict() if generator is not None else None,
                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), rng=ckpt.rng_state(),
                noise_rng=noise_rng_states, step=step, epoch=step // spe, data_order=order, args=vars(args)))

    keys = ("loss", "model_loss", "noise_loss", "variance_penalty", "margins", "noisy_margins", "reward_accuracy",
            "sigma2")
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
            batch = {k: v.to(device) for k, v in data.collate_pairs([examples[i] for i in idx], pad_id).items()}
            sync = j == len(step_micro) - 1 or world == 1
            with distributed.grad_sync(ddp_policy, sync):
                if cache is not None:
                    out = steps.cached_batch_loss(ddp_policy, cache, idx, batch, generator, args, noise_rng, autocast)
                else:
                    out = batch_loss(ddp_policy, reference, generator, batch, args, noise_rng, autocast)
                (out["loss"] / len(step_micro)).backward()  # one backward: policy and generator
            sums += torch.tensor([float(out[k].detach().mean()) if torch.is_tensor(out[k]) else out[k] for k in keys],
                                 dtype=torch.float64)
            tokens += out["tokens"]
        if world > 1:  # the generator is not DDP-wrapped: average its gradients by hand
            for p in generator_params:
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
            sums = sums.to(device)
            dist.all_reduce(sums, op=dist.ReduceOp.AVG)
        m = dict(zip(keys, (sums.cpu() / len(step_micro)).tolist()))
        if args.max_grad_norm > 0:
            grad_norm = distributed.clip_grad_norm(policy.parameters(), args.max_grad_norm)  # FSDP: over all shards
            if generator_params:
                torch.nn.utils.clip_grad_norm_(generator_params, args.max_grad_norm)
        else:
            grad_norm = torch.zeros(())
        if not (math.isfinite(m["loss"]) and torch.isfinite(grad_norm)):
            kept = (f"last good checkpoint kept in {state_path.parent}" if state_path.is_file() else
                    "stopped before the first checkpoint, so none is kept and a rerun starts this iteration at step 0")
            raise SystemExit(f"train.py: iter {args.iter} step {step + 1}: non-finite loss {m['loss']} or gradient "
                             f"norm {float(grad_norm)}; stopped, {kept} (try a lower --lr or --noise-lr)")
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step, done = step + 1, done + 1
        dt = time.time() - t0
        row = dict(iter=args.iter, step=step, epoch=epoch, loss=m["loss"], model_loss=m["model_loss"],
                   noise_loss=m["noise_loss"], variance_penalty=m["variance_penalty"], margin=m["margins"],
                   noisy_margin=m["noisy_margins"], reward_acc=m["reward_accuracy"], sigma2=m["sigma2"], lr=lr,
                   tokens_per_s=tokens * world / dt, time_s=time.time() - t_start)
        if main_proc:
            with data.open_append(metrics_path) as fh:
                data.append_jsonl(fh, row)
            tqdm.write(f"iter {args.iter} | step {step}/{total_steps} | loss {row['loss']:.4f} | model "
                       f"{row['model_loss']:.4f} | noise {row['noise_loss']:.4f} | margin {row['margin']:.3f} | "
                       f"acc {row['reward_acc']:.2f} | σ² {row['sigma2']:.4g} | lr {lr:.2e} | "
                       f"{row['tokens_per_s']:.0f} tok/s | {dt * 1000:.0f} ms")
            bar.update(1)
        if step % args.save_every == 0 or step % spe == 0:
            save(step)
        if args.stop_after_steps and done == args.stop_after_steps and step < total_steps:
            raise SystemExit(f"train.py: stopped after {done} steps (--stop-after-steps); rerun to resume")
    bar.close()
    logps_rows.record(logps_path, "end", logps_of, examples, pairs, args, pad_id, device, main_proc, fsdp)
    return data.read_jsonl(metrics_path) if main_proc else []


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)  # every flag is checked before anything is written
    t_start = time.time()
    rank, world, device = ckpt.setup_distributed(args.device)
    args.world_size = world
    run_dir = pathlib.Path(args.run_dir)
    it_dir = run_dir / f"iter{args.iter}"
    args.start_model = ckpt.given_start_model(args.start_model, args.iter) or ckpt.start_model_of(
        args.run_dir, args.iter, args.base_model, "" if args.preset == "demo" else f" --preset {args.preset}")
    say = print if rank == 0 else (lambda *a, **k: None)
    flags, inputs = stages.stage_flags(args, TRAINING_KEYS, run_dir, models.EMBEDDED)
    stages.check_all(it_dir, flags, inputs)  # outputs of other settings are never reused or overwritten
    if (it_dir / "model" / "config.json").is_file():
        say(f"iter {args.iter}: {it_dir / 'model'} exists, nothing to do")
        return ckpt.print_summary(it_dir) if rank == 0 else None
    ckpt.prepare_iteration_dir(it_dir, rank)  # writable; leftovers of a killed write removed
    if rank == 0:
        data.write_json(it_dir / "config.json", stages.public_args(vars(args)))  # no API key, no URL credentials
    ckpt.seed_everything(args.seed + args.iter)
    say(f"iter {args.iter}: start {args.start_model} | dsl {args.dsl} | noise {args.noise} | world {world}")
    args.dist = memplan.preflight(args, world, device, say)  # prints the plan; refuses one that cannot fit

    # start model: the policy in fp32 (master weights), the reference a frozen copy in the compute dtype
    policy, tokenizer = models.load_model(args.start_model, device=device, dtype="fp32",
                                          trust_remote_code=args.trust_remote_code)
    reference = copy.deepcopy(policy).to(models.pick_dtype(device, args.dtype)).eval().requires_grad_(False)

    generate_stage(args, reference, tokenizer, it_dir, rank, flags, inputs)  # 1 generate (the start model)
    pairs, stats = label_stage(args, it_dir, run_dir, rank, flags)          # 2 judge, 3 label
    args.pairs_sha256 = stages.sha256_json(pairs)  # in TRAINING_KEYS: a checkpoint never resumes on other pairs
    if rank == 0:
        stages.begin(it_dir, "train", flags["train"], {"pairs": args.pairs_sha256})
    t_train = time.time()
    rows = train(args, policy, reference, tokenizer, pairs, it_dir, device, rank, world)  # 4 train

    save_dtype = models.pick_dtype(device, args.dtype)
    if args.dist == "fsdp":  # 5 save: a collective gather of the shards onto rank 0
        distributed.save_full_model(policy, tokenizer, it_dir / "model", save_dtype)
    if rank == 0:  # 5 save
        if args.dist != "fsdp":
            models.save_model(policy.to(save_dtype), tokenizer, it_dir / "model")
        data.write_json(it_dir / "summary.json", ckpt.summarize(args, pairs, stats, rows, time.time() - t_train,
                                                                time.time() - t_start))
        if not args.keep_checkpoint:
            (it_dir / "checkpoint" / "state.pt").unlink(missing_ok=True)
            distributed.remove_sharded(it_dir / "checkpoint" / "state.pt")
        ckpt.print_summary(it_dir)
    ckpt.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("train.py: interrupted; rerun the same command to resume from the last checkpoint")
    except (ValueError, OSError) as e:  # user input rejected by a library function (bad record, file, judge setting)
        raise SystemExit("train.py: " + " ".join(str(e).split())) from None
