"""Tests of train.py (the iteration driver and the loop), checkpoint.py, rundir.py and sampler.py, on the tiny
random model."""
import importlib.util
import itertools
import json
import pathlib
import re
import shutil
import types

import pytest
import torch

import checkpoint as ckpt
import data
import loss
import rundir
import sampler
import step as steps
import train
from conftest import SECRET, fresh_copy, make_tiny_model, make_tiny_tokenizer, model_weights, read_jsonl, tiny_flags

METRIC_KEYS = {"iter", "step", "epoch", "loss", "model_loss", "noise_loss", "variance_penalty", "margin",
               "noisy_margin", "reward_acc", "sigma2", "lr", "tokens_per_s", "time_s", "grad_norm",
               *steps.DIAGNOSTICS}


def check_iteration(it_dir, k, steps, n_logps):
    """Every file of one iteration exists with the contract's schema."""
    for name in ("generated.jsonl", "judged.jsonl", "pairs.jsonl", "metrics.jsonl", "logps.jsonl",
                 "summary.json", "config.json", "model/config.json", "model/model.safetensors"):
        assert (it_dir / name).is_file(), f"{it_dir / name} missing"
    generated = read_jsonl(it_dir / "generated.jsonl")
    assert len(generated) == 6 and all({"id", "prompt", "human", "generated"} <= set(r) for r in generated)
    judged = read_jsonl(it_dir / "judged.jsonl")
    assert all({"human_score", "generated_score", "judge"} <= set(r) for r in judged)
    pairs = read_jsonl(it_dir / "pairs.jsonl")
    assert pairs and all(set(r) >= {"id", "prompt", "chosen", "rejected", "chosen_source"} for r in pairs)
    metrics = read_jsonl(it_dir / "metrics.jsonl")
    assert [r["step"] for r in metrics] == list(range(1, steps + 1))
    assert all(set(r) == METRIC_KEYS and r["iter"] == k for r in metrics)
    logps = read_jsonl(it_dir / "logps.jsonl")
    assert [r["stage"] for r in logps] == ["start"] * n_logps + ["end"] * n_logps
    assert all(set(r) == {"stage", "id", "chosen_logp", "rejected_logp", "chosen_tokens", "rejected_tokens",
                          "chosen_source"} for r in logps)
    summary = json.loads((it_dir / "summary.json").read_text())
    assert {"iter", "pairs", "dsl_flips", "ties", "missing_scores", "final_margin", "final_reward_acc",
            "wall_s"} <= set(summary) and summary["iter"] == k and summary["steps"] == steps
    assert not (it_dir / "checkpoint" / "state.pt").exists(), "the checkpoint is removed once the model is saved"
    return pairs, metrics, summary


def test_iter0_then_iter1_end_to_end(iter0_run, tmp_path, monkeypatch, capsys):
    """--iter 0 is SPIN from the base model, --iter 1 trains DNPO from iter0/model; every file has its schema."""
    it0 = iter0_run / "iter0"
    pairs0, metrics0, summary0 = check_iteration(it0, 0, steps=6, n_logps=3)
    assert all(p["chosen_source"] == "human" for p in pairs0), "iteration 0 keeps human = chosen"
    assert all(r["sigma2"] == 0 and r["noise_loss"] == 0 for r in metrics0), "iteration 0 has no noise"
    assert all(r["kl_noise"] == 0 and r["margin_offset"] == 0 and r["weight_shift"] == 0 and r["dpo_weight_ratio"] == 1
               for r in metrics0), "no noise: the diagnostics say so"
    config0 = json.loads((it0 / "config.json").read_text())
    assert config0["dsl"] is False and config0["noise"] == "none" and config0["iter"] == 0
    run_dir = fresh_copy(iter0_run, tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    train.main(["--iter", "1", *tiny_flags(run_dir, "unused-at-iter-1")])
    it1 = run_dir / "iter1"
    _, metrics1, summary1 = check_iteration(it1, 1, steps=6, n_logps=3)
    config1 = json.loads((it1 / "config.json").read_text())
    assert config1["dsl"] is True and config1["noise"] == "trainable"
    assert config1["start_model"] == str(run_dir / "iter0" / "model")
    assert all(r["sigma2"] > 0 and r["noise_loss"] < 0 for r in metrics1), "trainable noise is on at k = 1"
    assert all(r["kl_noise"] > 0 and r["sigma2_target"] > 0 and r["sigma2_topk"] > 0 and r["dpo_weight"] > 0
               for r in metrics1), "the noise diagnostics are logged"
    assert metrics1[0]["sigma2_target"] == pytest.approx(0.01, rel=1e-4), "σ² starts at --noise-init-variance"
    for path in list(iter0_run.rglob("*")) + list(run_dir.rglob("*")):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".txt"):
            assert SECRET not in path.read_text(), f"{path} holds the API key"
    w0, w1 = model_weights(it0 / "model"), model_weights(it1 / "model")
    assert any(not torch.equal(w0[k], w1[k]) for k in w0), "iteration 1 changed the weights"
    capsys.readouterr()
    train.main(["--iter", "1", *tiny_flags(run_dir, "unused")])  # a finished iteration: nothing to do
    assert "nothing to do" in capsys.readouterr().out
    assert read_jsonl(it1 / "metrics.jsonl") == metrics1


