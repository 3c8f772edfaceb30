"""The harness of the demo-workload benchmarks in bench/perf.py (registered in bench/run.py's BENCHMARKS).

    python -m bench --only train_step_vs_trl [--rounds N]
    python -m bench.training --child VARIANT --spec JSON      # internal: one peak-RSS probe in its own process

Workload (WORKLOAD, as `train.py --preset demo`): the embedded SmolLM2-135M in fp32, the first 32 prompts
of the demo train split, chosen = the human answer, rejected = the model's own greedy answer (48 new
tokens, generated once with generate.py and kept in <tmp>/dnpo-bench/), max length 256, batch 8 pairs,
2 epochs, RMSprop lr 1e-6, gradient clipping 1.0, 3 interleaved rounds. Real tokens = the non-padding
positions (prompt + answer) of the chosen and rejected rows.

OurRun is train.py's own setup and optimizer step (train.setup, train.optimizer_step) on fresh model copies;
test_bench.py checks its first loss against train.train's. trl_trainer is TRL's DPOTrainer on the same pairs, fed our token ids: its _prepare_dataset
is skipped and prompt_ids/chosen_ids/rejected_ids come from data.tokenize_pair (trl_rows), so both see
exactly the same rows; TRL's own chat-template tokenization would add the newline that follows <|im_end|>.
PeakRSS measures one variant's peak memory in a child process.
"""
import argparse
import contextlib
import copy
import gc
import hashlib
import importlib.util
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import torch

import config
import data
import demo
import generate
import model as models
import noise as noises
import sampler
import train

WORKLOAD = dict(model="smollm2-135m", pairs=32, batch_size=8, epochs=2, lr=1e-6, max_length=256,
                max_prompt_length=128, max_new_tokens=48, gen_batch_size=16, rounds=3, pairs_file=None, cache_dir=None)


# ----------------------------------------------------------------------------- workload
def demo_pairs(model, tokenizer, spec):
    """spec["pairs"] demo pairs: chosen = human answer, rejected = the model's greedy answer, generated once
    and cached in spec["cache_dir"] or <tmp>/dnpo-bench/ (generate.generate_answers returns a complete file as is)."""
    records = demo.demo_records("train", n=spec["pairs"])
    key = hashlib.sha1(models.resolve_model(spec["model"]).encode()).hexdigest()[:10]
    cache = pathlib.Path(spec["cache_dir"] or pathlib.Path(tempfile.gettempdir()) / "dnpo-bench")
    path = cache / f"{key}-demo{spec['pairs']}-new{spec['max_new_tokens']}.jsonl"
    rows = generate.generate_answers(model, tokenizer, records, str(path), max_new_tokens=spec["max_new_tokens"],
                                     batch_size=spec["gen_batch_size"])
    return [dict(id=r["id"], prompt=r["prompt"], chosen=r["human"], rejected=r["generated"]) for r in rows]


class Workload:
    """The model (fp32), tokenizer, pairs and tokenized examples of one benchmark spec."""

    def __init__(self, spec, device):
        self.spec, self.device = dict(WORKLOAD, **spec), device
        self.model, self.tokenizer = models.load_model(self.spec["model"], device=device, dtype="fp32")
        s = self.spec
        self.pairs = data.read_jsonl(s["pairs_file"]) if s["pairs_file"] else demo_pairs(self.model, self.tokenizer, s)
        self.examples = [data.tokenize_pair(self.tokenizer, p, s["max_length"], s["max_prompt_length"]) for p in self.pairs]
        self.tokens = sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in self.examples)  # per epoch
        self.steps_per_epoch = sampler.steps_per_epoch(len(self.examples), 1, s["batch_size"], 1)
        self.n_params = sum(p.numel() for p in self.model.parameters())  # tied embeddings counted once

    def subset(self, n):
        """The same workload on its first n pairs (a shallow copy sharing the model)."""
        sub = copy.copy(self)
        sub.pairs, sub.examples = self.pairs[:n], self.examples[:n]
        sub.tokens = sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in sub.examples)
        sub.steps_per_epoch = sampler.steps_per_epoch(n, 1, self.spec["batch_size"], 1)
        return sub


_WORKLOADS = {}


def workload(device, spec=None):
    """The Workload of spec (default WORKLOAD), built once per process."""
    key = (json.dumps(spec or {}, sort_keys=True), str(device))
    if key not in _WORKLOADS:
        _WORKLOADS[key] = Workload(spec or {}, device)
    return _WORKLOADS[key]


