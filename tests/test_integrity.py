"""No wrong number, no broken model (issue 26): a diverged step is never saved and names its likely cause,
every written checkpoint is finite, a run that cannot take a real step or cannot run on the asked device
stops in one line before any work; on the tiny random model."""
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import config
import data
import distributed
import generate
import tracking
import train
from conftest import fresh_copy, tiny_flags
from test_train_guards import URL, refused


def iter1(run_dir, *extra):
    return ["--iter", "1", *tiny_flags(run_dir, "unused"), "--judge-base-url", URL, *extra]


def all_tensors_finite(obj):
    return all(bool(torch.isfinite(t).all()) for t in distributed.state_tensors(obj) if t.is_floating_point())


# ----------------------------------------------------------------------------- finite before saved
def test_diverged_step_is_never_saved_and_names_the_learning_rate(iter0_run, tmp_path):
    """The issue's reproduction: plain SGD at lr 3e38 without clipping overflows the weights in step 1. Before,
    the run exited 0 with non-finite tensors in iter1/model; now it stops at step 1 naming --lr, saving nothing."""
    run_dir = fresh_copy(iter0_run, tmp_path)
    flags = iter1(run_dir, "--lr", "3e38", "--beta", "1e6", "--optimizer", "sgd", "--max-grad-norm", "0",
                  "--warmup-ratio", "0", "--batch-size", "6", "--epochs", "1", "--save-every", "1")
    message = refused(flags, "iter 1 step 1", "policy weights are non-finite after the optimizer step",
                      "nothing of this step saved", "no checkpoint was written yet", "likely cause: --lr 3e+38")
    assert "--max-grad-norm 0" in message
    assert not (run_dir / "iter1" / "model").exists()
    assert not (run_dir / "iter1" / "checkpoint" / "state.pt").exists()


