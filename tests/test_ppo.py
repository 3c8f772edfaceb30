"""Tests for ppo.py: every term of the objective against a hand computation or a float64 loop, the sampler
against the policy's own distribution, the KL term against full forwards, and runs on the tiny model (budget,
bit-identical resume after a stop, refused flag changes)."""
import json
import math

import pytest
import torch

import data
import ppo
from conftest import make_tiny_model, make_tiny_tokenizer, model_weights, read_jsonl


# ----------------------------------------------------------------------------- the terms, by hand
def test_kl_rewards_by_hand():
    """r_t = −β (log π_old − log π_ref) on answer tokens, the score added on each answer's last token, 0 off the mask."""
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -9.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, -9.0, -9.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    got = ppo.kl_rewards(torch.tensor([2.0, -1.0]), old, ref, mask, kl_coef=0.1)
    want = torch.tensor([[-0.1 * 0.5, -0.1 * -1.0, 2.0], [-0.1 * -0.2 - 1.0, 0.0, 0.0]])
    torch.testing.assert_close(got, want)


def gae_loop(rewards, values, lengths, gamma, lam):
    """The textbook GAE per answer in float64 Python: δ_t = r_t + γ V_{t+1} − V_t, A_t = Σ_l (γλ)^l δ_{t+l}."""
    adv, ret = [], []
    for r, v, n in zip(rewards.tolist(), values.tolist(), lengths):
        v = v[:n] + [0.0]
        deltas = [r[t] + gamma * v[t + 1] - v[t] for t in range(n)]
        a = [sum((gamma * lam) ** l * deltas[t + l] for l in range(n - t)) for t in range(n)]
        adv.append(a + [0.0] * (rewards.shape[1] - n))
        ret.append([a[t] + v[t] for t in range(n)] + [0.0] * (rewards.shape[1] - n))
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


def test_gae_against_a_float64_loop():
    """gae equals the per-answer sum of discounted TD errors; λ = 1, γ = 1 gives the Monte-Carlo return − V."""
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 3, 4]
    mask = torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]
    rewards = torch.randn(4, 5, generator=g, dtype=torch.float64) * mask
    values = torch.randn(4, 5, generator=g, dtype=torch.float64) * mask
    for gamma, lam in [(1.0, 0.95), (0.9, 0.5), (1.0, 0.0)]:
        adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
        want_adv, want_ret = gae_loop(rewards, values, lengths, gamma, lam)
        torch.testing.assert_close(adv, want_adv)
        torch.testing.assert_close(ret, want_ret)
    adv, ret = ppo.gae(rewards, values, mask, 1.0, 1.0)
    to_go = rewards.flip(1).cumsum(1).flip(1) * mask  # Σ_{l ≥ t} r_l
    torch.testing.assert_close(ret, to_go)
    torch.testing.assert_close(adv, (to_go - values) * mask)


def test_rloo_advantages_by_hand():
    """A_i = R_i − mean of the other answers of the same prompt; they sum to 0 per prompt."""
    got = ppo.rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 1.0]), group=4)
    want = torch.tensor([1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3, 5 - 11 / 3, 5 - 11 / 3, 5 - 11 / 3, 1 - 15 / 3])
    torch.testing.assert_close(got, want)
    assert got.view(2, 4).sum(-1).abs().max() < 1e-6


