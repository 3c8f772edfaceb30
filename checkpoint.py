"""The resumable training state of train.py: RNG states and the one checkpoint dict (policy, noise network,
optimizer, learning-rate schedule, RNGs, step, the flags it was written with), written atomically so that a kill
at any moment loses at most the steps since the last save and never leaves a half-written file.

Checkpoints hold tensors and plain containers only (RNG states included), and are read with
torch.load(weights_only=True): a planted state.pt cannot run code. A checkpoint written with other training
flags, or on other pairs, is refused (`restore`). The run directory: rundir.py; the data order: sampler.py;
the sharded checkpoints of FSDP: distributed.py.

Where this departs from, or fills a gap in, the paper:
1. The paper describes no checkpoints; resuming bit-identically (the RNGs, the noise's per-rank generator, the
   step) is ours.
"""
import pathlib
import pickle
import random

import numpy as np
import torch

import data
import diskspace
import errors
import stages


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


def changed_flags(recorded, args, keys):
    """The keys whose value a checkpoint recorded differs from this run's; the start model compared as one
    directory however it was spelled (stages.canonical_model: an older checkpoint kept the spelling)."""
    if isinstance(recorded.get("start_model"), str):
        recorded = {**recorded, "start_model": stages.canonical_model(recorded["start_model"])}
    return [k for k in keys if recorded.get(k) != getattr(args, k, None)]


def restore(state, path, args, keys, rank, policy, noise_net, optimizer, scheduler, noise_rng):
    """Load a checkpoint dict into the live objects; refuse one written with other training flags."""
    state = {**state, "args": stages.with_legacy(state["args"], keys)}
    changed = changed_flags(state["args"], args, keys)
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