class SyntheticWorkload:
    """Random token pairs for a given (random) model, in the form OurRun takes: `pairs` pairs of `length` tokens
    whose first `prompt` are a prompt both answers share, the rest random answers (labels -100 on the prompt)."""

    def __init__(self, model, pairs=2, length=96, prompt=24, device="cpu", seed=0):
        g = torch.Generator().manual_seed(seed)
        vocab = model.config.vocab_size
        self.model, self.device = model, torch.device(device)
        self.tokenizer = argparse.Namespace(pad_token_id=0)
        self.spec = dict(epochs=1, batch_size=pairs, lr=1e-7, max_length=length, max_prompt_length=prompt)
        self.examples = []
        for _ in range(pairs):
            prompt_ids = torch.randint(1, vocab, (prompt,), generator=g).tolist()
            example = {}
            for side in ("chosen", "rejected"):
                answer = torch.randint(1, vocab, (length - prompt,), generator=g).tolist()
                example[f"{side}_input_ids"] = prompt_ids + answer
                example[f"{side}_labels"] = [-100] * prompt + answer
            self.examples.append(example)


# ----------------------------------------------------------------------------- our step, as train.py runs it
class Timer:
    """Seconds per named section, summed over calls (the profile); NULL_TIMER times nothing."""

    def __init__(self, enabled=True):
        self.enabled, self.seconds = enabled, {}

    @contextlib.contextmanager
    def __call__(self, name):
        if not self.enabled:
            yield
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


NULL_TIMER = Timer(enabled=False)


class OurRun:
    """train.py's own training on fresh model copies: train.setup (noise network, reference cache, optimizer and
    schedule) and train.optimizer_step, under train.py's flags for this workload (run_args): RMSprop at the
    workload's lr without warmup, clipping 1.0, iteration 0's seeds and data order whatever the noise kind (so
    SPIN and DNPO variants see the same micro-batches); precompute=False / group=False / pack=False are
    `--no-precompute-ref / --no-group-by-length / --no-pack-pairs`, fp32_head=False `--no-fp32-head`. precompute_s: the seconds of train.setup
    (the reference cache, the rest is negligible)."""

    def __init__(self, w, noise="none", precompute=True, group=True, dtype="fp32", compile_policy=False, seed=0,
                 policy=None, pack=True, diagnostics=True, fp32_head=True):
        self.w, self.steps_taken = w, 0
        self.args = run_args(w, noise=noise, precompute=precompute, group=group, dtype=dtype, seed=seed, pack=pack,
                             fp32_head=fp32_head)
        policy = (policy if policy is not None else copy.deepcopy(w.model)).train()
        reference = copy.deepcopy(w.model).to(models.pick_dtype(w.device, dtype)).eval().requires_grad_(False)
        t0 = time.perf_counter()
        self.loop = train.setup(self.args, policy, reference, w.examples, w.tokenizer.pad_token_id,
                                pathlib.Path(tempfile.gettempdir()) / "dnpo-bench-run", w.device, progress=False)
        self.precompute_s = time.perf_counter() - t0
        self.loop.diagnostics = diagnostics
        if compile_policy:
            self.loop.model = torch.compile(self.loop.model)

    policy = property(lambda self: self.loop.policy)
    optimizer = property(lambda self: self.loop.optimizer)
    cache = property(lambda self: self.loop.cache)
    pack = property(lambda self: self.loop.pack)
    noise_net = property(lambda self: self.loop.noise_net)
    noise_rng = property(lambda self: self.loop.noise_rng)
    objective = property(lambda self: self.loop.objective)

    def micro_batches(self, epoch):
        """The epoch's micro-batches as train.py builds them (one process)."""
        return sampler.rank_microbatches(self.loop.order(epoch), 0, 1, self.args.batch_size)

    def step(self, idx, timer=NULL_TIMER, policy_hook=None):
        """train.optimizer_step on the pairs idx; returns the loss dict of its (one) micro-batch. policy_hook(logps)
        sees the policy's (2B,) log-probs of the fast path; timer times collate, policy_forward, noise_forward,
        loss (the rest of the forward: reference lookup, Eq. 9, bookkeeping), backward and optimizer."""
        model, seen = self.loop.model, {}
        before = dict(timer.seconds)

        def policy_logps(batch):  # the fast path's policy, observed (step.cached_batch_loss calls it)
            with timer("policy_forward"):
                out = model(batch)
            if policy_hook is not None:
                policy_hook(out.detach())
            return out
        if self.loop.cache is not None:
            self.loop.model = policy_logps
        try:
            with _timed_noise(timer):
                train.optimizer_step(self.loop, self.steps_taken, [idx], timer=timer if timer.enabled else None,
                                     on_micro_batch=lambda out: seen.update(out=out))
        finally:
            self.loop.model = model
        self.steps_taken += 1
        if timer.enabled:  # "forward" = policy_forward + noise_forward + loss
            delta = {k: timer.seconds.get(k, 0.0) - before.get(k, 0.0) for k in timer.seconds}
            forward = timer.seconds.pop("forward", 0.0) - before.get("forward", 0.0)
            inner = delta.get("policy_forward", 0.0) + delta.get("noise_forward", 0.0)
            timer.seconds["loss"] = timer.seconds.get("loss", 0.0) + forward - inner
        return seen["out"]

    def epoch(self, epoch=0):
        """Seconds of one epoch's optimizer steps."""
        t0 = time.perf_counter()
        for idx in self.micro_batches(epoch):
            self.step(idx)
        return time.perf_counter() - t0