def test_pipeline_doc_names_every_metrics_column(iter0_run):
    """docs/pipeline.md's metrics.jsonl columns are exactly the keys of a row train.py writes (the text in
    parentheses is a note, not a column)."""
    lines = (pathlib.Path(train.__file__).parent / "docs" / "pipeline.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("metrics.jsonl ") and "columns:" in line)
    entry = [lines[start]] + list(itertools.takewhile(lambda line: line.startswith(" " * 31), lines[start + 1:]))
    text = re.sub(r"\([^)]*\)", "", " ".join(entry).split("columns:", 1)[1])
    documented = [name.strip() for name in text.split(",")]
    row = read_jsonl(iter0_run / "iter0" / "metrics.jsonl")[0]
    assert len(documented) == len(set(documented)) and set(documented) == set(row), set(documented) ^ set(row)


def test_resume_after_kill_gives_the_same_weights(iter0_run, tmp_path):
    """An iteration stopped after step 5 (last checkpoint at step 4, mid-epoch) and rerun ends bit-identical."""
    whole, killed = fresh_copy(iter0_run, tmp_path / "a"), fresh_copy(iter0_run, tmp_path / "b")
    train.main(["--iter", "1", *tiny_flags(whole, "unused")])
    with pytest.raises(SystemExit, match="stopped after 5 steps"):
        train.main(["--iter", "1", *tiny_flags(killed, "unused"), "--stop-after-steps", "5"])
    state = ckpt.load_checkpoint(killed / "iter1" / "checkpoint" / "state.pt")
    assert state["step"] == 4 and len(read_jsonl(killed / "iter1" / "metrics.jsonl")) == 5
    train.main(["--iter", "1", *tiny_flags(killed, "unused")])
    a, b = model_weights(whole / "iter1" / "model"), model_weights(killed / "iter1" / "model")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("time_s", "tokens_per_s")} for r in rows]  # noqa
    assert strip(read_jsonl(whole / "iter1" / "metrics.jsonl")) == strip(read_jsonl(killed / "iter1" / "metrics.jsonl"))


def test_unclipped_run_logs_the_real_gradient_norm(iter0_run, tmp_path):
    """--max-grad-norm 0 turns clipping off, not the measurement: steps 1-2 (same weights: the warmup's lr is 0 at
    step 1) log the same pre-clip norm as a clipped run, and step 3 differs because step 2 was not clipped."""
    clipped, unclipped = fresh_copy(iter0_run, tmp_path / "a"), fresh_copy(iter0_run, tmp_path / "b")
    with pytest.raises(SystemExit, match="stopped after 3 steps"):
        train.main(["--iter", "1", *tiny_flags(clipped, "unused"), "--max-grad-norm", "1e-3", "--stop-after-steps", "3"])
    with pytest.raises(SystemExit, match="stopped after 3 steps"):
        train.main(["--iter", "1", *tiny_flags(unclipped, "unused"), "--max-grad-norm", "0", "--stop-after-steps", "3"])
    a, b = (read_jsonl(d / "iter1" / "metrics.jsonl") for d in (clipped, unclipped))
    assert all(a[i]["grad_norm"] > 1e-3 and b[i]["grad_norm"] == pytest.approx(a[i]["grad_norm"], rel=1e-5)
               for i in (0, 1))
    assert abs(b[2]["grad_norm"] - a[2]["grad_norm"]) > 1e-5 * a[2]["grad_norm"]  # float noise here is ~1e-7


