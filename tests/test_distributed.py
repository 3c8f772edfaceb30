"""Tests of distributed.py: FSDP2 under torchrun (2 gloo ranks on CPU) against one process with the
double batch, kill/resume through the sharded DCP checkpoint, the checkpoint round trip and the
gathered save_pretrained() in one process (a 1-rank gloo group), and pickle-free loading."""
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import checkpoint as ckpt
import distributed
import errors
import model as models
import noise as noises
from conftest import fresh_copy, make_tiny_model, make_tiny_tokenizer, model_weights, read_jsonl, tiny_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent  # the repository


@pytest.fixture
def one_rank():
    """A 1-rank gloo process group in this process (FSDP2 and DCP's collectives need one)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def torchrun(run_dir, *flags):
    """train.py under torchrun with 2 CPU gloo ranks; the completed process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENAI_API_KEY": "unused"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "train.py", "--device", "cpu", "--dist", "fsdp", *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def strip(rows):
    return [{k: v for k, v in r.items() if k not in ("time_s", "tokens_per_s")} for r in rows]


def test_two_process_fsdp_matches_one_process_with_the_double_batch(iter0_run, tmp_path):  # noqa: F811
    """FSDP over 2 gloo ranks of batch 1 == 1 process of batch 2 (SPIN, iteration 0) to 1e-5, and its
    checkpoint is sharded: one DCP file per rank, meta.json, no state.pt."""
    run_dir = tmp_path / "run"
    (run_dir / "iter0").mkdir(parents=True)
    for name in ("generated.jsonl", "judged.jsonl", "pairs.jsonl"):  # the same pairs as the single run
        shutil.copy(iter0_run / "iter0" / name, run_dir / "iter0" / name)
    if (iter0_run / "iter0" / "stages.json").is_file():  # main's stage records: what the copied files were made from
        records = json.loads((iter0_run / "iter0" / "stages.json").read_text())
        records.pop("train", None)  # training runs anew with 2 processes
        (run_dir / "iter0" / "stages.json").write_text(json.dumps(records))
    single = json.loads((iter0_run / "iter0" / "config.json").read_text())
    flags = tiny_flags(run_dir, single["base_model"])
    flags[flags.index("--batch-size") + 1] = "1"
    proc = torchrun(run_dir, "--iter", "0", *flags, "--keep-checkpoint")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "memory plan per rank: fsdp over 2 rank(s)" in proc.stdout
    sharded = run_dir / "iter0" / "checkpoint" / "sharded"
    assert {p.name for p in sharded.iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp", "meta.json"}
    assert not (run_dir / "iter0" / "checkpoint" / "state.pt").exists()
    assert json.loads((sharded / "meta.json").read_text())["step"] == 6
    a, b = model_weights(iter0_run / "iter0" / "model"), model_weights(run_dir / "iter0" / "model")
    assert a.keys() == b.keys()
    for key in a:  # observed: max |Δ| 2.2e-7 (float rounding of reduce-scatter vs one process)
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    for x, y in zip(read_jsonl(iter0_run / "iter0" / "metrics.jsonl"), read_jsonl(run_dir / "iter0" / "metrics.jsonl"),
                    strict=True):
        assert x["step"] == y["step"] and x["loss"] == pytest.approx(y["loss"], abs=1e-6)
    for x, y in zip(read_jsonl(iter0_run / "iter0" / "logps.jsonl"), read_jsonl(run_dir / "iter0" / "logps.jsonl"),
                    strict=True):
        assert x["id"] == y["id"] and x["chosen_logp"] == pytest.approx(y["chosen_logp"], abs=1e-3)
    assert (json.loads((run_dir / "iter0" / "model" / "config.json").read_text())
            == json.loads((iter0_run / "iter0" / "model" / "config.json").read_text()))


def test_two_process_fsdp_resume_after_kill_gives_the_same_weights(iter0_run, tmp_path):  # noqa: F811
    """DNPO (trainable noise, iteration 1) under FSDP stopped after step 5 (sharded checkpoint at step 4)
    and rerun ends bit-identical to the uninterrupted 2-rank run: policy shards, generator, RMSprop
    state, schedule and every RNG come back exactly."""
    whole, killed = fresh_copy(iter0_run, tmp_path / "a"), fresh_copy(iter0_run, tmp_path / "b")
    flags = ["--iter", "1", *tiny_flags(whole, "unused")]
    flags[flags.index("--batch-size") + 1] = "1"
    proc = torchrun(whole, *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    flags[flags.index("--run-dir") + 1] = str(killed)
    proc = torchrun(killed, *flags, "--stop-after-steps", "5")
    assert proc.returncode != 0 and "stopped after 5 steps" in proc.stderr
    meta = distributed.load_meta(killed / "iter1" / "checkpoint" / "state.pt")
    assert meta["step"] == 4 and len(meta["noise_rng"]) == 2 and len(meta["param_groups"]) == 2
    proc = torchrun(killed, *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming " + str(killed / "iter1" / "checkpoint" / "sharded") + " at step 4/6" in proc.stdout
    a, b = model_weights(whole / "iter1" / "model"), model_weights(killed / "iter1" / "model")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    rows = read_jsonl(whole / "iter1" / "metrics.jsonl")
    assert strip(rows) == strip(read_jsonl(killed / "iter1" / "metrics.jsonl"))
    assert all(r["sigma2"] > 0 for r in rows), "the noise generator trained"
    assert not (killed / "iter1" / "checkpoint" / "sharded").exists(), "removed once the model is saved"


def tiny_setup(seed=0):
    """A tiny policy sharded as train.py does (1 rank), a noise generator, one optimizer of two groups."""
    tokenizer = make_tiny_tokenizer()
    policy = make_tiny_model(tokenizer, seed=seed).float().train()
    args = types.SimpleNamespace(precompute_ref=True, noise_chunk_size=16, dist="fsdp", dtype=None, fp32_head=True)
    module = distributed.prepare(policy, args, torch.device("cpu"))
    torch.manual_seed(seed + 1)
    generator = noises.NoiseGenerator(32, len(tokenizer), init_std=0.02)
    optimizer = torch.optim.RMSprop([dict(params=list(policy.parameters()), lr=1e-3),
                                     dict(params=list(generator.parameters()), lr=1e-2)])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + s))
    return tokenizer, policy, module, generator, optimizer, scheduler


def train_step(module, generator, optimizer, scheduler, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (4, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    logps = module(dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels))
    loss = -logps.mean() + generator(torch.randn(7, 32, generator=g)).mean()
    loss.backward()
    norm = distributed.clip_grad_norm(list(module.parameters()), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def full_params(module):
    return {k: (v.full_tensor() if isinstance(v, distributed.DTensor) else v).detach().clone()
            for k, v in module.named_parameters()}


def test_sharded_checkpoint_round_trip_is_exact(one_rank, tmp_path):
    """save_sharded after 2 steps, then a 3rd step; fresh objects restored from the checkpoint take the
    same 3rd step to the same bits (policy, generator, optimizer state, schedule, RNG)."""
    _, policy, module, generator, optimizer, scheduler = tiny_setup()
    assert isinstance(policy.lm_head.weight, distributed.DTensor) and isinstance(module, distributed.FSDPModule)
    for s in range(2):
        norm = train_step(module, generator, optimizer, scheduler, s)
    assert norm.ndim == 0 and not isinstance(norm, distributed.DTensor) and torch.isfinite(norm)
    state_path = tmp_path / "checkpoint" / "state.pt"
    noise_rng = torch.Generator().manual_seed(5)
    torch.randn(3, generator=noise_rng)
    args, schedule = types.SimpleNamespace(lr=1e-3, seed=0), scheduler.state_dict()
    distributed.save_sharded(state_path, module, generator, optimizer, dict(
        scheduler=schedule, rng=ckpt.rng_state(), noise_rng=[noise_rng.get_state()], step=2, epoch=0, args=vars(args)))
    assert sorted(p.name for p in state_path.parent.iterdir()) == ["sharded"]
    expected_draws = (torch.rand(3), np.random.rand(), torch.randn(2, generator=noise_rng))
    train_step(module, generator, optimizer, scheduler, 2)
    expected = {**full_params(module), **{f"generator.{k}": v.detach().clone() for k, v in generator.named_parameters()}}

    _, _, module2, generator2, optimizer2, scheduler2 = tiny_setup(seed=3)  # other weights, to be overwritten
    noise_rng2 = torch.Generator()
    meta = distributed.load_meta(state_path)
    assert distributed.restore_sharded(meta, args, ("lr", "seed"), 0, module2, generator2, optimizer2, scheduler2,
                                       noise_rng2) == 2
    draws = (torch.rand(3), np.random.rand(), torch.randn(2, generator=noise_rng2))
    assert draws[0].equal(expected_draws[0]) and draws[1] == expected_draws[1] and draws[2].equal(expected_draws[2])
    assert scheduler2.state_dict() == schedule and optimizer2.param_groups[1]["lr"] == 1e-2 * (1 / 3)  # after 2 steps
    train_step(module2, generator2, optimizer2, scheduler2, 2)
    got = {**full_params(module2), **{f"generator.{k}": v.detach().clone() for k, v in generator2.named_parameters()}}
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    with pytest.raises(errors.Refusal, match=r"written with lr=0\.001"):
        distributed.restore_sharded(meta, types.SimpleNamespace(lr=2e-3, seed=0), ("lr", "seed"), 0, module2,
                                    generator2, optimizer2, scheduler2, noise_rng2)


def test_gathered_model_equals_the_unsharded_save(one_rank, tmp_path):
    """save_full_model of the sharded policy writes the files models.save_model writes for the plain one."""
    tokenizer = make_tiny_tokenizer()
    plain = make_tiny_model(tokenizer).float()
    models.save_model(plain.to(torch.bfloat16), tokenizer, tmp_path / "plain")
    _, policy, _, _, _, _ = tiny_setup()
    distributed.save_full_model(policy, tokenizer, tmp_path / "gathered", torch.bfloat16)
    a, b = model_weights(tmp_path / "plain"), model_weights(tmp_path / "gathered")
    assert a.keys() == b.keys() and all(a[k].dtype == torch.bfloat16 and a[k].equal(b[k]) for k in a)
    for name in ("config.json", "generation_config.json"):
        assert (json.loads((tmp_path / "plain" / name).read_text())
                == json.loads((tmp_path / "gathered" / name).read_text()))
    reloaded, _ = models.load_model(str(tmp_path / "gathered"), device="cpu")
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight, "the tie survives"


class Payload:
    """Unpickling this runs code: it creates the file named by `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_loading_runs_no_pickle_code(tmp_path):
    """SafeReader reads DCP's .metadata with only DCP's metadata classes allowed, refuses non-tensor items
    (which DCP would unpickle with weights_only=False), and still loads a tensors-only checkpoint."""
    good = tmp_path / "good"
    saved = {"w": torch.randn(3, 4), "b": torch.zeros(2, dtype=torch.bfloat16), "step": torch.tensor(3.0)}
    dcp.save(saved, checkpoint_id=good)
    loaded = {k: torch.empty_like(v) for k, v in saved.items()}
    dcp.load(loaded, storage_reader=distributed.SafeReader(good))
    assert all(loaded[k].equal(saved[k]) for k in saved)

    evil, marker = tmp_path / "evil", tmp_path / "pwned"
    shutil.copytree(good, evil)
    (evil / ".metadata").write_bytes(pickle.dumps(Payload(str(marker))))
    with pytest.raises(CheckpointException, match=r"pathlib\.Path\.touch: refused"):
        dcp.load(loaded, storage_reader=distributed.SafeReader(evil))
    assert not marker.exists(), "the payload ran"
    pickle.loads((evil / ".metadata").read_bytes())  # the same file under plain pickle does run it:
    assert marker.exists()  # so the refusal above is what protected us

    mixed = tmp_path / "mixed"
    dcp.save({"w": torch.randn(2), "lr": 0.1}, checkpoint_id=mixed)
    with pytest.raises(CheckpointException, match=r"non-tensor items \['lr'\]: refused"):
        dcp.load({"w": torch.empty(2), "lr": 0.0}, storage_reader=distributed.SafeReader(mixed))


def test_other_checkpoint_format_is_refused(tmp_path):
    """A state.pt (DDP / one process) is not silently restarted under --dist fsdp, nor the reverse."""
    state_path = tmp_path / "checkpoint" / "state.pt"
    distributed.check_format(state_path, "fsdp")
    distributed.check_format(state_path, "ddp")
    state_path.parent.mkdir()
    state_path.write_bytes(b"")
    with pytest.raises(errors.Refusal, match="--dist ddp or a single process") as err:
        distributed.check_format(state_path, "fsdp")
    assert "\n" not in str(err.value)
    state_path.unlink()
    (state_path.parent / "sharded").mkdir()
    with pytest.raises(errors.Refusal, match="--dist fsdp"):
        distributed.check_format(state_path, "none")


def test_rng_state_survives_json():
    """meta.json holds the RNG states as JSON (no pickle): restoring them reproduces every generator's draws."""
    import random
    state = json.loads(json.dumps(distributed._encode(ckpt.rng_state())))
    expected = (random.random(), np.random.rand(), torch.rand(2))
    ckpt.set_rng_state(distributed._decode(state))
    assert (random.random(), np.random.rand()) == expected[:2] and torch.rand(2).equal(expected[2])


@pytest.mark.parametrize("max_norm", [0.0, 1e-3, 1e6])
def test_clip_grad_norm_returns_the_norm_and_clips_only_when_on(max_norm):
    """The pre-clip norm against float64 by hand, whatever max_norm; 0 (clipping off) leaves the gradients as
    they are (train.py logs the real norm with --max-grad-norm 0), a small max_norm scales them to it."""
    layer = torch.nn.Linear(5, 3)
    layer(torch.randn(4, 5, generator=torch.Generator().manual_seed(0))).square().sum().backward()
    before = [p.grad.clone() for p in layer.parameters()]
    by_hand = sum(float(g.double().square().sum()) for g in before) ** 0.5
    norm = distributed.clip_grad_norm(layer.parameters(), max_norm)
    assert float(norm) == pytest.approx(by_hand, rel=1e-6)
    after = [p.grad for p in layer.parameters()]
    if max_norm == 0.0 or max_norm > by_hand:
        assert all(torch.equal(a, b) for a, b in zip(after, before))
    else:
        assert sum(float(g.double().square().sum()) for g in after) ** 0.5 == pytest.approx(max_norm, rel=1e-4)
