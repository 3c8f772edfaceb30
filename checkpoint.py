"""Run-directory plumbing and resumable training state for train.py: which model an iteration starts
from, the end-of-iteration summary, the data order, the learning-rate
schedule, RNG states, and the one checkpoint dict, all written atomically so that a kill at any moment
loses at most the steps since the last save and never leaves a half-written file.

Checkpoints hold tensors and plain containers only (RNG states included), and are read with
torch.load(weights_only=True): a planted state.pt cannot run code. What a killed write leaves behind
(temporary files, half-saved model directories) is removed by `remove_leftovers` on the next run.

Where this departs from, or fills a gap in, the paper:
1. Data order: one permutation per epoch from a generator seeded with (seed, epoch), padded by
   wrapping to a multiple of the world size and dealt out round-robin to ranks, as
   torch.utils.data.DistributedSampler does; a rank's micro-batches are consecutive slices of its
   share. With world size W and batch b, the W ranks of one step see exactly the examples that a
   single process with batch W·b would see in that step.
"""
import collections
import math
import os
import pathlib
import pickle
import random
import shutil

import numpy as np
import torch

import data
import diskspace
import errors
import stages


# ----------------------------------------------------------------------------- run directory
def start_model_of(run_dir, k, base_model, rerun_hint=""):
    """The model iteration k starts from; a one-line error naming the command to run first."""
    if pathlib.Path(run_dir).exists() and not pathlib.Path(run_dir).is_dir():
        raise errors.Refusal(f"--run-dir {run_dir} is a file, not a directory")
    if k == 0:
        return base_model
    prev = pathlib.Path(run_dir) / f"iter{k - 1}" / "model"
    if not (prev / "config.json").is_file():
        raise errors.Refusal(f"{prev} does not exist; run `python train.py --iter {k - 1} "
                             f"--run-dir {run_dir}{rerun_hint}` first")
    return str(prev)


LEFTOVER_PATTERNS = (".*.tmp", "checkpoint/.*.tmp", ".model.tmp-*", ".model.old-*")