def test_resume_refuses_changed_training_flags(iter0_run, tmp_path):
    """A checkpoint written with --lr x is not silently continued with another --lr."""
    run_dir = fresh_copy(iter0_run, tmp_path)
    with pytest.raises(SystemExit):
        train.main(["--iter", "1", *tiny_flags(run_dir, "unused"), "--stop-after-steps", "2"])
    with pytest.raises(SystemExit, match=r"lr=0\.001; rerun with those flags") as err:
        train.main(["--iter", "1", *tiny_flags(run_dir, "unused"), "--lr", "2e-3"])
    assert "\n" not in str(err.value)


def tiny_batch(tokenizer, n_pairs=3):
    pairs = [dict(id=str(i), prompt=f"What is {i} + {i}?", chosen=f"It is {2 * i}.", rejected=f"Maybe {i}{i} or so.")
             for i in range(n_pairs)]
    return [data.tokenize_pair(tokenizer, p, 128, 64) for p in pairs]


def test_noise_none_is_exactly_the_spin_loss_on_a_batch():
    """batch_loss with --noise none equals spin_loss on log-probs computed one sequence at a time, unpadded."""
    tokenizer = make_tiny_tokenizer()
    policy, reference = make_tiny_model(tokenizer, seed=1).double(), make_tiny_model(tokenizer, seed=2).double()
    examples = tiny_batch(tokenizer)
    batch = data.collate_pairs(examples, tokenizer.pad_token_id)
    args = train.steps.Objective(noise="none", beta=0.1, alpha=1.0, loss_type="sigmoid", chunk_size=16)
    out = train.steps.batch_loss(policy, reference, None, batch, args, None, torch.autocast("cpu", enabled=False))

    def one(model, ids, labels):  # one unpadded sequence
        ids, labels = torch.tensor([ids]), torch.tensor([labels])
        return loss.sequence_logps(model(input_ids=ids).logits, labels)[0]
    logps = {(name, side): torch.stack([one(m, e[f"{side}_input_ids"], e[f"{side}_labels"]) for e in examples])
             for name, m in (("policy", policy), ("ref", reference)) for side in ("chosen", "rejected")}
    losses, _, _ = loss.spin_loss(logps["policy", "chosen"], logps["policy", "rejected"], logps["ref", "chosen"],
                                  logps["ref", "rejected"], beta=0.1)
    torch.testing.assert_close(out["loss"], losses.mean(), rtol=1e-10, atol=1e-12)
    assert out["noise_loss"] == 0 and out["variance_penalty"] == 0 and out["sigma2"] == 0


def test_reference_last_hidden_state_is_the_lm_head_input():
    """hidden_states[-1] of HF Llama is after the final norm: lm_head(h) reproduces the logits (departure 3)."""
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(tokenizer)
    out = model(input_ids=torch.randint(0, 256, (2, 9)), output_hidden_states=True)
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1]), out.logits)


def test_nonfinite_loss_stops_with_a_message(iter0_run, tmp_path, monkeypatch):
    """A NaN loss at step 3 stops the run naming iter and step, and keeps the step-2 checkpoint."""
    run_dir = fresh_copy(iter0_run, tmp_path)
    real, calls = train.steps.dnpo_loss, []

    def poisoned(*a, **kw):
        out = real(*a, **kw)
        calls.append(1)
        if len(calls) == 3:
            out["loss"] = out["loss"] * float("nan")
        return out
    monkeypatch.setattr(train.steps, "dnpo_loss", poisoned)  # both paths (step.cached_batch_loss, step.batch_loss)
    with pytest.raises(SystemExit, match="iter 1 step 3: non-finite loss") as err:
        train.main(["--iter", "1", *tiny_flags(run_dir, "unused")])
    assert "\n" not in str(err.value)
    assert ckpt.load_checkpoint(run_dir / "iter1" / "checkpoint" / "state.pt")["step"] == 2


