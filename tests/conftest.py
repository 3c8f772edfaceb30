"""Shared pytest fixtures: a tiny, randomly initialised chat model built offline in a few ms.

The tokenizer is byte-level (256 byte tokens, no merges) plus ChatML specials, with the same chat template
shape as SmolLM2-Instruct, so every code path that calls `apply_chat_template` runs unchanged on it.
"""
import json
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tiny_tokenizer():
    """Byte-level tokenizer: ids 0..255 are bytes, then <|endoftext|>, <|im_start|>, <|im_end|>."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = {i: c for i, c in enumerate(sorted(alphabet, key=lambda c: ord(c)))}
    vocab = {c: i for i, c in byte_to_char.items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    hf.chat_template = CHATML
    return hf


def make_tiny_model(tokenizer, seed=0, hidden_size=32, layers=2):
    """A 2-layer Llama with a 259-token vocabulary, deterministic for a seed."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


def save_tiny(path, make_model):
    """make_model(tokenizer) saved with the tiny tokenizer into path (a from_pretrained directory); path as str."""
    tokenizer = make_tiny_tokenizer()
    make_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny model + tokenizer directory, loadable with from_pretrained (and model.load_model)."""
    return save_tiny(tmp_path_factory.mktemp("tiny-model"), make_tiny_model)


# ---------------------------------------------------------------- train.py runs on the tiny model
SECRET = "sk-test-never-written-0123456789"


def tiny_flags(run_dir, base_model, *extra):
    """A complete, fast iteration on the tiny model: 6 demo prompts, 6 new tokens, 2 epochs of 3 steps."""
    return ["--run-dir", str(run_dir), "--base-model", base_model, "--max-prompts", "6", "--max-new-tokens", "6",
            "--max-length", "160", "--max-prompt-length", "96", "--batch-size", "2", "--epochs", "2",
            "--save-every", "2", "--lr", "1e-3", "--noise-lr", "1e-2", "--logp-examples", "3", "--gen-batch-size", "6",
            *extra]


def read_jsonl(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def model_weights(path):
    return load_file(str(pathlib.Path(path) / "model.safetensors"))


@pytest.fixture(scope="module")
def iter0_run(tmp_path_factory, tiny_model_dir):
    """A run directory holding a finished iteration 0 (plain SPIN from the tiny model)."""
    run_dir = tmp_path_factory.mktemp("run")
    mp = pytest.MonkeyPatch()
    mp.setenv("OPENAI_API_KEY", SECRET)
    import train  # here, not at the top: conftest is imported before every test module

    train.main(["--iter", "0", *tiny_flags(run_dir, tiny_model_dir)])
    mp.undo()
    return run_dir


def fresh_copy(iter0_run, tmp_path):
    """A new run directory with only iteration 0 in it."""
    run_dir = tmp_path / "run"
    shutil.copytree(iter0_run / "iter0", run_dir / "iter0")
    return run_dir
