"""The harness of the demo-workload benchmarks in bench/perf.py (registered in bench/run.py's BENCHMARKS).

    python -m bench --only train_step_vs_trl [--rounds N]
    python -m bench.training --child VARIANT --spec JSON      # internal: one peak-RSS probe in its own process

Workload (WORKLOAD, as `train.py --preset demo`): the embedded SmolLM2-135M in fp32, the first 32 prompts
of the demo train split, chosen = the human answer, rejected = the model's own greedy answer (48 new
tokens, generated once with generate.py and kept in <tmp>/dnpo-bench/), max length 256, batch 8 pairs,
2 epochs, RMSprop lr 1e-6, gradient clipping 1.0, 3 interleaved rounds. Real tokens = the non-padding
positions (prompt + answer) of the chosen and rejected rows.

OurRun is train.train's optimizer step on fresh model copies (test_bench.py checks its first loss against
train.train's). trl_trainer is TRL's DPOTrainer on the same pairs, fed our token ids: its _prepare_dataset
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

import checkpoint as ckpt
import data
import demo
import generate
import model as models
import noise as noises
import packing
import step as steps

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
        self.steps_per_epoch = ckpt.steps_per_epoch(len(self.examples), 1, s["batch_size"], 1)
        self.n_params = sum(p.numel() for p in self.model.parameters())  # tied embeddings counted once

    def subset(self, n):
        """The same workload on its first n pairs (a shallow copy sharing the model)."""
        sub = copy.copy(self)
        sub.pairs, sub.examples = self.pairs[:n], self.examples[:n]
        sub.tokens = sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in sub.examples)
        sub.steps_per_epoch = ckpt.steps_per_epoch(n, 1, self.spec["batch_size"], 1)
        return sub


_WORKLOADS = {}


def workload(device, spec=None):
    """The Workload of spec (default WORKLOAD), built once per process."""
    key = (json.dumps(spec or {}, sort_keys=True), str(device))
    if key not in _WORKLOADS:
        _WORKLOADS[key] = Workload(spec or {}, device)
    return _WORKLOADS[key]


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
    """train.train's optimizer step on fresh copies of the workload's model: policy in fp32, reference in the
    compute dtype, RMSprop (one optimizer, the generator as a second group), clipping at 1.0, the epoch
    order of checkpoint.py; precompute=False/group=False are `--no-precompute-ref/--no-group-by-length`."""

    def __init__(self, w, noise="none", precompute=True, group=True, dtype="fp32", compile_policy=False, seed=0,
                 policy=None, pack=True, diagnostics=True):
        self.w, self.group, self.seed, self.diagnostics = w, group, seed, diagnostics
        self.pack = pack and precompute  # --pack-pairs needs --precompute-ref, as in train.py
        compute = models.pick_dtype(w.device, dtype)
        self.autocast = torch.autocast(w.device.type, dtype=compute, enabled=compute != torch.float32)
        self.policy = (policy if policy is not None else copy.deepcopy(w.model)).train()
        self.reference = copy.deepcopy(w.model).to(compute).eval().requires_grad_(False)
        self.objective = steps.Objective(noise=noise, beta=0.1, alpha=noises.DEFAULT_ALPHA, loss_type="sigmoid",
                                         noise_sigma=noises.DEFAULT_SIGMA, chunk_size=256)
        torch.manual_seed(seed)
        cfg = self.policy.config
        self.noise_net = noises.make_noise(noise, cfg.hidden_size, cfg.vocab_size)
        self.noise_net = self.noise_net.to(w.device) if self.noise_net is not None else None
        groups = [dict(params=list(self.policy.parameters()), lr=w.spec["lr"])]
        if self.noise_net is not None and list(self.noise_net.parameters()):
            groups.append(dict(params=list(self.noise_net.parameters()), lr=1e-3))
        self.optimizer = torch.optim.RMSprop(groups, lr=w.spec["lr"])
        self.noise_rng = torch.Generator(device=w.device).manual_seed(seed)
        self.cache, self.precompute_s = None, 0.0
        self.module = steps.PolicyLogps(self.policy, 256) if precompute else self.policy
        if precompute:  # as train.py: the policy before its first update computes the reference's numbers
            t0 = time.perf_counter()
            self.cache = steps.ReferenceCache.build(self.module, w.examples, w.tokenizer.pad_token_id, w.device,
                                                    w.spec["batch_size"], noise != "none", self.autocast,
                                                    progress=False, pack=self.pack, reference=self.reference)
            if not self.cache.needs_reference:
                steps.release(self.reference)
            self.precompute_s = time.perf_counter() - t0
        if compile_policy:
            self.module = torch.compile(self.module)
        self.lengths = [packing.row_length(e, self.pack) for e in w.examples]  # as train.py

    def micro_batches(self, epoch):
        """The epoch's micro-batches as train.py builds them (one process)."""
        order = ckpt.epoch_order(len(self.w.examples), self.seed, epoch)
        if self.group:
            order = ckpt.length_grouped_order(order, self.lengths, self.w.spec["batch_size"], self.seed, epoch)
        return ckpt.rank_microbatches(order, 0, 1, self.w.spec["batch_size"])

    def step(self, idx, timer=NULL_TIMER, policy_hook=None):
        """One optimizer step on the pairs idx; returns the loss dict. policy_hook(logps) sees the policy's
        (2B,) log-probs of the fast path; timer times collate, policy_forward, noise_forward, loss (the
        rest of the forward), backward and optimizer."""
        with timer("collate"):
            batch = {k: v.to(self.w.device) for k, v in
                     packing.collate(self.pack)([self.w.examples[i] for i in idx], self.w.tokenizer.pad_token_id).items()}
        t0, before = time.perf_counter(), dict(timer.seconds)
        if self.cache is not None:
            def policy_logps(batch):
                with timer("policy_forward"):
                    out = self.module(batch)
                if policy_hook is not None:
                    policy_hook(out.detach())
                return out
            with _timed_noise(timer):
                out = steps.cached_batch_loss(policy_logps, self.cache, idx, batch, self.noise_net, self.objective,
                                              self.noise_rng, self.autocast, diagnostics=self.diagnostics)
        else:
            out = steps.batch_loss(self.module, self.reference, self.noise_net, batch, self.objective, self.noise_rng,
                                  self.autocast)
        if timer.enabled:  # the forward's time outside the timed parts: reference lookup, Eq. 9, bookkeeping
            inner = sum(timer.seconds.get(k, 0.0) - before.get(k, 0.0) for k in timer.seconds)
            timer.seconds["loss"] = timer.seconds.get("loss", 0.0) + time.perf_counter() - t0 - inner
        with timer("backward"):
            out["loss"].backward()
        with timer("optimizer"):
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
            if self.noise_net is not None and list(self.noise_net.parameters()):
                torch.nn.utils.clip_grad_norm_(self.noise_net.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return out

    def epoch(self, epoch=0):
        """Seconds of one epoch's optimizer steps."""
        t0 = time.perf_counter()
        for idx in self.micro_batches(epoch):
            self.step(idx)
        return time.perf_counter() - t0


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
