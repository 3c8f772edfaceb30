"""Training and generation benchmarks on the demo workload (training.WORKLOAD), registered in bench/run.py.

* train_step_vs_trl: our SPIN step (train.py's fast path: reference once per iteration in
  step.ReferenceCache, step.PolicyLogps, step.cached_batch_loss with noise none, length-grouped batches;
  also on random batches, as TRL samples them) against TRL's DPOTrainer (sigmoid loss, same model, pairs,
  batch, RMSprop, fp32, gradient checkpointing off as in the demo preset) with precompute_ref_log_probs
  off and on. Each round runs one epoch per variant on a fresh copy of the model; step time = the
  epoch's wall time over its steps (data collation included on both sides); the reference precompute is
  timed on its own and also amortised over an iteration (2 epochs). Peak RSS: each variant in its own
  process, one epoch after a one-batch warm-up (training.PeakRSS).
* iteration_speedup: train.train (the real loop, with the demo preset's checkpoints and logps.jsonl)
  twice on the same pairs, the new path against `--no-precompute-ref --no-group-by-length`, and the
  padding fraction of the epochs' micro-batches without and with length grouping.
* memory_and_noise: peak RSS of one epoch of the new path against the old one (own processes,
  training.PeakRSS), and a fast-path DNPO step (noise trainable) against a fast-path SPIN step.
* flop_utilization: useful model FLOP/s of a training step over this machine's measured matmul rate
  (torch.mm of 2048², same run): 6·N per real token for the policy's forward + backward, 2·N per real
  token for the reference once per iteration (amortised over the epochs, with its time); N = the model's
  parameters (tied embeddings once: the lm_head matmul, not the lookup); attention's T² term ignored.
* generation: generate.generate_answers tokens/s (new tokens up to EOS), 32 prompts in batches of 16
  against one at a time, greedy, 32 new tokens.
* cpu_bf16: the fast-path step with bf16 autocast (reference in bf16, as `--dtype bf16`) against fp32;
  agreement over a few lockstep steps from the same weights; torch.compile of step.PolicyLogps.
* profile: where one fast-path DNPO step's time goes (training.Timer around each part).
"""
import contextlib
import copy
import pathlib
import statistics
import tempfile
import time

import torch

import demo
import distributed
import generate
import model as models
import noise as noises
import packing
import sampler
import train
from bench.training import OurRun, Timer, _mib, child_peaks, trl_available, trl_trainer, workload


def _interleaved_epochs(w, variants, rounds=None):
    """{name: (median seconds per step, median precompute seconds)}: each round runs one epoch of every
    variant (a fresh OurRun from OurRun kwargs) in turn, the order reversed every other round, so load from
    other processes falls on all alike. One untimed step of each variant first: the process's first steps are
    slower (allocator, kernel set-up), which would otherwise fall on the first variant's first epoch."""
    for kwargs in variants.values():
        run = OurRun(w, **kwargs)
        run.step(run.micro_batches(0)[0])
        del run
    times = {name: ([], []) for name in variants}
    for r in range(rounds or w.spec["rounds"]):
        for name, kwargs in list(variants.items())[::1 if r % 2 == 0 else -1]:  # ABBA order
            run = OurRun(w, **kwargs)
            times[name][0].append(run.epoch() / w.steps_per_epoch)
            times[name][1].append(run.precompute_s)
            del run
    return {name: (statistics.median(s), statistics.median(p)) for name, (s, p) in times.items()}