@pytest.mark.parametrize("argv, message", [
    (["--iter", "0", "--noise", "loud"], "--noise"),
    (["--iter", "0", "--beta", "-1"], "--beta must be > 0"),
    (["--iter", "0", "--max-length", "64", "--max-prompt-length", "64"], "--max-prompt-length"),
    (["--iter", "0", "--preset", "paper"], "needs --data"),
    (["--lr", "1e-5"], "--iter"),
    (["--iter", "-1"], "--iter must be"),
    (["--iter", "0", "--judge", "hf"], "--judge-model"),
    (["--iter", "0", "--judge-mode", "pairwise"], "--judge-mode pairwise needs --judge openai"),
    (["--iter", "0", "--judge-scale", "100"], "--judge rule scores 1..10 only"),
    (["--iter", "0", "--judge-scale", "7"], "--judge-scale"),
])
def test_bad_flags_give_one_line_errors(argv, message):
    """A flag no run can use is a one-line SystemExit naming the flag, before any work."""
    with pytest.raises(SystemExit) as err:
        train.main(argv)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_previous_iteration_names_the_command(tmp_path):
    """--iter 2 without iter1/model tells which command to run first."""
    with pytest.raises(SystemExit) as err:
        train.main(["--iter", "2", "--run-dir", str(tmp_path)])
    assert f"python train.py --iter 1 --run-dir {tmp_path}" in str(err.value) and "\n" not in str(err.value)


def test_linear_schedule_matches_hand_values():
    """train.py's schedule, warmup 2 of 10 steps: 0, 0.5, then 1 decaying linearly to 1/8 at the last step."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = train.get_linear_schedule_with_warmup(optimizer, 2, 10)
    lrs = []
    for _ in range(10):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs == [0, 0.5, 1, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8]


def test_rank_shards_of_one_step_are_the_single_process_batch():
    """With W ranks of batch b, step i sees the same examples as one process with batch W·b."""
    order = sampler.epoch_order(13, seed=3, epoch=1)
    assert sorted(order) == list(range(13)) and order == sampler.epoch_order(13, seed=3, epoch=1)
    assert order != sampler.epoch_order(13, seed=3, epoch=2)
    single = sampler.rank_microbatches(order, 0, 1, 4)
    shards = [sampler.rank_microbatches(order, r, 2, 2) for r in range(2)]
    padded = order + order[:1]  # 13 → 14, wrapped as DistributedSampler does
    assert [sorted(a + b) for a, b in zip(*shards)] == [sorted(padded[i:i + 4]) for i in range(0, 14, 4)]
    assert len(single) == sampler.steps_per_epoch(13, 1, 4, 1) == 4
    assert sampler.steps_per_epoch(13, 2, 2, 2) == 2


def test_two_process_ddp_matches_one_process_with_the_double_batch(iter0_run, tmp_path):
    """torchrun, 2 gloo ranks of batch 1 == 1 process of batch 2 (SPIN, iteration 0), up to float rounding."""
    import os
    import subprocess
    import sys
    run_dir = tmp_path / "run"
    (run_dir / "iter0").mkdir(parents=True)
    for name in ("generated.jsonl", "judged.jsonl", "pairs.jsonl"):  # the same pairs as the single run
        shutil.copy(iter0_run / "iter0" / name, run_dir / "iter0" / name)
    records = json.loads((iter0_run / "iter0" / "stages.json").read_text())
    del records["train"]  # what the three files were made from; training runs anew with 2 processes
    (run_dir / "iter0" / "stages.json").write_text(json.dumps(records))
    assert len(read_jsonl(run_dir / "iter0" / "pairs.jsonl")) % 2 == 0, "an even count: no wrap-around padding"
    single = json.loads((iter0_run / "iter0" / "config.json").read_text())
    flags = tiny_flags(run_dir, single["base_model"])
    flags[flags.index("--batch-size") + 1] = "1"
    tensorboard = importlib.util.find_spec("tensorboard") is not None  # then: only rank 0 reports (tracking.py)
    flags += ["--report-to", "tensorboard"] if tensorboard else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "train.py", "--iter", "0", "--device", "cpu", *flags], cwd=pathlib.Path(__file__).resolve().parent.parent,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run_dir / "iter0" / "config.json").read_text())["world_size"] == 2
    assert len(read_jsonl(run_dir / "iter0" / "metrics.jsonl")) == 6
    if tensorboard:  # one event file, from one process
        assert len(list((run_dir / "iter0").glob("events.out.tfevents.*"))) == 1
    a, b = model_weights(iter0_run / "iter0" / "model"), model_weights(run_dir / "iter0" / "model")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_summary_has_no_nan_when_no_record_has_both_scores():
    """A NaN flip rate (no record with both scores) is written as null: summary.json stays valid JSON."""
    args = types.SimpleNamespace(iter=1, start_model="m", dsl=True, noise="trainable")
    summary = rundir.summarize(args, [], {"flip_rate": float("nan")}, [], 0.0, 0.0)
    assert summary["flip_rate"] is None
    json.dumps(summary, allow_nan=False)