def run_args(w, noise="none", precompute=True, group=True, dtype="fp32", seed=0, pack=True, fp32_head=True):
    """train.py's flags for OurRun on workload w (config.parse_args), with iteration 0's seeds and data order
    for every noise kind (parsed as --iter 1, where --noise is honoured, then iter set to 0)."""
    s = w.spec
    flags = ["--iter", "1", "--preset", "demo", "--max-prompts", str(len(w.examples)), "--epochs", str(s["epochs"]),
             "--batch-size", str(s["batch_size"]), "--optimizer", "rmsprop", "--lr", str(s["lr"]), "--warmup-ratio",
             "0", "--max-grad-norm", "1.0", "--noise-lr", "1e-3", "--max-length", str(s["max_length"]),
             "--max-prompt-length", str(s["max_prompt_length"]), "--device", w.device.type, "--dtype", dtype,
             "--seed", str(seed), "--noise", noise, "--no-dsl",
             "--precompute-ref" if precompute else "--no-precompute-ref",
             "--group-by-length" if group else "--no-group-by-length", "--pack-pairs" if pack else "--no-pack-pairs",
             "--fp32-head" if fp32_head else "--no-fp32-head"]
    args = config.parse_args(flags)
    args.iter, args.dist = 0, "auto"
    return args


