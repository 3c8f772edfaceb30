"""Performance benchmarks, printed as ratios measured side by side in one run.

    python -m bench [--json] [--only NAME ...] [--device cpu|cuda] [--rounds N] [--no-compile]

Each benchmark in BENCHMARKS is a function (device) -> dict of ratios; it prints its raw numbers as it
goes. With --json the last line printed is one JSON object {"<benchmark>.<ratio>": value, ...}.
Add a benchmark by writing such a function and adding it to BENCHMARKS.

Notation as in loss.py: B sequences, T tokens, V vocabulary, d hidden size, N answer tokens.

* noisy_logps: noisy_sequence_logps (chunked, checkpointed) against a naive implementation holding full
  (N, V) tensors, forward + backward with generator_grad=True (the noise term of Eq. 9). Peak memory is
  the peak *extra* memory over the inputs already in memory: on CUDA torch.cuda.max_memory_allocated
  minus the memory allocated before the call; on CPU (where torch has no allocator statistics) each
  variant runs in its own subprocess and reports its peak resident set size (the kernel's high-water mark,
  reset before the call: training.PeakRSS; it includes transient buffers) minus the RSS before it; a small
  warm-up call first pages in torch's kernels (else ~80 MiB of library code counts as "memory"), and
  glibc is told to mmap every block ≥ 64 KiB (MALLOC_MMAP_THRESHOLD_) so freed blocks leave the RSS.
* dnpo_step: one optimizer step of DNPO (reference forward with hidden states, policy forward/backward,
  ε₁ pass, ε₂ pass with grad, generator step) against one SPIN step on the same batch and model, a
  small random Llama. The generator costs about as much as the LM head (both d×V), so the overhead ratio
  grows with the head's share of the model's compute: far larger for a tiny model than for a 7B one.
* judge_throughput: records/s of judge.judge_records with the openai judge against a loopback
  chat-completions server (tests/fakechat.FakeChat, in its own process) that waits a fixed latency before each
  reply, at concurrency 1 and 16, fresh cache each run; ratios: c16 over c1, and each level's fraction of
  the latency-bound ideal (concurrency / (2 requests × latency) records/s).

* train_step_vs_trl, iteration_speedup, memory_and_noise, flop_utilization, generation, cpu_bf16, profile,
  noise_diagnostics (a DNPO step with the per-step noise diagnostics against one without), finite_check
  (train.py's finiteness check of the weights after each optimizer step, against the step):
  on the demo workload (SmolLM2-135M, 32 demo pairs, as `train.py --preset demo`); described in
  bench/perf.py, the shared harness (train.py's step, the TRL adapter, peak-RSS child processes) in
  bench/training.py. --rounds sets their interleaved rounds (default 3). train_step_vs_trl needs
  `pip install -r requirements-bench.txt` (TRL) and is skipped without it.

Departures / choices:
1. Timings are medians of a few repeats after a warm-up on whatever machine runs this; the CPU figures
   in the notes were taken on 2 shared cores and are noisy.
2. The naive noise reference draws one (N, V) ε from one generator, so its numbers differ from the
   chunked ones (same distribution); only time and memory are compared here, equality is tested in
   test_noise.py.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import errors
from bench import perf, training
from noise import NoiseGenerator, noisy_sequence_logps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: `python -m bench` runs there
SIZES = {  # noisy_logps sizes per device: CUDA gets the paper's 7B setting (d = 4096, V = 32000, T = 1024)
    "cpu": dict(batch=4, length=384, prompt=96, vocab=32000, hidden=64, chunk=128),
    "cuda": dict(batch=8, length=1024, prompt=256, vocab=32000, hidden=4096, chunk=256),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_times(fns, device, repeats=3):
    """Median seconds of each fn, run in turns (a, b, a, b, ...) after one warm-up each, so that load
    from other processes on a shared machine falls on all of them alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]



# --- noisy_logps: chunked + checkpointed vs naive full (N, V)

def naive_noisy_sequence_logps(ref_logits, ref_hidden, labels, generator, rng=None):
    """Eq. 5–6 on all N answer tokens at once: several (N, V) tensors live until backward."""
    logits, hidden, labels = ref_logits[:, :-1].detach(), ref_hidden[:, :-1].detach(), labels[:, 1:]
    rows, cols = (labels != -100).nonzero(as_tuple=True)  # (N,)
    z = logits[rows, cols].float()  # (N, V)
    variance = generator(hidden[rows, cols]).float()  # (N, V)
    eps = torch.randn(z.shape, generator=rng, device=z.device)  # (N, V)
    noisy = z + variance.sqrt() * eps
    token_logps = noisy.gather(1, labels[rows, cols].unsqueeze(1)).squeeze(1) - torch.logsumexp(noisy, -1)
    return torch.zeros(labels.shape[0], device=z.device).index_add(0, rows, token_logps), variance.mean()