# ----------------------------------------------------------------------------- train_step_vs_trl
def bench_train_step_vs_trl(device, spec=None, memory=True):
    """Our fast-path SPIN step against TRL's DPOTrainer, precompute_ref_log_probs off and on."""
    if not trl_available():
        print("train_step_vs_trl | skipped: trl is not installed (pip install -r requirements-bench.txt)")
        return {}
    import transformers
    import trl
    w = workload(device, spec)
    spe, epochs = w.steps_per_epoch, w.spec["epochs"]
    names = ("ours", "ours_padded", "ours_random", "trl_off", "trl_on")  # ours_padded: --no-pack-pairs;
    # ours_random: our step on random (TRL-like) batches
    step_s, pre_s = {v: [] for v in names}, {v: [] for v in names}
    for r in range(w.spec["rounds"]):
        for v in names if r % 2 == 0 else names[::-1]:  # a, b, c, d, then d, c, b, a: drifting load falls alike
            if v.startswith("ours"):
                run = OurRun(w, group=v != "ours_random", pack=v != "ours_padded")
                step_s[v].append(run.epoch() / spe)
                pre_s[v].append(run.precompute_s)
                del run
                continue
            with tempfile.TemporaryDirectory() as d:
                trainer = trl_trainer(w, v == "trl_on", d)
                trainer.train()
                ends = trainer.step_ends
                if len(ends) != spe + 1:
                    raise RuntimeError(f"TRL ran {len(ends) - 1} steps, expected {spe}")
                step_s[v].append((ends[-1] - ends[0]) / spe)
                pre_s[v].append(trainer.precompute_s)
                del trainer
    med = {v: statistics.median(step_s[v]) for v in names}
    pre = {v: statistics.median(pre_s[v]) for v in names}
    amort = {v: med[v] + pre[v] / (spe * epochs) for v in names}
    print(f"train_step_vs_trl | {device.type} | {w.spec['model']} fp32 {w.n_params / 1e6:.1f}M params | "
          f"{len(w.examples)} pairs, batch {w.spec['batch_size']}, {spe} steps/epoch, {w.tokens} real tokens/epoch | "
          f"trl {trl.__version__}, transformers {transformers.__version__} | {w.spec['rounds']} interleaved rounds, "
          f"torch threads {torch.get_num_threads()}")
    for v in names:
        print(f"  {v:11s} step {med[v] * 1e3:8.0f} ms | {w.tokens / (med[v] * spe):7.0f} tok/s | reference precompute "
              f"{pre[v]:6.2f} s | amortised over {epochs} epochs {amort[v] * 1e3:8.0f} ms/step "
              f"({w.tokens / (amort[v] * spe):6.0f} tok/s)")
    out = {"step_time_ratio_ours_over_trl_off": amort["ours"] / amort["trl_off"],
           "step_time_ratio_ours_over_trl_on": med["ours"] / med["trl_on"],
           "amortised_step_time_ratio_ours_over_trl_on": amort["ours"] / amort["trl_on"],
           "step_time_ratio_ours_random_order_over_trl_on": med["ours_random"] / med["trl_on"],
           "step_time_ratio_ours_unpacked_over_trl_on": med["ours_padded"] / med["trl_on"]}
    if memory:
        names = ("ours", "trl_off", "trl_on")
        peaks = child_peaks(names, w)
        for v in names:
            print(f"  {v:11s} peak RSS {_mib(peaks[v]['peak'])} | extra over the loaded model {_mib(peaks[v]['extra'])}")
        out.update({f"peak_extra_rss_ratio_ours_over_{v}": peaks["ours"]["extra"] / peaks[v]["extra"] for v in names[1:]})
        out.update({f"peak_rss_ratio_ours_over_{v}": peaks["ours"]["peak"] / peaks[v]["peak"] for v in names[1:]})
    return out


# ----------------------------------------------------------------------------- iteration_speedup
def train_args(w, run_dir, fast):
    """train.py's args for --preset demo on this workload; fast=False: --no-precompute-ref --no-group-by-length."""
    s = w.spec
    flags = ["--precompute-ref", "--group-by-length"] if fast else ["--no-precompute-ref", "--no-group-by-length"]
    args = train.parse_args(["--iter", "0", "--preset", "demo", "--run-dir", str(run_dir), "--max-prompts",
                             str(len(w.pairs)), "--epochs", str(s["epochs"]), "--batch-size", str(s["batch_size"]),
                             "--optimizer", "rmsprop", "--lr", str(s["lr"]), "--max-length", str(s["max_length"]),
                             "--max-prompt-length", str(s["max_prompt_length"]), "--device", w.device.type] + flags)
    return train.RunState(world_size=1, start_model=s["model"]).over(args)