def test_whiten_masked():
    """whiten gives mean 0 and (population) std 1 over the mask and 0 elsewhere."""
    x = torch.tensor([[1.0, 2.0, 50.0], [3.0, 7.0, 50.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    w = ppo.whiten(x, mask)
    vals = torch.tensor([1.0, 2.0, 3.0, 7.0])
    torch.testing.assert_close(w[mask], (vals - vals.mean()) / vals.std(unbiased=False), atol=1e-6, rtol=1e-6)
    assert (w[~mask] == 0).all()


def test_ppo_losses_by_hand():
    """The clipped surrogate, the clipped value loss and the diagnostics from hand-computed numbers; a clipped
    token passes no gradient."""
    old = torch.zeros(1, 4, dtype=torch.float64)
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.7]], dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, -2.0, 3.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    values = torch.tensor([[0.5, 1.0, -1.0, 9.0]], dtype=torch.float64, requires_grad=True)
    old_values = torch.tensor([[0.0, 0.9, 0.0, 0.0]], dtype=torch.float64)
    returns = torch.tensor([[-1.0, 0.0, -2.0, 0.0]], dtype=torch.float64)
    out = ppo.ppo_losses(logps, old, adv, mask, 0.2, values, old_values, returns, 0.2)
    # ρ = 1.5 (A > 0: min(1.5, 1.2) → 1.2), 0.5 (A < 0: min(−0.5, −0.8) → −0.8), 1.1 (unclipped: −2.2)
    assert out["policy_loss"].item() == pytest.approx(-(1.2 - 0.8 - 2.2) / 3)
    # V − R: 1.5, 1.0, 1.0; clipped V: 0.2 (1.2), 1.0 (1.0), −0.2 (1.8): max of squares 2.25, 1.0, 3.24
    assert out["value_loss"].item() == pytest.approx(0.5 * (2.25 + 1.0 + 3.24) / 3)
    assert out["clip_frac"].item() == pytest.approx(2 / 3)
    kl = [r - 1 - math.log(r) for r in (1.5, 0.5, 1.1)]
    assert out["approx_kl"].item() == pytest.approx(sum(kl) / 3)
    (out["policy_loss"] + out["value_loss"]).backward()
    assert logps.grad[0, 0] == 0 and logps.grad[0, 1] == 0 and logps.grad[0, 3] == 0  # clipped and masked
    assert logps.grad[0, 2].item() == pytest.approx(-(-2.0 * 1.1) / 3)                 # −A ρ / n
    assert values.grad[0, 2] == 0  # the clipped value term is the larger one: no gradient to V there
    assert values.grad[0, 0].item() == pytest.approx(0.5 * 2 * (0.5 + 1.0) / 3)  # unclipped term: ½·2(V − R)/n


def test_reward_scaler_running_statistics():
    """The scaler's mean and std are those of every score so far (population std), in any number of updates."""
    s = ppo.RewardScaler()
    s.update([1.0, 10.0])
    s.update([3.0, 3.0, 10.0])
    xs = torch.tensor([1.0, 10.0, 3.0, 3.0, 10.0], dtype=torch.float64)
    got = s.standardise([10.0, 1.0])
    assert got[0] == pytest.approx(float((10 - xs.mean()) / xs.std(unbiased=False)))
    assert got[1] == pytest.approx(float((1 - xs.mean()) / xs.std(unbiased=False)))
    assert ppo.RewardScaler(s.state()).standardise([3.0]) == s.standardise([3.0])
    one = ppo.RewardScaler()
    one.update([4.0, 4.0])
    assert one.standardise([4.0, 6.0]) == [0.0, 2.0]  # no spread yet: centred only


def test_iteration_prompts_cover_every_prompt_once_per_pass():
    """One iteration of k = 1 is a permutation of the prompts; k = 4 iterations walk through a pass in quarters."""
    assert sorted(ppo.iteration_prompts(8, 8, 3, seed=1)) == list(range(8))
    quarters = [ppo.iteration_prompts(8, 2, i, seed=1) for i in range(4)]
    assert sorted(sum(quarters, [])) == list(range(8))
    assert ppo.iteration_prompts(8, 2, 0, seed=1) == ppo.iteration_prompts(8, 8, 0, seed=1)[:2]


# ----------------------------------------------------------------------------- the model side, on the tiny model
@pytest.fixture(scope="module")
def tiny():
    tok = make_tiny_tokenizer()
    return make_tiny_model(tok, seed=3), tok


def test_answer_logps_match_a_full_forward(tiny):
    """answer_logps_values gives log_softmax(full logits)[answer token] per answer token, answers left-aligned."""
    model, tok = tiny
    rows = [(data.chat_prompt_ids(tok, "What is 2 + 3?"), [53, 10, tok.eos_token_id]),
            (data.chat_prompt_ids(tok, "Hi"), [72])]
    head = torch.nn.Linear(model.config.hidden_size, 1)
    logps, values, mask = ppo.answer_logps_values(model, rows, tok.pad_token_id, torch.autocast("cpu", enabled=False),
                                                  head)
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    for i, (p, a) in enumerate(rows):
        with torch.no_grad():
            full = model(torch.tensor([p + a])).logits[0].double().log_softmax(-1)
            hidden = model.get_decoder()(torch.tensor([p + a])).last_hidden_state[0]
        want = [full[len(p) - 1 + t, tok_id] for t, tok_id in enumerate(a)]
        torch.testing.assert_close(logps[i, :len(a)].double(), torch.stack(want), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values[i, :len(a)], head(hidden[len(p) - 1:len(p) - 1 + len(a)]).squeeze(-1).detach(),
                                   atol=1e-5, rtol=1e-5)


def test_kl_term_against_full_forwards(tiny):
    """The per-token KL penalty is zero while the policy is the start model, and equals −β Σ_t (log π − log π_ref)
    from two independent full forwards once the policy moved."""
    model, tok = tiny
    reference = make_tiny_model(tok, seed=3)
    rows = [(data.chat_prompt_ids(tok, "Name a colour."), [66, 108, 117, 101, tok.eos_token_id])]
    off = torch.autocast("cpu", enabled=False)
    ref_logps, _, mask = ppo.answer_logps_values(reference, rows, tok.pad_token_id, off)
    same, _, _ = ppo.answer_logps_values(model, rows, tok.pad_token_id, off)
    assert (ppo.kl_rewards(torch.zeros(1), same, ref_logps, mask, 0.05) == 0).all()
    moved = make_tiny_model(tok, seed=3)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    logps, _, _ = ppo.answer_logps_values(moved, rows, tok.pad_token_id, off)
    p, a = rows[0]
    with torch.no_grad():
        lp = moved(torch.tensor([p + a])).logits[0].double().log_softmax(-1)
        lr = reference(torch.tensor([p + a])).logits[0].double().log_softmax(-1)
    kl = sum(float(lp[len(p) - 1 + t, x] - lr[len(p) - 1 + t, x]) for t, x in enumerate(a))
    got = ppo.kl_rewards(torch.zeros(1), logps, ref_logps, mask, 0.05)
    assert abs(kl) > 1e-3 and float(got.sum().detach()) == pytest.approx(-0.05 * kl, rel=1e-4)


def test_sampler_draws_from_the_policy(tiny):
    """First tokens drawn by sample_answers follow softmax(z / T) (total variation < 0.03 over 20000 draws from a
    peaked copy of the tiny model at T = 2, where sampling error alone gives about 0.017 and T ignored 0.2); the
    same generator seed gives the same answers; an answer stops at its EOS."""
    model, tok = tiny
    prompt = data.chat_prompt_ids(tok, "Say something.")
    peaked = make_tiny_model(tok, seed=3)
    with torch.no_grad():
        peaked.model.norm.weight.mul_(30)  # logits × 30: a distribution with a few likely tokens
    answers = ppo.sample_answers(peaked, [prompt] * 20000, 1, tok.eos_token_id, tok.pad_token_id,
                                 torch.Generator().manual_seed(0), temperature=2.0)
    counts = torch.bincount(torch.tensor([a[0] for a in answers]), minlength=len(tok)).double() / 20000
    with torch.no_grad():
        probs = (peaked(torch.tensor([prompt])).logits[0, -1].double() / 2.0).softmax(-1)
    assert 0.5 * (counts - probs).abs().sum() < 0.03
    runs = [ppo.sample_answers(model, [prompt] * 3, 6, tok.eos_token_id, tok.pad_token_id,
                               torch.Generator().manual_seed(5)) for _ in range(2)]
    assert runs[0] == runs[1] and all(1 <= len(a) <= 6 for a in runs[0])
    assert all(tok.eos_token_id not in a[:-1] for a in runs[0])


# ----------------------------------------------------------------------------- runs on the tiny model
def ppo_flags(run_dir, base_model, *extra):
    """4 demo prompts per iteration, 2 answers per rollout, 1 answer per step: 4 steps per iteration."""
    return ["--run-dir", str(run_dir), "--base-model", base_model, "--max-prompts", "4", "--rollout-batch", "2",
            "--minibatch", "1", "--ppo-epochs", "2", "--max-new-tokens", "5", "--lr", "1e-3", "--value-lr", "1e-2",
            "--device", "cpu", *extra]


def test_ppo_run_budget_and_files(tmp_path, tiny_model_dir):
    """Two iterations: iter0/model and iter1/model, 4 generations and judge calls per iteration, every answer
    with a rule score in rollouts.jsonl, the policy changed from the start model, eval.py's config fields."""
    run_dir = tmp_path / "ppo"
    ppo.main(ppo_flags(run_dir, tiny_model_dir, "--iters", "1"))
    for k in (0, 1):
        summary = json.loads((run_dir / f"iter{k}" / "summary.json").read_text())
        assert summary["generations"] == summary["judge_calls"] == 4 * (k + 1) and summary["rollout"] == 2 * (k + 1)
        conf = json.loads((run_dir / f"iter{k}" / "config.json").read_text())
        assert conf["base_model"] == tiny_model_dir and conf["max_new_tokens"] == 5
    rollouts = read_jsonl(run_dir / "rollouts.jsonl")
    assert len(rollouts) == 8 and {r["generated_score"] for r in rollouts} <= {1.0, 3.0, 10.0}
    assert sorted(r["id"] for r in rollouts if r["iter"] == 0) == sorted(r["id"] for r in rollouts if r["iter"] == 1)
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["rollout"] for m in metrics] == [0, 1, 2, 3] and all(math.isfinite(m["value_loss"]) for m in metrics)
    start, end = model_weights(tiny_model_dir), model_weights(run_dir / "iter1" / "model")
    assert any(not torch.equal(start[k], end[k]) for k in start)
    assert "nothing to do" in _rerun_output(run_dir, tiny_model_dir)