def test_last_checkpoint_is_finite_after_a_weight_decay_blowup(iter0_run, tmp_path):
    """lr · weight decay ≥ 1 (the issue's --weight-decay 1e300 is now refused as beyond float32): each step
    multiplies the weights by 1 − lr·wd until they overflow. The run stops at the failing step; the kept
    checkpoint is the step before it and holds only finite tensors (before: non-finite ones, so every rerun
    failed), no metrics row of the failed step is logged, and the message names --weight-decay first."""
    run_dir = fresh_copy(iter0_run, tmp_path)
    flags = iter1(run_dir, "--weight-decay", "1e30", "--save-every", "1")
    message = refused(flags, "non-finite", "the last checkpoint", "is kept", "likely cause: --weight-decay 1e+30")
    failed = int(re.search(r"step (\d+):", message).group(1))
    state = torch.load(run_dir / "iter1" / "checkpoint" / "state.pt", weights_only=True)
    assert failed >= 2 and state["step"] == failed - 1 and all_tensors_finite(state)
    rows = [json.loads(line) for line in (run_dir / "iter1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, failed))  # the failed step's row is never logged


def test_checkpoint_with_non_finite_state_is_refused_on_resume(iter0_run, tmp_path):
    """A state.pt written by a diverged run before this check existed: refused in one line, not resumed."""
    run_dir = fresh_copy(iter0_run, tmp_path)
    with pytest.raises(SystemExit, match="stopped after 2 steps"):
        train.main(iter1(run_dir, "--stop-after-steps", "2"))
    path = run_dir / "iter1" / "checkpoint" / "state.pt"
    state = torch.load(path, weights_only=True)
    next(iter(state["policy"].values())).view(-1)[0] = float("nan")
    torch.save(state, path)
    refused(iter1(run_dir), str(path), "non-finite", f"delete {path.parent}")


def test_optimizer_state_overflow_is_not_checkpointed(iter0_run, tmp_path, monkeypatch):
    """Finite weights but an overflowed moment (as from grad² beyond float32): the checkpoint is not written."""
    run_dir = fresh_copy(iter0_run, tmp_path)
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        out = real_step(self, *a, **k)
        for s in self.state.values():
            s["exp_avg_sq"].view(-1)[0] = float("inf")  # the weights stay finite
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    refused(iter1(run_dir), "step 2", "optimizer state is non-finite", "no checkpoint was written yet")
    assert not (run_dir / "iter1" / "checkpoint" / "state.pt").exists()


def test_start_model_with_non_finite_weights_is_refused(tiny_model_dir, tmp_path):
    """A model saved by a diverged run (before this check) is refused as a start model, not trained on."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(tiny_model_dir):
        shutil.copy(os.path.join(tiny_model_dir, name), broken / name)
    weights = load_file(str(broken / "model.safetensors"))
    next(iter(weights.values())).view(-1)[0] = float("inf")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    refused(["--iter", "1", *tiny_flags(tmp_path / "run", "unused"), "--start-model", str(broken)],
            "start model", str(broken), "non-finite weights")
    assert not (tmp_path / "run" / "iter1" / "generated.jsonl").exists()


def test_all_finite_is_exact():
    """NaN and ±inf anywhere fail, in any dtype, also beside huge finite weights whose 2-norm overflows float32
    (the fast test's inf, decided by the exact max-|x|); those huge finite weights alone pass."""
    small = [torch.zeros(3, dtype=torch.bfloat16), torch.ones(2, dtype=torch.float64), torch.randn(7, 5)]
    huge = [torch.full((1000,), 3e38)]
    assert distributed.all_finite(small) and distributed.all_finite(small + huge)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for dtype in (torch.float32, torch.bfloat16):
            t = torch.ones(5, dtype=dtype)
            t[3] = bad
            assert not distributed.all_finite([*small, t]) and not distributed.all_finite([*huge, t])
    assert distributed.all_finite([]) and distributed.all_finite([torch.zeros(0)])
    opt_state = {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(4)}, 1: {"momentum_buffer": None}}
    assert len(list(distributed.state_tensors(opt_state))) == 2


@pytest.mark.parametrize("extra, part, first", [
    (["--weight-decay", "1e30"], "policy", "--weight-decay 1e+30"),
    (["--noise-lr", "50"], "noise", "--noise-lr 50"),
    (["--beta", "1e6", "--lr", "3e-6"], "loss", "--beta 1e+06"),
    (["--noise", "fixed", "--noise-sigma", "1e30", "--lr", "3e-6"], "loss", "--noise-sigma 1e+30"),
    (["--lr", "3e-6"], "policy", "--lr 3e-06 (lower it)"),
    (["--optimizer", "sgd", "--max-grad-norm", "0", "--lr", "3e-6"], "policy", "--max-grad-norm 0"),
])
def test_divergence_cause_names_the_flag(extra, part, first):
    args = config.parse_args(["--iter", "1", *extra])
    assert train.divergence_cause(args, part).startswith(first)


# ----------------------------------------------------------------------------- refused before any work
def test_lone_step_in_warmup_is_refused_before_generation(iter0_run, tmp_path):
    """One prompt, --batch-size 100: the only optimizer step would run at lr 0 (warmup) and save the start model
    unchanged under iteration 1's name. Refused before generation; --warmup-ratio 0 is named."""
    run_dir = fresh_copy(iter0_run, tmp_path)
    flags = iter1(run_dir, "--batch-size", "100", "--epochs", "1")
    flags[flags.index("--max-prompts") + 1] = "1"
    refused(flags, "one optimizer step", "lr 0", "--warmup-ratio 0")
    assert not (run_dir / "iter1").exists()


def test_lone_warmup_step_counts_steps():
    args = config.parse_args(["--iter", "1", "--batch-size", "4", "--epochs", "1"])
    assert train.lone_warmup_step(4, 1, args) and train.lone_warmup_step(1, 1, args)
    assert train.lone_warmup_step(5, 1, args) is None  # two steps: the second has lr > 0
    assert train.lone_warmup_step(8, 2, args) and train.lone_warmup_step(9, 2, args) is None
    args.warmup_ratio = 0.0
    assert train.lone_warmup_step(1, 1, args) is None  # no warmup: the one step has the peak lr
    args.warmup_ratio, args.epochs = 0.1, 2
    assert train.lone_warmup_step(1, 1, args) is None


@pytest.mark.parametrize("flag", ["--lr", "--noise-lr", "--noise-init-variance", "--noise-sigma", "--beta",
                                  "--weight-decay", "--noise-alpha"])
def test_values_beyond_float32_are_refused_when_parsed(flag):
    with pytest.raises(SystemExit, match=f"{flag} must be ≤ 3.403e\\+38 \\(the float32 range") as e:
        config.parse_args(["--iter", "1", flag, "1e300"])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("device, expected", [("cuda", "no CUDA GPU is available"), ("tpu", "is not a device"),
                                              ("cuda:7", "")])
def test_unusable_device_is_one_line_before_any_write(device, expected, tiny_model_dir, tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setattr(train.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    refused(["--iter", "0", *tiny_flags(tmp_path / "run", tiny_model_dir), "--device", device], expected)
    assert not (tmp_path / "run").exists()


def test_empty_run_dir_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = tiny_flags("", tiny_model_dir)
    refused(["--iter", "0", *flags], "--run-dir must name a directory")
    assert os.listdir(tmp_path) == []


def test_wandb_without_credentials_is_refused_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / "wb"))
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name, *a: object())  # "installed"
    monkeypatch.setattr(train.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    refused(["--iter", "0", *tiny_flags(tmp_path / "run", tiny_model_dir), "--report-to", "wandb"],
            "--report-to wandb has no W&B API key", "WANDB_MODE=offline")
    assert not (tmp_path / "run").exists()


def test_wandb_credentials_ways(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {"WANDB_CONFIG_DIR": str(home / "wb"), "NETRC": str(home / "netrc")}
    old = os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    try:
        assert tracking.wandb_credentials(env) is None
        assert tracking.wandb_credentials({**env, "WANDB_MODE": "offline"}) == "mode"
        assert tracking.wandb_credentials({**env, "WANDB_MODE": "online"}) is None
        assert tracking.wandb_credentials({**env, "WANDB_API_KEY": "x"}) == "env"
        (home / "wb").mkdir()
        (home / "wb" / "settings").write_text("[default]\nmode = offline\n")
        assert tracking.wandb_credentials(env) == "mode"
        (home / "wb" / "settings").write_text("[default]\nmode = online\n")
        (home / "netrc").write_text("machine api.wandb.ai\n  login user\n  password k\n")
        assert tracking.wandb_credentials(env) == "netrc"
        assert tracking.wandb_credentials({**env, "WANDB_BASE_URL": "https://wandb.example"}) is None
    finally:
        if old is None:
            os.environ.pop("HOME")
        else:
            os.environ["HOME"] = old


def test_no_pairs_message_says_every_answer_equals_the_human_one(iter0_run, tmp_path, monkeypatch):
    """The start model reproduces every human answer: DSL has no pair. Before, the stop message suggested missing
    judge scores; now it counts the identical answers."""
    run_dir = fresh_copy(iter0_run, tmp_path)

    def echo(model, tokenizer, records, out, **kw):
        rows = [{**r, "human": r["response"], "generated": r["response"]} for r in records]
        data.write_jsonl(out, rows)
        return rows
    monkeypatch.setattr(generate, "generate_answers", echo)
    message = refused(iter1(run_dir), "holds no pairs", "every generated answer equals its human answer (6 of 6)")
    assert "missing" not in message