@contextlib.contextmanager
def _timed_noise(timer):
    """Time the noise forward (step.py calls noises.noisy_answer_logps_pair, or noisy_answer_logps for fixed
    noise): z = lm_head(h), σ², both ε draws and their log-probs ("noise_forward")."""
    if not timer.enabled:
        yield
        return
    originals = {name: getattr(noises, name) for name in ("noisy_answer_logps", "noisy_answer_logps_pair")}

    def timed(fn):
        def call(*a, **k):
            with timer("noise_forward"):
                return fn(*a, **k)
        return call
    for name, fn in originals.items():
        setattr(noises, name, timed(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(noises, name, fn)


# ----------------------------------------------------------------------------- TRL
def trl_available():
    return importlib.util.find_spec("trl") is not None


def trl_rows(examples):
    """TRL's pre-tokenized preference rows from data.tokenize_pair examples: our token ids, prompt and answers."""
    rows = []
    for e in examples:
        n = sum(1 for x in e["chosen_labels"] if x == -100)  # the prompt's length (the same on both sides)
        rows.append(dict(prompt_ids=e["chosen_input_ids"][:n], chosen_ids=e["chosen_input_ids"][n:],
                         rejected_ids=e["rejected_input_ids"][n:]))
    return rows


def trl_trainer(w, precompute, out_dir, max_steps=-1, policy=None):
    """A DPOTrainer on a fresh copy of the model (or on `policy`), fed our token ids; .precompute_s, .ref_batches,
    .step_ends (times of the epoch's start and of each optimizer step's end)."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class PreTokenized(DPOTrainer):
        ref_batches, precompute_s = 0, 0.0

        def _prepare_dataset(self, dataset, *args, **kwargs):  # already prompt_ids / chosen_ids / rejected_ids
            return dataset

        def _precompute_ref_logps(self, *args, **kwargs):
            t0 = time.perf_counter()
            out = super()._precompute_ref_logps(*args, **kwargs)
            self.precompute_s += time.perf_counter() - t0
            return out

        def compute_ref_log_probs(self, model, inputs):
            self.ref_batches += 1
            return super().compute_ref_log_probs(model, inputs)

    class Clock(TrainerCallback):
        def on_epoch_begin(self, *a, **k):
            trainer.step_ends.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            trainer.step_ends.append(time.perf_counter())

    s = w.spec
    config = DPOConfig(
        output_dir=out_dir, per_device_train_batch_size=s["batch_size"], num_train_epochs=1, max_steps=max_steps,
        learning_rate=s["lr"], optim="rmsprop", max_grad_norm=1.0, beta=0.1, loss_type=["sigmoid"],
        max_length=s["max_length"], precompute_ref_log_probs=precompute, gradient_checkpointing=False, bf16=False,
        use_cpu=w.device.type == "cpu", report_to="none", save_strategy="no", logging_steps=10 ** 9,
        dataloader_num_workers=0, dataloader_pin_memory=False, disable_tqdm=True, seed=0)
    policy = (policy if policy is not None else copy.deepcopy(w.model)).train()
    ref = None if precompute else copy.deepcopy(w.model).eval().requires_grad_(False)  # TRL's own choice with precompute
    with _quiet_trl():
        trainer = PreTokenized(model=policy, ref_model=ref, args=config, train_dataset=Dataset.from_list(trl_rows(w.examples)),
                               processing_class=w.tokenizer, callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)  # the end-of-training metrics dict
    trainer.step_ends = []
    if precompute and trainer.ref_batches == 0:
        raise RuntimeError("TRL reused cached reference log-probs: the precompute was not measured")
    return trainer


@contextlib.contextmanager
def _quiet_trl():
    """No progress bars from TRL's reference precompute and datasets' map."""
    import datasets
    import transformers
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    old = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TQDM_DISABLE")
        else:
            os.environ["TQDM_DISABLE"] = old


# ----------------------------------------------------------------------------- peak memory in child processes
class PeakRSS:
    """Peak resident set size of this process from start() on. On Linux the kernel's high-water mark of this
    address space is reset by writing 5 to /proc/self/clear_refs and read back as VmHWM (/proc/self/status);
    extra = peak - RSS at start. ru_maxrss (bench/run.py's noisy_logps) is not used there: it never falls below
    the parent's RSS at fork time (exec records the forked address space's mark), which made every child
    of a large parent report the parent's size. Elsewhere: ru_maxrss, baseline its value so far."""

    def start(self):
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.base, self.linux = _status_bytes("VmRSS"), True
        except OSError:
            self.base, self.linux = _max_rss(), False
        return self

    def stop(self):
        peak = _status_bytes("VmHWM") if self.linux else _max_rss()
        return dict(peak=peak, base=self.base, extra=peak - self.base)


def _status_bytes(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":"))  # kB


def _max_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def memory_child(variant, spec, device):
    """Peak RSS of one epoch of a variant: ours (new path), old, trl_off, trl_on (in this process)."""
    w = Workload(spec, device)

    def run(w, policy=None):
        if variant in ("ours", "old"):
            OurRun(w, precompute=variant == "ours", group=variant == "ours", policy=policy).epoch()
        else:
            with tempfile.TemporaryDirectory() as d:
                trl_trainer(w, variant == "trl_on", d, policy=policy).train()
    run(w.subset(w.spec["batch_size"]))  # warm-up on one micro-batch: libraries and kernels paged in, then freed
    gc.collect()
    rss = PeakRSS().start()
    run(w, policy=w.model)  # the loaded model becomes the policy: no third copy
    return rss.stop()


def child_peaks(variants, w):
    """{variant: dict(peak, base, extra)} each from its own process (glibc told to return blocks ≥ 64 KiB)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2 ** 16))
    out = {}
    with tempfile.TemporaryDirectory() as d:
        spec = dict(w.spec, pairs_file=os.path.join(d, "pairs.jsonl"))
        data.write_jsonl(spec["pairs_file"], w.pairs)
        for v in variants:
            proc = subprocess.run([sys.executable, "-m", "bench.training", "--child", v, "--spec", json.dumps(spec),
                                   "--device", w.device.type], capture_output=True, text=True, env=env,
                                  cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            if proc.returncode != 0:
                raise RuntimeError(f"memory child {v!r} failed: {proc.stderr.strip().splitlines()[-1:]}")
            out[v] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def _mib(x):
    return f"{x / 2 ** 20:7.0f} MiB"


def main(argv=None):
    p = argparse.ArgumentParser(description="internal: one peak-RSS probe (see bench/run.py)")
    p.add_argument("--child", required=True, choices=["ours", "old", "trl_off", "trl_on"])
    p.add_argument("--spec", required=True, help="workload spec as JSON")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    print(json.dumps(memory_child(a.child, json.loads(a.spec), torch.device(a.device))))


if __name__ == "__main__":
    main()
