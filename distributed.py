"""Scale-out for train.py under torchrun: the policy sharded with FSDP2, sharded checkpoints through
torch.distributed.checkpoint (DCP), and the final model gathered into one save_pretrained() directory.

    --dist fsdp   fully_shard on every decoder layer, then on the root: the module training calls
                  (step.PolicyLogps, or the CausalLM itself with --no-precompute-ref), so that root's
                  pre-forward hook unshards the embeddings, final norm and (tied) lm_head before
                  PolicyLogps calls get_decoder() and get_output_embeddings(). CUDA + bf16:
                  MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32); the fp32 shards are the
                  master weights. Gradients are reduce-scattered (averaged) like DDP's all-reduce.
    --dist ddp    DistributedDataParallel, as before (memplan.resolve_dist: auto = FSDP from 1 B params)
    reference     replicated in the compute dtype on every rank: generation (HF generate) needs it
                  whole, and afterwards the per-step work is its lm_head (V × d) or, when the hidden-state
                  cache is over --ref-cache-gb, one pass over the B rejected rows; memplan.py shows 7B
                  fits 80 GB so (13.5 GiB of 37.6 GiB per rank), sharding it would save 11.8 GiB.
    noise_net     the noise network (V × d, 131 M parameters at 7B: 1.5 GiB with gradients and
                  RMSprop state) stays replicated, its gradients all-reduced by train.py; sharding it
                  would save ~1.3 GiB per rank but put FSDP hooks inside noise.py's checkpointed chunks.

Checkpoint: iter{k}/checkpoint/sharded/ holds DCP's files (each rank writes its shards of the policy
and of the optimizer state; the replicated noise network once) and meta.json (step, scheduler, RNG states
of rank 0, the noise RNG of every rank, optimizer param_groups, flags), written into sharded.tmp/ and
renamed into place by rank 0 once complete; a crash between the two renames leaves sharded.old/,
which is read instead.

Loading never runs code from a checkpoint. DCP in torch 2.13 reads tensors with torch.load(weights_only=True), but
reads `.metadata` with plain pickle.load and non-tensor items with torch.load(weights_only=False)
(DefaultLoadPlanner.load_bytes). So SafeReader unpickles `.metadata` allowing only DCP's metadata
classes, torch.Size, dtypes, layouts and paths, and refuses a checkpoint holding any non-tensor item:
ours hold none (the non-tensor state is meta.json, read with json).

Where this departs from, or fills a gap in, the paper:
1. Nothing in the math (the paper trains on 8 GPUs and does not say how); FSDP and DDP differ by float
   rounding (reduce-scatter vs all-reduce order; bf16 parameters in the forward under FSDP, where DDP
   autocasts fp32 weights).
2. The global RNG state saved is rank 0's and is restored on every rank, as in the DDP checkpoint.
"""
import contextlib
import datetime
import json
import os
import pathlib
import pickle
import shutil

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch import nn
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

import checkpoint as ckpt
import errors
import model as models
import step as steps


# ----------------------------------------------------------------------------- wrapping
# ----------------------------------------------------------------------------- torchrun: process group, barrier, gather
def setup_distributed(device=None):
    """(rank, world, device); torchrun sets WORLD_SIZE > 1, a plain run never touches torch.distributed."""
    from model import pick_device
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world == 1:
        return 0, 1, pick_device(device)
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        torch.cuda.set_device(local)
    # rank 0 judges while the others wait at a barrier: far longer than the default 10-minute timeout
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=12))
    return rank, world, torch.device("cuda", local) if cuda else torch.device("cpu")


def barrier():
    if dist.is_initialized():
        dist.barrier()


def gather(obj, world):
    """[obj of rank 0, obj of rank 1, ...] (a collective: every rank must call it)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out



def prepare(policy, args, device):
    """The module the training step calls: step.PolicyLogps (or the CausalLM itself with
    --no-precompute-ref), sharded in place for --dist fsdp. Call it before building the optimizer:
    fully_shard replaces the parameters by DTensor shards."""
    module = steps.PolicyLogps(policy, args.noise_chunk_size, args.fp32_head) if args.precompute_ref else policy
    if args.dist == "fsdp":
        shard(module, policy, device, models.pick_dtype(device, args.dtype))
    return module


def shard(root, policy, device, compute_dtype):
    """FSDP2 on `root` (the module train.py calls), one unit per decoder layer of `policy`, then the root."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mixed = compute_dtype != torch.float32
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype if mixed else None, reduce_dtype=torch.float32 if mixed else None)
    for layer in policy.get_decoder().layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(root, mesh=mesh, mp_policy=mp)
    return root