def _rerun_output(run_dir, base):
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ppo.main(ppo_flags(run_dir, base, "--iters", "1"))
    return buf.getvalue()


@pytest.mark.parametrize("advantage", ["gae", "rloo"])
def test_resume_after_a_stop_is_bit_identical(tmp_path, tiny_model_dir, advantage):
    """A run stopped after one rollout and rerun ends with the same weights, value head, optimizer state and
    rollouts as an uninterrupted run (as train.py's stages resume)."""
    extra = ["--iters", "0", "--advantage", advantage] + (["--samples-per-prompt", "2"] if advantage == "rloo" else [])
    ppo.main(ppo_flags(tmp_path / "whole", tiny_model_dir, *extra))
    out = ppo.main(ppo_flags(tmp_path / "cut", tiny_model_dir, *extra, "--stop-after-rollouts", "1"))
    assert out["stopped"] and not (tmp_path / "cut" / "iter0").exists()
    ppo.main(ppo_flags(tmp_path / "cut", tiny_model_dir, *extra))
    a, b = model_weights(tmp_path / "whole" / "iter0" / "model"), model_weights(tmp_path / "cut" / "iter0" / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(tmp_path / "whole" / "checkpoint" / "state.pt", weights_only=True)
    sb = torch.load(tmp_path / "cut" / "checkpoint" / "state.pt", weights_only=True)
    assert all(torch.equal(sa["value_head"][k], sb["value_head"][k]) for k in sa["value_head"])
    assert sa["rewards"] == sb["rewards"] and sa["rollout"] == sb["rollout"] == 2
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    for name in ("rollouts.jsonl", "metrics.jsonl"):
        assert strip(read_jsonl(tmp_path / "whole" / name)) == strip(read_jsonl(tmp_path / "cut" / name))


def test_other_training_flags_are_refused(tmp_path, tiny_model_dir):
    """A rerun with another --lr on the same run directory stops in one line naming the flag."""
    ppo.main(ppo_flags(tmp_path / "r", tiny_model_dir, "--iters", "0", "--stop-after-rollouts", "1"))
    with pytest.raises(SystemExit) as e:
        ppo.main(ppo_flags(tmp_path / "r", tiny_model_dir, "--iters", "0", "--lr", "2e-3"))
    assert str(e.value).startswith("ppo.py: ") and "--lr 0.001" in str(e.value) and "\n" not in str(e.value)


def test_schedule_refusals(tmp_path, tiny_model_dir):
    """A budget the rollouts cannot divide, or RLOO with one answer per prompt, is one line before any model loads."""
    for extra, words in [(["--rollout-batch", "3"], "multiple of --rollout-batch"),
                         (["--advantage", "rloo", "--samples-per-prompt", "1"], "≥ 2")]:
        with pytest.raises(SystemExit) as e:
            ppo.main(ppo_flags(tmp_path / "x", tiny_model_dir, *extra))
        assert words in str(e.value) and str(e.value).startswith("ppo.py: ")


# ----------------------------------------------------------------------------- the study driver's plan and budget
def test_study_plan_and_budget(tmp_path):
    """ppo_study.py runs ablate.py's baseline steps (not its log-prob figures) and, per iteration after them, ppo.py
    and eval.py for each online row; the budget behind DNPO's iteration k counts SPIN's iterations 0..k−1 and its
    own (2 judge calls per prompt), PPO's its summary, and the seconds of every train step in the chain."""
    import ppo_study
    opts = ppo_study.parse_args(["--out", str(tmp_path), "--iters", "2", "--", "--kl-coef", "0.1"])
    steps = ppo_study.plan(opts)
    labels = [s["label"] for s in steps]
    assert not any("logps" in label for label in labels)
    assert [ppo_study.step_iteration(s) for s in steps] == sorted(ppo_study.step_iteration(s) for s in steps)
    k1 = [label for s, label in zip(steps, labels) if ppo_study.step_iteration(s) == 1]
    assert k1.index("train dnpo-seed0 iter1") < k1.index("train ppo-seed0 iter1") < k1.index("train rloo-seed0 iter1")
    rloo = next(s for s in steps if s["label"] == "train rloo-seed0 iter2")["cmd"]
    assert rloo[-4:] == ["--advantage", "rloo", "--kl-coef", "0.1"] and rloo[rloo.index("--iters") + 1] == "2"
    for run, k in [("spin", 0), ("spin", 1), ("dnpo", 2)]:
        path = tmp_path / f"{run}-seed0" / f"iter{k}" / "judged.jsonl"
        path.parent.mkdir(parents=True)
        data.write_jsonl(path, [{"id": i} for i in range(64)])
    times = {"train spin-seed0 iter0": 10.0, "train spin-seed0 iter1": 20.0, "train dnpo-seed0 iter2": 30.0,
             "train ppo-seed0 iter0": 5.0, "train ppo-seed0 iter1": 6.0}
    assert ppo_study.budget(opts, "dnpo", 0, 2, times) == (192, 384, 60.0)
    summary = tmp_path / "ppo-seed0" / "iter1" / "summary.json"
    summary.parent.mkdir(parents=True)
    data.write_json(summary, {"generations": 128, "judge_calls": 128})
    assert ppo_study.budget(opts, "ppo", 0, 1, times) == (128, 128, 11.0)
    assert ppo_study.budget(opts, "alpha_spin", 0, 1, times) == (None, None, None)


def test_ppo_with_a_reward_model_as_the_reward(tmp_path, tiny_model_dir):
    """ppo.py --judge rm: the reward model's real-valued scores are the rewards (rollouts.jsonl), under its name."""
    from test_judge_rm import make_tiny_rm
    rm_dir = tmp_path / "rm"
    tokenizer = make_tiny_tokenizer()
    make_tiny_rm(tokenizer).save_pretrained(rm_dir)
    tokenizer.save_pretrained(rm_dir)
    ppo.main(ppo_flags(tmp_path / "run", tiny_model_dir, "--iters", "0", "--judge", "rm", "--judge-model", str(rm_dir)))
    rollouts = read_jsonl(tmp_path / "run" / "rollouts.jsonl")
    scores = [r["generated_score"] for r in rollouts]
    assert len(scores) == 4 and len(set(scores)) == 4 and {r["judge"] for r in rollouts} == {f"rm:{rm_dir}"}
    assert (tmp_path / "run" / "iter0" / "model" / "config.json").is_file()


def test_missing_scores_are_left_out_then_refused(tmp_path, tiny_model_dir, monkeypatch):
    """An answer without a score is left out of its rollout's update and logged with its error; once more than
    --judge-max-missing of the answers so far lack a score, the run stops in one line, earlier rollouts kept."""
    import judge as judges
    import judge_base

    class Flaky(judge_base.Judge):
        name = "flaky"

        def _score(self, items):
            return [(None, "server said 500") if i == 0 else (3.0 + i, None) for i, _ in enumerate(items)]
    monkeypatch.setattr(judges, "judge_from_args", lambda *a, **k: Flaky())
    ppo.main(ppo_flags(tmp_path / "ok", tiny_model_dir, "--iters", "0", "--judge-max-missing", "0.5"))
    rows = read_jsonl(tmp_path / "ok" / "rollouts.jsonl")
    assert [r["generated_score"] for r in rows] == [None, 4.0] * 2 and rows[0]["judge_error"] == "server said 500"
    assert [m["trained_on"] for m in read_jsonl(tmp_path / "ok" / "metrics.jsonl")] == [1, 1]
    assert json.loads((tmp_path / "ok" / "iter0" / "summary.json").read_text())["missing"] == 2
    with pytest.raises(SystemExit) as e:
        ppo.main(ppo_flags(tmp_path / "no", tiny_model_dir, "--iters", "0", "--judge-max-missing", "0.2"))
    assert "--judge-max-missing 0.2" in str(e.value) and "server said 500" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "no" / "rollouts.jsonl").read_text()
