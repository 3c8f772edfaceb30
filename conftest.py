"""Shared pytest fixtures: a tiny, randomly initialised chat model built offline in a few ms.

The tokenizer is byte-level (256 byte tokens, no merges) plus ChatML specials, with the same chat template
shape as SmolLM2-Instruct, so every code path that calls `apply_chat_template` runs unchanged on it.
"""
import pytest
import torch
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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny model + tokenizer directory, loadable with from_pretrained (and model.load_model)."""
    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = make_tiny_tokenizer()
    make_tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