def noisy_inputs(device, batch, length, prompt, vocab, hidden, chunk):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, length, vocab, generator=g).to(device)  # (B, T, V)
    states = torch.randn(batch, length, hidden, generator=g).to(device)  # (B, T, d)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[:, :prompt] = -100
    for b in range(batch):  # ragged right padding
        labels[b, length - b * 16:] = -100
    torch.manual_seed(0)
    generator = NoiseGenerator(hidden, vocab, init_std=0.01).to(device)
    return logits, states, labels.to(device), generator


def noisy_variant(variant, device, inputs, chunk):
    """A closure running forward + backward of one variant once."""
    logits, states, labels, generator = inputs

    def run():
        generator.zero_grad(set_to_none=True)
        if variant == "chunked":
            out, variance = noisy_sequence_logps(logits, states, labels, generator, True, chunk_size=chunk,
                                                 return_variance=True)
        else:
            out, variance = naive_noisy_sequence_logps(logits, states, labels, generator)
        (out.sum() + variance).backward()
    return run


def peak_extra_memory(variant, device):
    """Peak extra bytes of one forward + backward of a variant, measured in this process."""
    size = SIZES[device.type]
    warm = dict(size, length=size["prompt"] + 2 * size["batch"] * 16)  # a few answer tokens per row
    noisy_variant(variant, device, noisy_inputs(device, **warm), size["chunk"])()  # page in kernels and libraries
    run = noisy_variant(variant, device, noisy_inputs(device, **size), size["chunk"])
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    rss = training.PeakRSS().start()  # not ru_maxrss alone: it starts at the parent's RSS at fork
    run()
    return rss.stop()["extra"]


