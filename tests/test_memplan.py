"""Tests of memplan.py: the per-rank memory plan's arithmetic, against hand computation, for the paper's
7B model (Mistral-7B shape) on 8 × 80 GB GPUs, and the one-line refusal."""
import types

import pytest
from transformers import LlamaConfig, MistralConfig

import errors
import memplan

MISTRAL_7B = MistralConfig(hidden_size=4096, num_hidden_layers=32, vocab_size=32000, intermediate_size=14336,
                           num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
# by hand: per layer q, o 4096² each; k, v 4096·1024 each (8 kv heads × 128); MLP 3·4096·14336; 2 norms of 4096
LAYER = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096  # 218_112_000
P = 32 * LAYER + 2 * 32000 * 4096 + 4096  # + embeddings, untied lm_head, final norm = 7_241_732_096
SHAPE = memplan.Shape(params=P, layer_params=LAYER, layers=32, hidden=4096, kv=1024, intermediate=14336, vocab=32000)
PAPER = dict(world=8, optimizer="rmsprop", noise="trainable", compute_bytes=2, batch_size=4, length=1024,
             gradient_checkpointing=True, precompute_ref=True, ref_cache_bytes=4 * 2 ** 30, chunk_size=256,
             gen_batch_size=32, gen_length=1024)
GPU_80GB = 80 * 10 ** 9


def test_mistral_7b_shape_is_counted_exactly():
    """model_shape (meta device) gives the hand-computed 7,241,732,096 parameters and 218,112,000 per layer."""
    assert LAYER == 218_112_000 and P == 7_241_732_096
    assert memplan.model_shape(MISTRAL_7B) == SHAPE
    assert SHAPE.root_params == 2 * 32000 * 4096 + 4096


def test_7b_on_8_gpus_of_80gb_fits_with_fsdp_not_with_ddp():
    """The paper preset on 8 × 80 GB: FSDP fits, DDP does not, and the refusal names --dist fsdp."""
    assert memplan.resolve_dist("auto", 8, P) == "fsdp" and memplan.resolve_dist("auto", 8, 10 ** 8) == "ddp"
    assert memplan.resolve_dist("fsdp", 1, P) == "none"
    _, fsdp_total, fsdp_load = memplan.plan(SHAPE, dist="fsdp", **PAPER)
    _, ddp_total, ddp_load = memplan.plan(SHAPE, dist="ddp", **PAPER)
    assert memplan.fits(fsdp_total, fsdp_load, GPU_80GB) and not memplan.fits(ddp_total, ddp_load, GPU_80GB)
    assert memplan.suggest(SHAPE, GPU_80GB, dist="ddp", **PAPER) == "--dist fsdp"
    with pytest.raises(errors.Refusal, match=r"^the memory plan needs 133\.5 GiB per rank but cuda:0 has") as err:
        memplan.check(SHAPE, dict(PAPER, dist="ddp"), GPU_80GB, "cuda:0")
    assert "try --dist fsdp" in str(err.value) and "--no-memory-check" in str(err.value) and "\n" not in str(err.value)
    memplan.check(SHAPE, dict(PAPER, dist="fsdp"), GPU_80GB)  # fits: no exit
    one = dict(PAPER, world=1, dist="none")  # one GPU: more GPUs under FSDP
    assert memplan.suggest(SHAPE, GPU_80GB, **one) == "torchrun --nproc_per_node 4 train.py --dist fsdp"
    no_ckpt = dict(PAPER, dist="fsdp", gradient_checkpointing=False, batch_size=16)  # activations too big
    assert not memplan.fits(*memplan.plan(SHAPE, **no_ckpt)[1:], GPU_80GB)
    assert memplan.suggest(SHAPE, GPU_80GB, **no_ckpt) == "--gradient-checkpointing"


def test_plan_components_match_hand_computation():
    """Every component of the 7B plan, DDP and FSDP over 8 ranks, against the formulas worked by hand."""
    fsdp, fsdp_total, fsdp_load = memplan.plan(SHAPE, dist="fsdp", **PAPER)
    ddp, ddp_total, _ = memplan.plan(SHAPE, dist="ddp", **PAPER)
    shard = 4 * P // 8  # 3_620_866_048: fp32 parameters (and gradients, and RMSprop's square_avg) / 8 ranks
    assert fsdp["policy parameters (fp32)"] == fsdp["gradients (fp32)"] == shard == 3_620_866_048
    assert fsdp["optimizer state (1 × fp32)"] == shard and fsdp["DDP gradient buckets"] == 0
    assert fsdp["FSDP working set"] == (2 * 32000 * 4096 + 4096 + 2 * LAYER) * (2 + 4) == 4_190_232_576
    assert fsdp["reference (replicated)"] == ddp["reference (replicated)"] == 2 * P == 14_483_464_192
    assert fsdp["noise generator (+grads, state)"] == (32000 * 4096 + 32000) * 4 * 3 == 1_573_248_000
    assert fsdp["reference cache"] == 4 * 2 ** 30
    # activations, N = 2·4·1024 = 8192 tokens; one layer keeps 8·4096 + 2·(5·4096 + 3·1024 + 4·14336) B a token
    per_token = 8 * 4096 + 2 * (5 * 4096 + 3 * 1024 + 4 * 14336)
    assert per_token == memplan.layer_token_bytes(SHAPE, 2) == 194_560
    layers = 32 * 8192 * 4096 * 2 + 8192 * per_token  # checkpointed layer inputs (bf16 residual) + one layer
    head = 8192 * 4096 * 2 + 3 * 256 * 32000 * 4  # last hidden states + one fp32 logits chunk
    noise = 6 * 256 * 32000 * 4 + 4096 * (2 * 4096 + per_token)  # one noise chunk + reference over B rejected rows
    assert fsdp["activations"] == layers + head + noise == 4_933_812_224
    assert fsdp_total == sum(fsdp.values()) == 3 * shard + 4_190_232_576 + 14_483_464_192 + 1_573_248_000 \
        + 4 * 2 ** 30 + 4_933_812_224
    assert fsdp_load == 4 * P + 2 * P + 32 * 1024 * 32 * 2 * 1024 * 2  # fp32 policy + reference + KV cache
    assert ddp["policy parameters (fp32)"] == ddp["gradients (fp32)"] == ddp["DDP gradient buckets"] == 4 * P
    assert ddp["FSDP working set"] == 0
    assert ddp["activations"] == 32 * 8192 * 4096 * 4 + 8192 * per_token + 8192 * 4096 * 4 + 3 * 256 * 32000 * 4 \
        + noise  # fp32 residual stream: fp32 master weights under autocast
    assert ddp_total - fsdp_total > 90 * 2 ** 30  # DDP needs ~96 GiB more per rank
    adamw, _, _ = memplan.plan(SHAPE, dist="fsdp", **dict(PAPER, optimizer="adamw"))
    assert adamw["optimizer state (2 × fp32)"] == 2 * shard


def test_preflight_prints_the_plan_and_resolves_dist(tiny_model_dir, capsys):
    """On the tiny model (CPU: no device limit) the plan is printed and --dist resolved per world size."""
    import torch
    args = types.SimpleNamespace(start_model=tiny_model_dir, trust_remote_code=False, dist="auto", optimizer="rmsprop",
                                 noise="trainable", dtype=None, batch_size=2, max_length=160, gradient_checkpointing=False,
                                 precompute_ref=True, ref_cache_gb=4.0, noise_chunk_size=256, gen_batch_size=6,
                                 max_prompt_length=96, max_new_tokens=6, memory_check=True, history=1, max_prompts=6)
    assert memplan.preflight(args, 1, torch.device("cpu")) == "none"
    out = capsys.readouterr().out
    assert out.startswith("memory plan per rank: none over 1 rank(s)") and "policy parameters (fp32)" in out
    assert "reference cache                        0.12 MiB" in out  # 6 pairs × 160 tokens × 32 × 4 B < 4 GiB
    args.max_prompts = 0  # all prompts: only --ref-cache-gb bounds it
    assert memplan.cache_bound(args, memplan.Shape(1, 1, 1, 32, 1, 1, 1), torch.device("cpu")) == 4 * 2 ** 30
    assert memplan.preflight(args, 2, torch.device("cpu")) == "ddp"  # a tiny model: DDP
    args.dist = "fsdp"
    assert memplan.preflight(args, 2, torch.device("cpu")) == "fsdp" and "FSDP working set" in capsys.readouterr().out
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=259, tie_word_embeddings=True)
    shape = memplan.model_shape(config)  # tied: the embedding is counted once, and sits in FSDP's root group
    assert shape.params == 259 * 32 + 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32) + 32
    assert shape.root_params == 259 * 32 + 32