def padding_fractions(w, seed=0):
    """Mean padding fraction of train.py's micro-batches over the epochs: two padded rows per pair in random
    order (the old path) and length-grouped, and packed rows (packing.py) length-grouped, with the
    positions of each over the old path's (train.py's data seed for --iter 0: seed + 7919 · 0)."""
    b, n, out, counts = w.spec["batch_size"], len(w.examples), {}, {}
    for name, group, packed in (("random", False, False), ("grouped", True, False), ("packed", True, True)):
        lengths = [packing.row_length(e, packed) for e in w.examples]
        fractions, counts[name] = [], 0
        for epoch in range(w.spec["epochs"]):
            order = sampler.epoch_order(n, seed, epoch)
            order = sampler.length_grouped_order(order, lengths, b, seed, epoch) if group else order
            batches = sampler.rank_microbatches(order, 0, 1, b)
            fractions.append(packing.padding_fraction(batches, w.examples, packed))
            counts[name] += packing.positions(batches, w.examples, packed)[0]
        out[name] = statistics.mean(fractions)
        out[f"{name}_positions_over_random"] = counts[name] / counts["random"]
    return out


def bench_iteration_speedup(device, spec=None):
    w = workload(device, spec)
    seconds, loop = {}, {}
    with tempfile.TemporaryDirectory() as d:
        for fast in (True, False):
            args = train_args(w, pathlib.Path(d) / str(fast), fast)
            it_dir = pathlib.Path(args.run_dir) / "iter0"
            it_dir.mkdir(parents=True)
            policy = copy.deepcopy(w.model)
            reference = copy.deepcopy(policy).to(models.pick_dtype(device, args.dtype)).eval().requires_grad_(False)
            t0 = time.perf_counter()
            with open(it_dir / "train.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                rows = train.train(args, policy, reference, w.tokenizer, w.pairs, it_dir, device, 0, 1)
            seconds[fast] = time.perf_counter() - t0
            loop[fast] = rows[-1]["time_s"]  # train.train's clock starts after the reference cache is built
            if len(rows) != w.steps_per_epoch * w.spec["epochs"]:
                raise RuntimeError(f"train.train ran {len(rows)} steps, expected {w.steps_per_epoch * w.spec['epochs']}")
            del policy, reference
    pad = padding_fractions(w)
    print(f"iteration_speedup | {device.type} | train.train, demo preset: {len(w.examples)} pairs, {w.spec['epochs']} "
          f"epochs, batch {w.spec['batch_size']} ({len(rows)} steps), checkpoints and logps.jsonl included")
    print(f"  new path (precompute + grouping) {seconds[True]:7.1f} s | old path {seconds[False]:7.1f} s")
    print(f"  of which the step loop (first step to the last step's metrics row, the saves between included): new "
          f"{loop[True]:7.1f} s | old {loop[False]:7.1f} s; the rest: tokenization, reference cache (new path), "
          f"logps.jsonl passes, the last checkpoint")
    print(f"  padding fraction of the micro-batches: random order {pad['random']:.3f} | length-grouped {pad['grouped']:.3f} "
          f"| packed, length-grouped {pad['packed']:.3f}; positions over the random order's: grouped "
          f"{pad['grouped_positions_over_random']:.3f} | packed {pad['packed_positions_over_random']:.3f}")
    return {"speedup_old_over_new": seconds[False] / seconds[True], "loop_speedup_old_over_new": loop[False] / loop[True],
            "padding_fraction_random": pad["random"],
            "padding_fraction_grouped": pad["grouped"], "padding_fraction_packed": pad["packed"],
            "positions_ratio_packed_over_random": pad["packed_positions_over_random"]}


# ----------------------------------------------------------------------------- memory_and_noise
def bench_memory_and_noise(device, spec=None, memory=True):
    w = workload(device, spec)
    t = _interleaved_epochs(w, {"spin": dict(noise="none"), "dnpo": dict(noise="trainable")})
    (spin, spin_pre), (dnpo, dnpo_pre) = t["spin"], t["dnpo"]
    print(f"memory_and_noise | {device.type} | {w.spec['model']} | {len(w.examples)} pairs, batch {w.spec['batch_size']}")
    print(f"  fast path: spin {spin * 1e3:8.0f} ms/step (precompute {spin_pre:5.2f} s) | dnpo, noise trainable "
          f"{dnpo * 1e3:8.0f} ms/step (precompute with hidden states {dnpo_pre:5.2f} s)")
    out = {"time_ratio_dnpo_over_spin": dnpo / spin}
    if memory:
        peaks = child_peaks(("ours", "old"), w)
        for v, name in (("ours", "new path"), ("old", "old path")):
            print(f"  {name} peak RSS {peaks[v]['peak'] / 2 ** 20:7.0f} MiB | extra over the loaded model "
                  f"{peaks[v]['extra'] / 2 ** 20:7.0f} MiB")
        out.update(peak_extra_rss_ratio_new_over_old=peaks["ours"]["extra"] / peaks["old"]["extra"],
                   peak_rss_ratio_new_over_old=peaks["ours"]["peak"] / peaks["old"]["peak"])
    return out


def bench_noise_diagnostics(device, spec=None):
    """The cost of the noise diagnostics (step.DIAGNOSTICS): a DNPO step with them against one without,
    interleaved epochs on the demo workload; the goal is ≤ 1.03. Also, less moved by other load (the 2%
    effect is below the epochs' noise on a shared CPU): their own CPU time, noise.noisy_answer_logps_pair
    (the only part they touch; nothing of them in backward) with and without stats on each micro-batch,
    alternating, over the CPU time of a step without them on the same batch: 1 + the median of that share."""
    w = workload(device, spec)
    t = _interleaved_epochs(w, {"with": dict(noise="trainable"), "without": dict(noise="trainable", diagnostics=False)})
    (on, _), (off, _) = t["with"], t["without"]
    run, extra, share = OurRun(w, noise="trainable", diagnostics=False), [], []
    weight, bias = run.cache.head
    for r in range(w.spec["rounds"]):
        for idx in run.micro_batches(r):
            batch = packing.collate(run.pack)([w.examples[i] for i in idx], w.tokenizer.pad_token_id)
            h, targets, seq_ids = run.cache.rejected_tokens(idx, {k: v.to(device) for k, v in batch.items()})
            cpu = {}
            for stats in ({}, None) if r % 2 == 0 else (None, {}):
                c0 = time.process_time()
                noises.noisy_answer_logps_pair(h, targets, seq_ids, len(idx), weight, run.noise_net, head_bias=bias,
                                               chunk_size=run.objective.chunk_size, rng=run.noise_rng, stats=stats)
                cpu[stats is not None] = time.process_time() - c0
            c0 = time.process_time()
            run.step(idx)
            extra.append(cpu[True] - cpu[False])
            share.append(extra[-1] / (time.process_time() - c0))
    print(f"noise_diagnostics | {device.type} | {w.spec['model']} | {len(w.examples)} pairs, batch "
          f"{w.spec['batch_size']}: dnpo step with diagnostics {on * 1e3:8.0f} ms, without {off * 1e3:8.0f} ms | "
          f"their CPU time {statistics.median(extra) * 1e3:6.1f} ms per step, {statistics.median(share):.2%} of a step")
    return {"time_ratio_with_over_without": on / off, "cpu_time_ratio_with_over_without": 1 + statistics.median(share)}


# ----------------------------------------------------------------------------- finite_check
def bench_finite_check(device, spec=None):
    """The cost of train.py's finiteness check after every optimizer step (distributed.all_finite over the
    policy's and the noise network's weights: one fused max-|x|): its time against a DNPO step's on the demo
    workload, measured alternately on each micro-batch in one process; the goal is ≤ 1 % of a step (issue 26).
    Also the check over the optimizer's state, which train.py runs only before writing a checkpoint."""
    w = workload(device, spec)
    run = OurRun(w, noise="trainable")
    weights = [*run.policy.parameters(), *run.noise_net.parameters()]
    step_s, check_s, state_s = [], [], []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for r in range(w.spec["rounds"]):
        for idx in run.micro_batches(r):
            sync()
            t0 = time.perf_counter()
            run.step(idx)
            sync()
            t1 = time.perf_counter()
            assert distributed.all_finite(weights)
            t2 = time.perf_counter()
            assert distributed.all_finite(distributed.state_tensors(run.optimizer.state))
            step_s.append(t1 - t0)
            check_s.append(t2 - t1)
            state_s.append(time.perf_counter() - t2)
    step, check, state = (statistics.median(x) for x in (step_s, check_s, state_s))
    n = sum(p.numel() for p in weights)
    print(f"finite_check | {device.type} | {w.spec['model']} | {n / 1e6:.0f} M weights: dnpo step {step * 1e3:8.0f} ms, "
          f"check after it {check * 1e3:6.1f} ms ({check / step:.2%}); optimizer state at a checkpoint "
          f"{state * 1e3:6.1f} ms")
    return {"time_ratio_step_with_check_over_without": 1 + check / step,
            "checkpoint_state_check_over_step": state / step}


# ----------------------------------------------------------------------------- flop_utilization
def matmul_flops(device, dtype, n=2048, repeats=5):
    """FLOP/s of torch.mm on (n, n) matrices: 2n³ over the median of `repeats` timed calls after one warm-up."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times[1:])


def step_flops(n_params, tokens, epochs):
    """Useful FLOPs of one epoch: 6·N per real token (policy forward + backward) + 2·N per real token for the
    reference, run once per iteration of `epochs` epochs (its share of one epoch)."""
    return 6 * n_params * tokens + 2 * n_params * tokens / epochs


def bench_flop_utilization(device, spec=None, mm_size=2048):
    w = workload(device, spec)
    epochs, spe = w.spec["epochs"], w.steps_per_epoch
    peak = {"fp32": matmul_flops(device, torch.float32, mm_size), "bf16": matmul_flops(device, torch.bfloat16, mm_size)}
    t = _interleaved_epochs(w, {"fp32": dict(dtype="fp32"), "bf16": dict(dtype="bf16")})
    flops = step_flops(w.n_params, w.tokens, epochs)
    print(f"flop_utilization | {device.type} | torch.mm {mm_size}²: fp32 {peak['fp32'] / 1e9:6.1f} GFLOP/s, bf16 "
          f"{peak['bf16'] / 1e9:6.1f} GFLOP/s | {w.n_params / 1e6:.1f}M params, {w.tokens} real tokens/epoch, "
          f"{flops / spe / 1e12:.2f} TFLOP/step (reference amortised over {epochs} epochs)")
    out = {}
    for dtype, (step_s, pre_s) in t.items():
        seconds = step_s * spe + pre_s / epochs  # one epoch plus its share of the reference precompute
        rate = flops / seconds
        print(f"  {dtype}: {step_s * 1e3:8.0f} ms/step, precompute {pre_s:5.2f} s | {rate / 1e9:6.1f} GFLOP/s useful = "
              f"{rate / peak[dtype]:.3f} of the {dtype} matmul rate")
        out[f"{dtype}_fraction_of_matmul_peak"] = rate / peak[dtype]
    out["bf16_matmul_peak_over_fp32"] = peak["bf16"] / peak["fp32"]
    return out


# ----------------------------------------------------------------------------- generation
def bench_generation(device, spec=None, prompts=32, batch=16, new_tokens=32):
    """Batch `batch` (ended rows evicted, generate.py's default) over one prompt at a time; also batch `batch` through
    one model.generate call per batch (evict_finished=False, ended rows kept: the old path), printed beside it
    with the share of decode row-steps each spends on rows that have already ended."""
    w = workload(device, spec)
    records = demo.demo_records("train", n=prompts)
    runs = {"generate": (batch, False), "evict": (batch, True), "single": (1, True)}
    stats, answers = {}, {}
    with tempfile.TemporaryDirectory() as d:
        for name, (bs, evict) in runs.items():
            stats[name] = {}
            rows = generate.generate_answers(w.model, w.tokenizer, records, f"{d}/{name}.jsonl", max_new_tokens=new_tokens,
                                             batch_size=bs, stats=stats[name], evict_finished=evict)
            answers[name] = [r["generated"] for r in rows]
    same = {name: sum(a == b for a, b in zip(answers[name], answers["single"])) / prompts for name in ("evict", "generate")}
    same_old_new = sum(a == b for a, b in zip(answers["evict"], answers["generate"])) / prompts
    print(f"generation | {device.type} | {w.spec['model']} | {prompts} prompts, ≤ {new_tokens} new tokens, greedy")
    for name, label in (("evict", f"batch {batch:3d}, ended rows evicted"), ("generate", f"batch {batch:3d}, model.generate"),
                        ("single", "batch   1")):
        s = stats[name]
        wasted = s["finished_row_steps"] / max(s["decode_row_steps"], 1)
        print(f"  {label:34s}: {s['new_tokens']:5d} tokens in {s['seconds']:6.1f} s = {s['tokens_per_s']:7.1f} tokens/s "
              f"(/ batch 1: {s['tokens_per_s'] / stats['single']['tokens_per_s']:.2f}); decode row-steps "
              f"{s['decode_row_steps']}, {wasted:.3f} of them on ended rows")
    saved = stats["generate"]["decode_row_steps"] - stats["evict"]["decode_row_steps"]
    print(f"  evicted / model.generate at batch {batch}: {stats['evict']['tokens_per_s'] / stats['generate']['tokens_per_s']:.2f}x "
          f"tokens/s, {saved} decode row-steps saved ({saved / max(stats['generate']['decode_row_steps'], 1):.3f})")
    print(f"  identical answers batched vs one at a time: {same['evict']:.2f} (model.generate: {same['generate']:.2f}); "
          f"evicted vs model.generate: {same_old_new:.2f}")
    return {f"tokens_per_s_batch{batch}_over_batch1": stats["evict"]["tokens_per_s"] / stats["single"]["tokens_per_s"],
            "identical_answer_fraction": same["evict"]}


# ----------------------------------------------------------------------------- cpu_bf16
def lockstep_agreement(w, steps=3, dtype="bf16", fp32_head=True):
    """Max abs differences between fp32 and `dtype` runs from the same weights over the same micro-batches:
    reference log-probs (the cache), policy summed log-probs, margins and loss of each step. fp32_head: the
    `dtype` run's lm_head and log-softmax in fp32 (--fp32-head, the default) or in `dtype` (--no-fp32-head)."""
    runs = {"fp32": OurRun(w, dtype="fp32"), dtype: OurRun(w, dtype=dtype, fp32_head=fp32_head)}
    diff = dict(reference_logps=(runs["fp32"].cache.logps - runs[dtype].cache.logps).abs().max().item(),
                policy_logps=0.0, margin=0.0, loss=0.0)
    scale = runs["fp32"].cache.logps.abs().mean().item()
    for idx in runs["fp32"].micro_batches(0)[:steps]:
        seen, outs = {}, {}
        for d, run in runs.items():
            outs[d] = run.step(idx, policy_hook=lambda lp, d=d: seen.__setitem__(d, lp.float()))
        diff["policy_logps"] = max(diff["policy_logps"], (seen["fp32"] - seen[dtype]).abs().max().item())
        diff["margin"] = max(diff["margin"], (outs["fp32"]["margin"] - outs[dtype]["margin"].float()).abs().max().item())
        diff["loss"] = max(diff["loss"], abs(outs["fp32"]["loss"].item() - outs[dtype]["loss"].item()))
    return diff, scale


def compile_timing(w):
    """(eager s/step, compiled s/step after warm-up, compile s) of the fast path with torch.compile(PolicyLogps),
    or a one-line reason when compiling fails. The compile is cold: a fresh, temporary inductor cache
    directory (torch._inductor.utils.fresh_cache; a warm cache turned 226 s into 24 s here)."""
    try:
        from torch._inductor.utils import fresh_cache
        torch._dynamo.reset()
        compiled = OurRun(w, compile_policy=True)
        t0 = time.perf_counter()
        with fresh_cache():
            compiled.epoch(0)  # compiles, for each new shape
        first = time.perf_counter() - t0
        eager = OurRun(w)
        times = {"eager": [], "compiled": []}
        for _ in range(w.spec["rounds"]):
            for name, run in (("eager", eager), ("compiled", compiled)):
                times[name].append(run.epoch(0) / w.steps_per_epoch)  # the same shapes: no recompiles
        eager_s, compiled_s = statistics.median(times["eager"]), statistics.median(times["compiled"])
        return eager_s, compiled_s, first - compiled_s * w.steps_per_epoch
    except Exception as e:  # noqa: BLE001  reported, not raised: compile support depends on the machine
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


def bench_cpu_bf16(device, spec=None, agree_steps=3, compile=True):
    """`--dtype bf16` (bf16 body, fp32 lm_head and log-softmax: loss.py departure 7) against fp32, and the old
    all-bf16 mode (`--no-fp32-head`) beside it: step time (interleaved epochs) and lockstep agreement. The keys
    without a prefix are those of the mode `--dtype bf16` means; `allbf16_` the old mode's. On a CPU without
    native bf16 (model.cpu_bf16_native: no AVX512-BF16/AMX) only the torch.mm rate ratio is measured and the
    rest is skipped with its reason: the reference GEMM PyTorch falls back to there makes a bf16 step many
    times slower than fp32 (minutes per step on 2 cores), which says nothing about bf16 on a machine that has it."""
    if device.type == "cpu" and not models.cpu_bf16_native():
        ratio = matmul_flops(device, torch.float32, 1024, repeats=3) / matmul_flops(device, torch.bfloat16, 1024, repeats=3)
        print(f"cpu_bf16 | cpu | skipped: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16 "
              f"matmul; torch.mm 1024² in bf16 takes {ratio:.1f}× the fp32 time here")
        return {"cpu_native_bf16": 0, "time_ratio_bf16_mm_over_fp32_mm": ratio}
    w = workload(device, spec)
    t = _interleaved_epochs(w, {"fp32": dict(dtype="fp32"), "bf16": dict(dtype="bf16"),
                                "allbf16": dict(dtype="bf16", fp32_head=False)})
    print(f"cpu_bf16 | {device.type} | {w.spec['model']} | fast-path SPIN step: fp32 {t['fp32'][0] * 1e3:.0f} ms, bf16 "
          f"body + fp32 head {t['bf16'][0] * 1e3:.0f} ms, all bf16 {t['allbf16'][0] * 1e3:.0f} ms | precompute fp32 "
          f"{t['fp32'][1]:.2f} s, bf16 {t['bf16'][1]:.2f} s, all bf16 {t['allbf16'][1]:.2f} s")
    out = {"cpu_native_bf16": 1, "time_ratio_bf16_over_fp32": t["bf16"][0] / t["fp32"][0],
           "time_ratio_allbf16_over_fp32": t["allbf16"][0] / t["fp32"][0]}
    for prefix, fp32_head in (("", True), ("allbf16_", False)):
        diff, scale = lockstep_agreement(w, agree_steps, fp32_head=fp32_head)
        print(f"  {'bf16 body + fp32 head' if fp32_head else 'all bf16'} vs fp32 over {agree_steps} lockstep steps, "
              f"max |Δ|: reference log-probs {diff['reference_logps']:.4f}, policy log-probs {diff['policy_logps']:.4f} "
              f"(mean |log-prob| {scale:.1f}; {diff['reference_logps'] / max(scale, 1e-12):.2%} / "
              f"{diff['policy_logps'] / max(scale, 1e-12):.2%}), margins {diff['margin']:.5f}, loss {diff['loss']:.6f}")
        out.update({f"{prefix}max_abs_diff_{k}": v for k, v in diff.items()})
        out[f"{prefix}max_rel_diff_reference_logps"] = diff["reference_logps"] / max(scale, 1e-12)
        out[f"{prefix}max_rel_diff_policy_logps"] = diff["policy_logps"] / max(scale, 1e-12)
    if compile:
        result = compile_timing(w)
        if isinstance(result, str):
            print(f"  torch.compile(PolicyLogps) failed: {result}")
        else:
            eager_s, compiled_s, compile_s = result
            print(f"  torch.compile(PolicyLogps): eager {eager_s * 1e3:.0f} ms/step, compiled {compiled_s * 1e3:.0f} ms/step "
                  f"after warm-up, compile time ≈ {compile_s:.1f} s")
            out.update(time_ratio_compiled_over_eager=compiled_s / eager_s, compile_seconds=compile_s)
    return out


# ----------------------------------------------------------------------------- profile
PARTS = ("collate", "policy_forward", "noise_forward", "loss", "backward", "optimizer")


def bench_profile(device, spec=None, steps=3, noise="trainable"):
    w = workload(device, spec)
    run = OurRun(w, noise=noise)
    batches = run.micro_batches(0)
    run.step(batches[-1])  # warm-up
    timer = Timer()
    batches = [batches[i % len(batches)] for i in range(steps)]
    for idx in batches:
        run.step(idx, timer)
    total = sum(timer.seconds.values())
    print(f"profile | {device.type} | {w.spec['model']} | fast-path step, noise {noise}, mean of {steps} steps: "
          f"{total / steps * 1e3:.0f} ms/step; reference precompute {run.precompute_s:.2f} s per iteration "
          f"({run.precompute_s / (w.steps_per_epoch * w.spec['epochs']) * 1e3:.0f} ms/step amortised)")
    print("  part              ms/step   share")
    for part in PARTS:
        s = timer.seconds.get(part, 0.0)
        print(f"  {part:16s} {s / steps * 1e3:8.1f}  {s / total:6.1%}")
    print("  (backward: the policy's and the generator's (ε₂) together; loss: reference lookup, Eq. 9, bookkeeping)")
    return {f"{part}_fraction": timer.seconds.get(part, 0.0) / total for part in PARTS}