def remove_leftovers(it_dir):
    """Delete what a killed write left in an iteration directory: temporary files of atomic writes
    (`.state.pt.*.tmp`, `.config.json.*.tmp`, ...) and half-saved model directories (`.model.tmp-*`,
    `.model.old-*`). `*.partial` files are resume state, not leftovers: they stay. Returns what it removed."""
    removed = []
    for pattern in LEFTOVER_PATTERNS:
        for path in sorted(pathlib.Path(it_dir).glob(pattern)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def prepare_iteration_dir(it_dir, rank):
    """Create it_dir (errors.Refusal when it cannot be created or written to); on rank 0 remove the
    leftovers of a killed write and cut a torn last line off metrics.jsonl (a kill mid-append)."""
    it_dir = pathlib.Path(it_dir)
    try:
        it_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise errors.Refusal(f"cannot create {it_dir} ({e.strerror or e}); choose another --run-dir") from None
    if not os.access(it_dir, os.W_OK | os.X_OK):
        raise errors.Refusal(f"{it_dir} is not writable; choose another --run-dir")
    if rank == 0:
        for path in [it_dir / name for name in WRITTEN] + [it_dir.parent / "judge_cache.jsonl"]:
            data.refuse_symlink(path)  # a ValueError naming the link
        remove_leftovers(it_dir)
        data.drop_torn_line(it_dir / "metrics.jsonl")
        read_metrics(it_dir / "metrics.jsonl")  # checked now, not after the model has loaded


# Every file and directory train.py writes in an iteration directory (none may be a symbolic link).
WRITTEN = ("config.json", "stages.json", "generated.jsonl", "generated.jsonl.partial", "judged.jsonl",
           "judged.jsonl.partial", "judged.jsonl.cache.jsonl", "pairs.jsonl", "metrics.jsonl", "logps.jsonl",
           "summary.json", "checkpoint", "checkpoint/state.pt", "model")


def read_metrics(path):
    """The rows of a metrics.jsonl ([] when there is none); errors.Refusal (one line, file:row and field) for a
    row whose step is not a positive integer or whose epoch is not an integer >= 0."""
    path = pathlib.Path(path)
    if not path.is_file():
        return []
    try:
        rows = data.read_jsonl(path)
    except ValueError as e:
        raise errors.Refusal(f"{e}; delete {path.parent} to redo the iteration") from None
    for i, row in enumerate(rows, 1):
        for key, low in (("step", 1), ("epoch", 0)):
            value = row.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise errors.Refusal(f"{path} row {i}: field {key!r} must be an integer >= {low}, got "
                                     f"{value!r}; restore the file or delete {path.parent} to redo the iteration")
    return rows


def print_summary(it_dir):
    """The one-screen summary of a finished iteration (from its summary.json)."""
    path = pathlib.Path(it_dir) / "summary.json"
    if not os.path.lexists(path):
        return
    try:
        s = data.read_json(path)
    except ValueError as e:
        raise errors.Refusal(f"{e}; delete {path} and rerun to write it again") from None
    s = collections.defaultdict(lambda: None, s)  # a missing field prints as None
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    print(f"\n=== iteration {s['iter']} done: {pathlib.Path(it_dir) / 'model'} ===")
    print(f"start model   {s['start_model']}")
    print(f"pairs         {s['pairs']}  (DSL {s['dsl']}: flips {s['dsl_flips']}, ties {s['ties']}, "
          f"missing scores {s['missing_scores']}; judge flip rate {fmt(s['flip_rate'])})")
    print(f"noise         {s['noise']}  (final σ² {fmt(s['final_sigma2'])})")
    print(f"last epoch    loss {fmt(s['final_loss'])} | margin {fmt(s['final_margin'])} | noisy margin "
          f"{fmt(s['final_noisy_margin'])} | reward acc {fmt(s['final_reward_acc'])}")
    print(f"time          train {fmt(s['train_s'])} s, wall {fmt(s['wall_s'])} s ({s['steps']} steps)")


def given_start_model(start_model, k):
    """train.py --start-model DIR (k ≥ 1): the model iteration k starts from instead of <run-dir>/iter{k-1}/model
    (ablate.py starts every row's iteration k from the SPIN model of iteration k-1); None when not given."""
    if start_model is None:
        return None
    if k == 0:
        raise errors.Refusal("--start-model is for k ≥ 1 (iteration 0 starts from --base-model)")
    path = pathlib.Path(start_model).expanduser()
    local = path.exists() or start_model.startswith(("/", ".", "~")) or start_model.count("/") > 1
    if local and not (path / "config.json").is_file():  # a hub id is "name" or "org/name"
        raise errors.Refusal(f"--start-model {start_model} has no config.json "
                             f"(expected a save_pretrained() directory or a hub id)")
    return start_model


# ----------------------------------------------------------------------------- resumable state


def epoch_order(n, seed, epoch):
    """The permutation of range(n) used in `epoch` (a fresh seeded generator: no hidden state to save)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def length_grouped_order(order, lengths, group, seed, epoch, mega=16):
    """`order` rearranged so that each run of `group` consecutive indices (one step's micro-batch on
    every rank: world × batch size) holds examples of similar length, as transformers'
    LengthGroupedSampler does: chunks of mega × group indices of `order` are sorted by length
    (longest first), cut into groups, and the full groups are shuffled by a generator seeded with
    (seed, epoch); a last partial group stays last. A function of (order, lengths, seed, epoch) only."""
    span, groups, tail = group * mega, [], []
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span], key=lambda i: -lengths[i])  # stable: ties keep `order`
        for i in range(0, len(chunk), group):
            (groups if len(chunk[i:i + group]) == group else tail).append(chunk[i:i + group])
    g = torch.Generator().manual_seed(seed * 100_003 + epoch + 50_021)
    return [i for k in torch.randperm(len(groups), generator=g).tolist() for i in groups[k]] + [i for t in tail for i in t]


def rank_microbatches(order, rank, world, batch_size):
    """This rank's micro-batches (lists of example indices) for one epoch's order."""
    total = math.ceil(len(order) / world) * world
    padded = (order * math.ceil(total / max(len(order), 1)))[:total]   # wrap, as DistributedSampler
    share = padded[rank:total:world]
    return [share[i:i + batch_size] for i in range(0, len(share), batch_size)]


def steps_per_epoch(n, world, batch_size, grad_accum):
    """Optimizer steps per epoch: ceil(micro-batches per rank / grad_accum)."""
    micro = math.ceil(math.ceil(n / world) / batch_size)
    return math.ceil(micro / grad_accum)


def rng_state():
    """Every global RNG a training step may touch (python, numpy, torch CPU, CUDA), as tensors and plain
    containers only, so that a checkpoint loads with torch.load(weights_only=True)."""
    version, internal, gauss_next = random.getstate()
    algorithm, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                        "gauss_next": gauss_next},
             "numpy": {"algorithm": algorithm, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def seed_everything(seed):
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)


def set_rng_state(state):
    """The inverse of rng_state()."""
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss_next"]))
    np.random.set_state((npy["algorithm"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


CHECKPOINT_KEYS = ("policy", "noise_net", "optimizer", "scheduler", "rng", "noise_rng", "step", "args")


def save_checkpoint(path, state):
    """torch.save the checkpoint dict atomically (a temporary file beside path, then os.replace); URLs in
    the recorded args lose their user:password@ part."""
    if isinstance(state.get("args"), dict):
        state = {**state, "args": stages.public_args(state["args"])}
    path = pathlib.Path(path)
    nbytes = tensor_bytes(state)
    nbytes += nbytes // 50 + (64 << 10)  # a margin for the zip container (alignment, records) and plain values
    why = (f" beside the current {diskspace.size_text(path.stat().st_size)} {path.name}, which stays until the new one "
           f"is complete (an atomic checkpoint needs room for two copies)" if path.is_file() else "")
    diskspace.need(path, nbytes, why)
    with diskspace.translate(path, nbytes, why), data.atomic_open(path, binary=True) as fh:
        torch.save(state, fh)


def tensor_bytes(obj) -> int:
    """Bytes of every tensor in a nest of dicts, lists and tuples."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def load_checkpoint(path):
    """The checkpoint dict at path, or None when there is none. Loaded with weights_only=True: a file that
    holds anything but tensors and plain containers is refused without running it (run directories get
    shared). Any unreadable file is an errors.Refusal (one line) naming it and the way out."""
    path = pathlib.Path(path)
    if not path.is_file():
        return None
    way_out = f"delete {path.parent} to restart this iteration's training from step 0"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = "Unsupported global" in str(e) or "GLOBAL" in str(e)
        reason = ("it holds Python objects other than tensors and plain containers; refused without loading them"
                  if unsafe else "truncated or corrupt")
        raise errors.Refusal(f"{path} is not a usable checkpoint ({reason}); {way_out}") from None
    except Exception as e:  # a truncated zip, a short read, a tensor whose storage is cut off
        reason = " ".join(str(e).split()).split(". ")[0][:120]
        raise errors.Refusal(f"{path} is not a usable checkpoint (truncated or corrupt: {reason}); "
                             f"{way_out}") from None
    if not isinstance(state, dict) or not set(CHECKPOINT_KEYS) <= set(state):
        raise errors.Refusal(f"{path} is not a checkpoint written by train.py (keys missing); {way_out}")
    return state


def restore(state, path, args, keys, rank, policy, noise_net, optimizer, scheduler, noise_rng):
    """Load a checkpoint dict into the live objects; refuse one written with other training flags."""
    state = {**state, "args": stages.with_legacy(state["args"], keys)}
    changed = [k for k in keys if state["args"].get(k) != getattr(args, k, None)]
    if "pairs_sha256" in changed:
        was, now = str(state["args"].get("pairs_sha256"))[:12], str(getattr(args, "pairs_sha256", None))[:12]
        raise errors.Refusal(f"{path} trained on other pairs (sha256 {was}, now {now}); restore those pairs "
                             f"or delete {path.parent} to restart training on the new ones")
    if changed:
        was = ", ".join(f"{k}={state['args'].get(k)}" for k in changed)
        raise errors.Refusal(f"{path} was written with {was}; rerun with those flags or delete {path.parent}")
    policy.load_state_dict(state["policy"])
    if noise_net is not None:
        noise_net.load_state_dict(state["noise_net"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    noise_rng.set_state(state["noise_rng"][rank])
    return state["step"]


def finite_or_none(x):
    """x, or None for a missing or NaN value (JSON has no NaN; a flip rate is NaN when no record has both scores)."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def summarize(args, pairs, stats, rows, train_s, wall_s):
    """summary.json of an iteration; final_* are means over the last epoch's optimizer steps."""
    last = [r for r in rows if r["epoch"] == rows[-1]["epoch"]] if rows else []
    mean = lambda key: sum(r[key] for r in last) / len(last) if last else None  # noqa: E731
    return dict(iter=args.iter, start_model=args.start_model, pairs=len(pairs), dsl=args.dsl, noise=args.noise,
                dsl_flips=stats.get("flips"), ties=stats.get("ties"), missing_scores=stats.get("missing"),
                identical_dropped=stats.get("identical"),
                flip_rate=finite_or_none(stats.get("flip_rate")), steps=len(rows), final_loss=mean("loss"),
                final_margin=mean("margin"), final_noisy_margin=mean("noisy_margin"),
                final_reward_acc=mean("reward_acc"), final_sigma2=mean("sigma2"), train_s=train_s, wall_s=wall_s)