def wrap(module, mode, device):
    """The module train.py calls: DDP-wrapped for --dist ddp, itself otherwise (FSDP shards in place)."""
    if mode != "ddp":
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


@contextlib.contextmanager
def grad_sync(module, sync):
    """Gradient accumulation: no reduction on micro-batches before the last one of a step."""
    if sync or not isinstance(module, (nn.parallel.DistributedDataParallel, FSDPModule)):
        yield
    elif isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        with module.no_sync():
            yield


def clip_grad_norm(params, max_norm):
    """clip_grad_norm_, returning a plain tensor: with FSDP the norm of sharded gradients is a DTensor
    (its full_tensor() is the norm over all shards, the same on every rank). max_norm 0 (clipping off): the
    norm only, the gradients untouched (metrics.jsonl logs the real norm either way)."""
    params = list(params)
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def all_finite(tensors, collective=True) -> bool:
    """True when every entry of every tensor is finite on every rank: one fused 2-norm over all of them (torch's
    foreach norm, grouped by device and dtype; no Python loop over tensors): finite exactly when every entry
    is, NaN when one is NaN; inf when one is ±inf or when the sum of squares of finite entries overflows
    (entries ≳ 1e19), and only then the exact max-|x| (the ∞-norm, which cannot overflow; ~20× slower on
    CPU) decides, so a large finite weight is never called non-finite. On each rank's local shards
    (DTensor.to_local), then one MAX all-reduce of the verdict under torchrun: a collective, so every rank
    calls it (collective=False: this rank's tensors only)."""
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors if torch.is_tensor(t)]
    local = [t.detach() for t in local if t.numel() and (t.is_floating_point() or t.is_complex())]
    bad = torch.zeros((), dtype=torch.float32, device=local[0].device if local else "cpu")
    if local:
        norm = torch.nn.utils.get_total_norm(local, norm_type=2.0, foreach=True)
        if torch.isinf(norm):  # a ±inf entry, or an overflowing sum of squares: the exact test
            norm = torch.nn.utils.get_total_norm(local, norm_type=float("inf"), foreach=True)
        bad = (~torch.isfinite(norm)).to(torch.float32).to(bad.device)
    if collective and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl" and bad.device.type != "cuda":
            bad = bad.cuda()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


def state_tensors(obj):
    """Every tensor inside a (nested) state dict: an optimizer's or a model's, for all_finite."""
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from state_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from state_tensors(v)


def save_full_model(policy, tokenizer, out_dir, dtype):
    """Gather the sharded policy on rank 0 (CPU) and save_pretrained() it there: a collective."""
    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        from transformers import AutoModelForCausalLM
        with torch.device("meta"):  # no memory, no init: the gathered tensors are assigned below
            plain = AutoModelForCausalLM.from_config(policy.config)
        for key in list(full):  # cast one tensor at a time: one model copy in memory, not two
            full[key] = full[key].to(dtype)
        missing, unexpected = plain.load_state_dict(full, strict=False, assign=True)
        tied = {"lm_head.weight"} if getattr(policy.config, "tie_word_embeddings", False) else set()
        assert not unexpected and set(missing) <= tied, f"gathered state dict: missing {missing}, unexpected {unexpected}"
        plain.tie_weights()
        plain.generation_config = policy.generation_config
        models.save_model(plain, tokenizer, out_dir)
    dist.barrier()


# ----------------------------------------------------------------------------- sharded checkpoint
def sharded_dir(state_path):
    return pathlib.Path(state_path).parent / "sharded"


def check_format(state_path, mode):
    """Refuse to resume a checkpoint of the other format (it would silently restart from step 0)."""
    other = pathlib.Path(state_path) if mode == "fsdp" else sharded_dir(state_path)
    if other.exists():
        was = "--dist ddp or a single process" if mode == "fsdp" else "--dist fsdp"
        raise errors.Refusal(f"{other} was written with {was}; rerun with it or delete {other}")


def _holder(module, noise_net):
    """One module holding the policy root and the noise network: DCP's state-dict helpers map the
    optimizer's two parameter groups to names through it."""
    holder = nn.Module()
    holder.policy = module
    if noise_net is not None:
        holder.noise_net = noise_net
    return holder