def bench_noisy_logps(device, repeats=2):
    size = SIZES[device.type]
    peaks = {}
    for variant in ("chunked", "naive"):
        if device.type == "cuda":
            peaks[variant] = peak_extra_memory(variant, device)
        else:  # ru_maxrss is a per-process high-water mark: one fresh process per variant
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**16))  # glibc: blocks ≥ 64 KiB go back on free
            proc = subprocess.run([sys.executable, "-m", "bench", "--child", variant, "--device", "cpu"],
                                  capture_output=True, text=True, env=env, cwd=ROOT)
            if proc.returncode != 0:
                raise SystemExit(f"bench child {variant!r} failed: {proc.stderr.strip().splitlines()[-1:]}")
            peaks[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    inputs = noisy_inputs(device, **size)  # timings in this process, without the malloc setting
    seconds = dict(zip(("chunked", "naive"), interleaved_times(
        [noisy_variant(v, device, inputs, size["chunk"]) for v in ("chunked", "naive")], device, repeats)))
    n_tokens = int((inputs[2][:, 1:] != -100).sum())
    print(f"noisy_logps | {device.type} | B {size['batch']} T {size['length']} V {size['vocab']} "
          f"d {size['hidden']} N {n_tokens} chunk {size['chunk']} | one (N, V) fp32 tensor = "
          f"{n_tokens * size['vocab'] * 4 / 2**20:.0f} MiB, one (chunk, V) = {size['chunk'] * size['vocab'] * 4 / 2**20:.0f} MiB")
    for variant in ("chunked", "naive"):
        print(f"  {variant:8s} peak extra memory {peaks[variant] / 2**20:8.1f} MiB | fwd+bwd {seconds[variant] * 1e3:8.1f} ms")
    return {"peak_memory_ratio_chunked_over_naive": peaks["chunked"] / max(peaks["naive"], 1),
            "time_ratio_chunked_over_naive": seconds["chunked"] / seconds["naive"]}


# --- dnpo_step: one DNPO optimizer step vs one SPIN step

def tiny_llama(device, vocab=32000, hidden=128, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(device)


def bench_dnpo_step(device, pairs=2, length=96, prompt=24, repeats=2):
    """train.py's own optimizer step (training.OurRun: train.setup, train.optimizer_step) of DNPO against SPIN's on
    the same random pairs of a random Llama whose LM head is large (V = 32000, d = 128)."""
    w = training.SyntheticWorkload(tiny_llama(device), pairs=pairs, length=length, prompt=prompt, device=device)
    spin, dnpo = training.OurRun(w, noise="none"), training.OurRun(w, noise="trainable")
    idx = list(range(pairs))
    spin_s, dnpo_s = interleaved_times([lambda: spin.step(idx), lambda: dnpo.step(idx)], device, repeats)
    n_policy = sum(p.numel() for p in w.model.parameters())
    n_generator = sum(p.numel() for p in dnpo.noise_net.parameters())
    hidden, vocab = w.model.config.hidden_size, w.model.config.vocab_size
    print(f"dnpo_step | {device.type} | tiny Llama {n_policy / 1e6:.1f}M params (LM head "
          f"{hidden * vocab / 1e6:.1f}M), generator {n_generator / 1e6:.1f}M | {pairs} pairs × T {length}")
    print(f"  spin {spin_s * 1e3:8.1f} ms/step | dnpo {dnpo_s * 1e3:8.1f} ms/step")
    return {"time_ratio_dnpo_over_spin": dnpo_s / spin_s,
            "generator_params_over_policy_params": n_generator / n_policy}


def _serve_fake_chat(latency, conn):
    """Run tests/fakechat.FakeChat in this (spawned) process until told to stop."""
    from tests.fakechat import FakeChat
    fake = FakeChat(latency=latency)
    conn.send(fake.url)
    conn.recv()
    fake.close()


def bench_judge_throughput(device, records=64, latency=0.05, concurrencies=(1, 16)):
    """records/s of the openai judge at each concurrency against a loopback server with added latency."""
    import multiprocessing
    import tempfile

    import judge
    from tests.fakechat import FAKE_KEY, records as make_records
    os.environ.setdefault("OPENAI_API_KEY", FAKE_KEY)  # a fake key for the fake server; never a real one
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_serve_fake_chat, args=(latency, child), daemon=True)
    server.start()
    rates = {}
    try:
        url = parent.recv()
        for c in concurrencies:
            with tempfile.TemporaryDirectory() as d:
                j = judge.make_judge("openai", model="bench", base_url=url, concurrency=c,
                                     cache_path=os.path.join(d, "cache.jsonl"))
                t0 = time.perf_counter()
                judge.judge_records(make_records(records), j, os.path.join(d, "judged.jsonl"), progress=False)
                rates[c] = records / (time.perf_counter() - t0)
            print(f"judge_throughput | concurrency {c:>3} | {rates[c]:7.1f} records/s | latency {latency * 1000:.0f} ms")
    finally:
        parent.send("stop")
        server.join(10)
    lo, hi = concurrencies
    ideal = lambda c: c / (2 * latency)  # noqa: E731  records/s if only latency mattered
    return {f"records_per_s_c{hi}_over_c{lo}": rates[hi] / rates[lo],
            f"c{lo}_fraction_of_ideal": rates[lo] / ideal(lo), f"c{hi}_fraction_of_ideal": rates[hi] / ideal(hi)}


BENCHMARKS = {"noisy_logps": bench_noisy_logps, "dnpo_step": bench_dnpo_step,
              "judge_throughput": bench_judge_throughput,
              # on the demo workload (SmolLM2-135M, 32 demo pairs): bench/training.py, bench/perf.py
              "train_step_vs_trl": perf.bench_train_step_vs_trl,
              "iteration_speedup": perf.bench_iteration_speedup,
              "memory_and_noise": perf.bench_memory_and_noise,
              "flop_utilization": perf.bench_flop_utilization,
              "generation": perf.bench_generation,
              "cpu_bf16": perf.bench_cpu_bf16,
              "profile": perf.bench_profile,
              "noise_diagnostics": perf.bench_noise_diagnostics,
              "finite_check": perf.bench_finite_check}
WORKLOAD_BENCHMARKS = ("train_step_vs_trl", "iteration_speedup", "memory_and_noise", "flop_utilization", "generation",
                       "cpu_bf16", "profile", "noise_diagnostics", "finite_check")  # these take spec= (training.WORKLOAD overrides)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object of ratios as the last line")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these benchmarks (default: all)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="device (default: cuda if available, else cpu)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds of the demo-workload benchmarks (default 3)")
    parser.add_argument("--no-compile", action="store_true", help="cpu_bf16: skip the torch.compile timing (minutes)")
    parser.add_argument("--child", choices=["chunked", "naive"], help=argparse.SUPPRESS)  # internal: one CPU memory probe
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.child:
        print(json.dumps(peak_extra_memory(args.child, device)))
        return
    ratios = {}
    try:
        for name in args.only or BENCHMARKS:
            kwargs = {"spec": dict(rounds=args.rounds)} if args.rounds and name in WORKLOAD_BENCHMARKS else {}
            if name == "cpu_bf16" and args.no_compile:
                kwargs["compile"] = False
            for key, value in BENCHMARKS[name](device, **kwargs).items():
                ratios[f"{name}.{key}"] = round(value, 4)
    except errors.Refusal as e:  # a module's refusal (the embedded model's package missing, ...); a bug: traceback
        raise SystemExit(errors.one_line("bench", e)) from None
    print("ratios: " + ", ".join(f"{k} {v}" for k, v in ratios.items()))
    if args.json:
        print(json.dumps(ratios))


if __name__ == "__main__":
    main()