def _encode(x):
    """JSON-able form of the RNG/scheduler state: tensors, arrays and tuples tagged, the rest as is."""
    if isinstance(x, torch.Tensor):
        return {"__tensor__": x.tolist(), "dtype": str(x.dtype).removeprefix("torch.")}
    if isinstance(x, np.ndarray):
        return {"__ndarray__": x.tolist(), "dtype": str(x.dtype)}
    if isinstance(x, tuple):
        return {"__tuple__": [_encode(v) for v in x]}
    if isinstance(x, list):
        return [_encode(v) for v in x]
    if isinstance(x, dict):
        return {k: _encode(v) for k, v in x.items()}
    return x


def _decode(x):
    if isinstance(x, list):
        return [_decode(v) for v in x]
    if not isinstance(x, dict):
        return x
    if "__tensor__" in x:
        return torch.tensor(x["__tensor__"], dtype=getattr(torch, x["dtype"]))
    if "__ndarray__" in x:
        return np.array(x["__ndarray__"], dtype=x["dtype"])
    if "__tuple__" in x:
        return tuple(_decode(v) for v in x["__tuple__"])
    return {k: _decode(v) for k, v in x.items()}


def save_sharded(state_path, module, noise_net, optimizer, meta):
    """Every rank writes its shards into sharded.tmp/, rank 0 adds meta.json and renames it into place."""
    final = sharded_dir(state_path)
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(_holder(module, noise_net), optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd["state"]}, checkpoint_id=tmp)  # tensors only
    if dist.get_rank() == 0:  # dcp.save returns on rank 0 after every rank's files and .metadata are written
        (tmp / "meta.json").write_text(json.dumps(_encode({**meta, "param_groups": optim_sd["param_groups"]})))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_meta(state_path):
    """meta.json of the last complete sharded checkpoint (with its directory under "dir"), or None."""
    final = sharded_dir(state_path)
    for path in (final, final.with_name(final.name + ".old")):
        if (path / "meta.json").is_file():
            return {**_decode(json.loads((path / "meta.json").read_text())), "dir": str(path)}
    return None


def restore_sharded(meta, args, keys, rank, module, noise_net, optimizer, scheduler, noise_rng):
    """Load a sharded checkpoint into the live objects (as checkpoint.restore); refuse other training flags."""
    changed = ckpt.changed_flags(meta["args"], args, keys)
    if changed:
        was = ", ".join(f"{k}={meta['args'].get(k)}" for k in changed)
        raise errors.Refusal(f"{meta['dir']} was written with {was}; rerun with those flags or delete it")
    holder = _holder(module, noise_net)
    model_sd, optim_sd = get_state_dict(holder, optimizer)  # the live shapes and shardings to read into
    state = {"model": model_sd, "optimizer": optim_sd["state"]}
    try:
        dcp.load(state, storage_reader=SafeReader(meta["dir"]))
    except CheckpointException as e:  # a BaseException, with every rank's traceback: its last line says why
        raise errors.Refusal(f"cannot load {meta['dir']}: {str(e).strip().splitlines()[-1]}") from None
    set_state_dict(holder, optimizer, model_state_dict=state["model"],
                   optim_state_dict={"state": state["optimizer"], "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    ckpt.set_rng_state(meta["rng"])
    noise_rng.set_state(meta["noise_rng"][rank])
    return meta["step"]


def remove_sharded(state_path):
    for suffix in ("", ".tmp", ".old"):
        shutil.rmtree(str(sharded_dir(state_path)) + suffix, ignore_errors=True)


# ----------------------------------------------------------------------------- pickle-free loading
_METADATA_CLASSES = {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                     "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"}
_ALLOWED = ({("torch.distributed.checkpoint.metadata", n) for n in _METADATA_CLASSES}
            | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
               ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
               ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")})


class _MetadataUnpickler(pickle.Unpickler):
    """Python's "restricting globals" recipe: only the classes DCP's metadata is made of."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}: refused (not DCP metadata)")


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader with `.metadata` read by _MetadataUnpickler and non-tensor items refused."""

    def read_metadata(self, *args, **kwargs):  # rank: DCP's fallback to a rank-local __{rank}.metadata
        name = ".metadata" if kwargs.get("rank") is None else f"__{kwargs['rank']}.metadata"
        with open(pathlib.Path(self.path) / name, "rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
        items = [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
        if items:
            raise pickle.UnpicklingError(f"{self.path} holds non-tensor items {items[:3]}: refused (DCP would "
                                         f"unpickle them with weights_only=False)")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
