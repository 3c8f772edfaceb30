"""Table 2's online baseline: PPO with a reward, and its critic-free variant RLOO, on the same prompts, start model
and judge as train.py:

    python ppo.py --run-dir runs/ablate/ppo-seed0 --iters 3                      # PPO (GAE with a value head)
    python ppo.py --run-dir runs/ablate/rloo-seed0 --iters 3 --advantage rloo    # RLOO, 4 answers per prompt

The paper's PPO "uses a reward model ... and new data dynamically generated online throughout the training
process" (Sec. 5, Table 2). Here the policy starts from --base-model, and every rollout it samples answers to a
few training prompts, the judge scores each answer (the reward: the rule judge on the demo task, `--judge rm` a
reward model elsewhere), and the policy takes a few clipped policy-gradient steps on them before the next
rollout. Budget: one *iteration* is one generation per training prompt (--max-prompts answers, as train.py
generates per iteration) and as many judge calls; iter{k}/model is the policy after iterations 0..k, the same
number of generations as DNPO's iteration k (SPIN's iteration 0 and k DSL iterations). N answers per rollout,
L answer tokens, d hidden size, V vocabulary. Per rollout (each term is a function below, tested by hand):

    s_i        judge score of answer i, standardised: (s − μ) / σ over every score so far       `RewardScaler`
    r_i,t      −β_KL · (log π_old − log π_ref)(y_i,t) per token, + s_i on the last token          `kl_rewards`
    A, R       GAE(γ, λ) with the value head V: δ_t = r_t + γ V_t+1 − V_t, A_t = Σ (γλ)^l δ_t+l, R = A + V   `gae`
               (RLOO: A_i = R_i − mean_{j≠i} R_j over the k answers of a prompt, R_i = Σ_t r_i,t)  `rloo_advantages`
    Â          A whitened over the rollout's answer tokens                                          `whiten`
    L_clip     −mean_t min(ρ_t Â_t, clip(ρ_t, 1 − ε, 1 + ε) Â_t),  ρ_t = π_θ / π_old                 `ppo_losses`
    L_V        ½ mean_t max((V − R)², (V_old + clip(V − V_old, ±ε_V) − R)²)                          `ppo_losses`

Files under --run-dir: ppo_config.json (the training flags; another run's are refused), rollouts.jsonl (every
answer with its score), metrics.jsonl (one row per rollout), checkpoint/state.pt (policy, value head, optimizer,
reward statistics, counters; written after every rollout, read with weights_only=True), iter{k}/model,
iter{k}/config.json (eval.py reads base_model and max_new_tokens there) and iter{k}/summary.json (generations,
judge calls and seconds so far). A rerun of the same command resumes after the last saved rollout and gives the
same weights as an uninterrupted run (every rollout's sampling and minibatch order is seeded by (seed, rollout)).

Where this departs from, or fills a gap in, the paper:
1. A minimal PPO of our own rather than TRL's: the objective is written out here, one jump from the loop, and
   tested against hand computations (tests/test_ppo.py), as loss.py is; TRL's PPO trainer needs a separate reward
   model module and value model and would put a framework between the reader and the terms. The paper gives no
   PPO hyperparameters; ours are the usual ones (Ziegler et al. 2019, TRL): ε = 0.2, ε_V = 0.2, γ = 1, λ = 0.95,
   a fixed β_KL = 0.05 (no adaptive controller), 3 epochs over each rollout in minibatches of 8 answers, so an
   iteration of 64 answers takes 24 AdamW steps of lr 3e-6 — train.py's demo preset takes 24 steps of 8 pairs at
   the same lr.
2. Value baseline: a linear head on the policy's last hidden state, detached, zero-initialised, with its own
   learning rate (--value-lr). A shared trunk would let the value regression pull on the policy's weights under
   one clipping norm; a separate critic (InstructGPT) would double the compute on this CPU-sized budget.
3. Rewards are standardised by the running mean and standard deviation of every score so far (Ziegler et al.
   normalise the reward model to mean 0, std 1 on the start policy's samples), so β_KL and the value head's
   scale do not depend on the judge's scale (1..10 rule scores or a reward model's logits).
4. Sampling is from the policy itself, softmax at --temperature (default 1) without top-k or top-p, by a loop of
   our own (`sample_answers`): PPO's ratio assumes the answers are drawn from π_old. Held-out evaluation stays
   greedy, as for every row of the study.
5. RLOO (Ahmadian et al. 2024) uses the same clipped objective and epochs, with its leave-one-out baseline in
   place of GAE and no value head; its k answers per prompt (--samples-per-prompt, default 4) come out of the
   same budget, so an iteration sees 64 / k prompts.
6. An answer without a score (an HTTP judge's failure) has no reward: it is left out of its rollout's update
   (with RLOO, its prompt's k answers), and the run stops in one line, the last rollout's checkpoint kept, once
   more than --judge-max-missing of all answers so far lack one (DSL instead keeps SPIN's pairing for them).
"""
import argparse
import copy
import inspect
import math
import pathlib
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint as ckpt
import config
import data
import errors
import judge as judges
import model as models
import runlock
from loss import _chunk_token_logps, answer_states

ADVANTAGES = ("gae", "rloo")
# the flags whose change would make a resumed run differ from an uninterrupted one (ppo_config.json, the checkpoint)
TRAINING = ("base_model", "data", "max_prompts", "flaw_rate", "max_prompt_length", "max_new_tokens", "temperature",
            "judge", "judge_model", "judge_base_url", "judge_scale", "judge_mode", "advantage", "samples_per_prompt",
            "rollout_batch", "ppo_epochs", "minibatch", "clip", "value_clip", "kl_coef", "gamma", "lam", "lr",
            "value_lr", "max_grad_norm", "seed", "dtype")


# ----------------------------------------------------------------------------- the objective (pure functions)
def kl_rewards(scores, old_logps, ref_logps, mask, kl_coef):
    """Per-token rewards (N, L): −kl_coef · (log π_old − log π_ref) on every answer token, plus the answer's
    (standardised) score on its last token. scores (N,); old_logps, ref_logps (N, L); mask (N, L) bool, each row
    a non-empty prefix."""
    rewards = -kl_coef * (old_logps - ref_logps) * mask                        # the KL penalty to the start model
    last = mask.sum(-1) - 1                                                     # (N,) index of each last token
    return rewards.index_put((torch.arange(len(scores)), last), scores.to(rewards.dtype), accumulate=True)


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """(advantages, returns), each (N, L): δ_t = r_t + γ V_{t+1} − V_t (V = 0 after the last token),
    A_t = δ_t + γλ A_{t+1}, R_t = A_t + V_t; zero off the mask."""
    mask = mask.to(rewards.dtype)
    advantages = torch.zeros_like(rewards)
    next_value, next_advantage = torch.zeros_like(rewards[:, 0]), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value, next_advantage = values[:, t] * mask[:, t], advantages[:, t]
    return advantages, (advantages + values) * mask


def rloo_advantages(sequence_rewards, group):
    """(N,) leave-one-out advantages: R_i − the mean of the other k − 1 rewards of its prompt; answers of one
    prompt are consecutive, `group` = k ≥ 2 of them."""
    r = sequence_rewards.view(-1, group)                                        # (prompts, k)
    return (r - (r.sum(-1, keepdim=True) - r) / (group - 1)).reshape(-1)


def whiten(x, mask, eps=1e-8):
    """x standardised to mean 0 and standard deviation 1 over the masked entries; zero off the mask."""
    values = x[mask]
    return (x - values.mean()) / (values.std(unbiased=False) + eps) * mask


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def ppo_losses(logps, old_logps, advantages, mask, clip=0.2, values=None, old_values=None, returns=None, value_clip=0.2):
    """The clipped policy objective and the clipped value loss, token means over the mask, with the diagnostics
    (clip fraction, approx. KL(π_old ‖ π_θ) = mean(ρ − 1 − log ρ)). All (n, L); values None for RLOO."""
    ratio = torch.exp(logps - old_logps)                                        # ρ_t = π_θ / π_old
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    out = dict(policy_loss=-masked_mean(surrogate, mask))
    log_ratio = (logps - old_logps).detach()
    out["clip_frac"] = masked_mean(((ratio.detach() - 1).abs() > clip).to(logps.dtype), mask)
    out["approx_kl"] = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    if values is not None:
        clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
        out["value_loss"] = 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)
    return out


class RewardScaler:
    """Running mean and standard deviation of every score seen (Welford); scores standardised with them."""

    def __init__(self, state=None):
        self.n, self.mean, self.m2 = (state["n"], state["mean"], state["m2"]) if state else (0, 0.0, 0.0)

    def update(self, scores):
        for s in scores:
            self.n += 1
            delta = s - self.mean
            self.mean += delta / self.n
            self.m2 += delta * (s - self.mean)

    def standardise(self, scores):
        std = math.sqrt(self.m2 / self.n) if self.n else 0.0
        return [(s - self.mean) / std if std > 0 else s - self.mean for s in scores]

    def state(self):
        return dict(n=self.n, mean=self.mean, m2=self.m2)


# ----------------------------------------------------------------------------- the model side
def _cache_name(model):
    """The forward keyword of the KV cache: `cache` in newer transformers 5, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def sample_answers(policy, prompt_ids, max_new_tokens, eos_id, pad_id, generator, temperature=1.0):
    """Token ids of one answer per prompt, each token drawn from softmax(z / temperature) of the policy itself
    (no top-k, no top-p), up to and including the first EOS or max_new_tokens tokens."""
    device = next(policy.parameters()).device
    input_ids, mask = (t.to(device) for t in data.pad_rows(prompt_ids, pad_id, side="left"))     # (N, T)
    position = (mask.cumsum(-1) - 1).clamp(min=0)                                                # pads do not shift
    name = _cache_name(policy)
    out = policy(input_ids=input_ids, attention_mask=mask, position_ids=position, use_cache=True, logits_to_keep=1)
    answers, done = [[] for _ in prompt_ids], torch.zeros(len(prompt_ids), dtype=torch.bool, device=device)
    next_position = position[:, -1:] + 1                                                          # (N, 1)
    for t in range(max_new_tokens):
        probs = torch.softmax(out.logits[:, -1].float() / temperature, dim=-1)                   # (N, V)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)                     # (N,)
        for i in (~done).nonzero().flatten().tolist():
            answers[i].append(int(token[i]))
        done |= token == eos_id
        if done.all() or t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        cache = getattr(out, "cache", None) or out.past_key_values
        out = policy(input_ids=token[:, None], attention_mask=mask, position_ids=next_position, use_cache=True,
                     **{name: cache})
        next_position = next_position + 1
    return answers


def answer_logps_values(model, rows, pad_id, autocast, value_head=None):
    """(log-probs (n, L), values (n, L) or None, mask (n, L)) of the answer tokens of rows [(prompt ids, answer
    ids)], answers left-aligned; values from the value head on the detached last hidden states."""
    input_ids, attention = data.pad_rows([p + a for p, a in rows], pad_id, side="right")         # (n, T)
    labels, _ = data.pad_rows([[-100] * len(p) + a for p, a in rows], -100, side="right")        # (n, T)
    device = next(model.parameters()).device
    with autocast:
        hidden = model.get_decoder()(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                     use_cache=False).last_hidden_state                           # (n, T, d)
    states, targets, row = answer_states(hidden, labels.to(device))                               # (M, d), (M,), (M,)
    head = model.get_output_embeddings()
    token_logps = _chunk_token_logps(states, head.weight, getattr(head, "bias", None), targets)  # (M,) ≥ fp32
    lengths = torch.tensor([len(a) for _, a in rows], device=device)
    starts = torch.cumsum(lengths, 0) - lengths
    column = torch.arange(len(row), device=device) - starts[row]                                  # (M,) position in answer
    shape = (len(rows), int(lengths.max()))
    mask = torch.zeros(shape, dtype=torch.bool, device=device).index_put((row, column), torch.tensor(True, device=device))
    logps = torch.zeros(shape, dtype=token_logps.dtype, device=device).index_put((row, column), token_logps)
    if value_head is None:
        return logps, None, mask
    token_values = value_head(states.detach().float()).squeeze(-1)                               # (M,)
    values = torch.zeros(shape, dtype=token_values.dtype, device=device).index_put((row, column), token_values)
    return logps, values, mask


# ----------------------------------------------------------------------------- the schedule
def iteration_prompts(n, per_iteration, iteration, seed):
    """Indices of the prompts of one iteration: the next `per_iteration` of a stream of permutations of the n
    prompts (one per pass, seeded by (seed, pass))."""
    start, out = iteration * per_iteration, []
    while len(out) < per_iteration:
        position = start + len(out)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + position // n)).tolist()
        out += perm[position % n:][:per_iteration - len(out)]
    return out


def check_schedule(args, n):
    """One-line refusals for a budget the rollouts cannot divide."""
    k, batch = args.samples_per_prompt, args.rollout_batch
    if args.advantage == "rloo" and k < 2:
        raise errors.Refusal("--advantage rloo needs --samples-per-prompt ≥ 2 (a leave-one-out baseline)")
    if n % k or n % batch or batch % k or batch % args.minibatch:
        raise errors.Refusal(f"{n} prompts (one iteration's generations) must be a multiple of --rollout-batch "
                             f"{batch}, which must be a multiple of --samples-per-prompt {k} and of --minibatch "
                             f"{args.minibatch}")


# ----------------------------------------------------------------------------- checkpoint
def save_state(path, policy, value_head, optimizer, scaler, counters, args):
    ckpt.save_checkpoint(path, dict(policy=policy.state_dict(), value_head=value_head.state_dict(),
                                    optimizer=optimizer.state_dict(), rewards=scaler.state(), args=training_flags(args),
                                    **counters))


def load_state(path):
    """The checkpoint dict, or None; loaded with weights_only=True (a planted file runs no code)."""
    path = pathlib.Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused, truncated, corrupt
        raise errors.Refusal(f"{path} is not a usable checkpoint ({' '.join(str(e).split())[:120]}); delete "
                             f"{path.parent} to restart the run from the start model") from None
    if not isinstance(state, dict) or not {"policy", "value_head", "optimizer", "rollout", "args"} <= set(state):
        raise errors.Refusal(f"{path} is not a checkpoint written by ppo.py; delete {path.parent}")
    return state


def training_flags(args):
    return {key: getattr(args, key) for key in TRAINING}


def check_flags(run_dir, args):
    """run_dir/ppo_config.json holds the training flags of the run; other flags are refused in one line."""
    path, now = run_dir / "ppo_config.json", training_flags(args)
    if path.is_file():
        was = data.read_json(path)
        changed = [k for k in TRAINING if k in was and was[k] != now[k]]  # a key it lacks: an older ppo.py's run
        if changed:
            raise errors.Refusal(f"{run_dir} was run with " + ", ".join(f"--{k.replace('_', '-')} {was.get(k)}"
                                                                         for k in changed)
                                 + "; rerun with those flags or use another --run-dir")
    else:
        data.write_json(path, now)


# ----------------------------------------------------------------------------- the loop
def train_on_rollout(policy, value_head, optimizer, rows, scores, ref_logps, args, autocast, pad_id, generator):
    """PPO epochs over one rollout; returns its metrics (means over minibatches)."""
    with torch.no_grad():
        old_logps, old_values, mask = answer_logps_values(policy, rows, pad_id, autocast, value_head)
        rewards = kl_rewards(scores, old_logps, ref_logps, mask, args.kl_coef)                  # (N, L)
        if args.advantage == "gae":
            advantages, returns = gae(rewards, old_values, mask, args.gamma, args.lam)
        else:
            advantages = rloo_advantages(rewards.sum(-1), args.samples_per_prompt)[:, None] * mask
            returns = None
        advantages = whiten(advantages, mask)
    sums, count = {}, 0
    for _ in range(args.ppo_epochs):
        order = torch.randperm(len(rows), generator=generator, device=generator.device).tolist()
        for start in range(0, len(rows), args.minibatch):
            idx = order[start:start + args.minibatch]
            logps, values, mb_mask = answer_logps_values(policy, [rows[i] for i in idx], pad_id, autocast,
                                                         value_head if args.advantage == "gae" else None)
            width = mb_mask.shape[1]
            pick = lambda x: None if x is None else x[idx, :width]  # noqa: E731
            out = ppo_losses(logps, pick(old_logps), pick(advantages), mb_mask, args.clip, values, pick(old_values),
                             pick(returns), args.value_clip)
            (out["policy_loss"] + out.get("value_loss", 0.0)).backward()  # the value head sees detached states
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm or math.inf)
            torch.nn.utils.clip_grad_norm_(value_head.parameters(), args.max_grad_norm or math.inf)
            numbers = {key: float(value.detach()) for key, value in dict(out, grad_norm=grad_norm).items()}
            if not all(map(math.isfinite, numbers.values())):
                raise errors.Refusal(f"rollout loss or gradient not finite ({numbers}); lower --lr or --kl-coef")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for key, value in numbers.items():
                sums[key] = sums.get(key, 0.0) + value
            count += 1
    metrics = {key: value / count for key, value in sums.items()}
    metrics["kl"] = float(((old_logps - ref_logps) * mask).sum(-1).mean())  # Σ_t log π_old/π_ref per answer
    return metrics


def run(args):
    """Iterations 0..args.iters of online PPO (or RLOO) from the start model; resumable (module docstring)."""
    run_dir = pathlib.Path(args.run_dir)
    runlock.hold(run_dir, "ppo.py")
    records = data.load_prompts(args.data, split="train", max_prompts=args.max_prompts or None, seed=args.seed,
                                flaw_rate=args.flaw_rate)
    check_schedule(args, len(records))
    check_flags(run_dir, args)
    done = lambda k: (run_dir / f"iter{k}" / "model" / "config.json").is_file()  # noqa: E731
    if all(done(k) for k in range(args.iters + 1)):
        print(f"ppo.py: {run_dir} holds iterations 0..{args.iters}; nothing to do")
        return dict(stopped=False)
    state_path = run_dir / "checkpoint" / "state.pt"
    state = load_state(state_path)
    if state is not None and any(state["args"].get(k, now) != now for k, now in training_flags(args).items()):
        raise errors.Refusal(f"{state_path} was written with other training flags; delete {state_path.parent}")

    device = models.pick_device(args.device)
    compute_dtype = models.pick_dtype(device, args.dtype)
    autocast = torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)
    policy, tokenizer = models.load_model(args.base_model, device=device, dtype="fp32")
    reference = copy.deepcopy(policy).eval().requires_grad_(False)              # the start model: the KL anchor
    value_head = torch.nn.Linear(policy.config.hidden_size, 1).to(device)
    torch.nn.init.zeros_(value_head.weight), torch.nn.init.zeros_(value_head.bias)
    optimizer = torch.optim.AdamW([dict(params=list(policy.parameters()), lr=args.lr),
                                   dict(params=list(value_head.parameters()), lr=args.value_lr)], lr=args.lr)
    judge = judges.judge_from_args(args, cache_path=run_dir / "judge_cache.jsonl", device=args.device)
    counters = dict(rollout=0, generations=0, judge_calls=0, missing=0, generate_s=0.0, judge_s=0.0, update_s=0.0)
    scaler = RewardScaler()
    if state is not None:
        policy.load_state_dict(state["policy"])
        value_head.load_state_dict(state["value_head"])
        optimizer.load_state_dict(state["optimizer"])
        scaler = RewardScaler(state["rewards"])
        counters = {key: state.get(key, 0) for key in counters}  # "missing": not kept by an older ppo.py
        print(f"ppo.py: resuming {state_path} after rollout {counters['rollout']}")
    for name in ("metrics.jsonl", "rollouts.jsonl"):  # rows of rollouts after the checkpoint were not kept
        path = run_dir / name
        rows = data.read_jsonl_tolerant(path) if path.is_file() else []
        data.write_jsonl(path, [r for r in rows if r["rollout"] < counters["rollout"]])
    policy.eval()  # no dropout: the ratio is exactly 1 at the first minibatch

    n, k, batch = len(records), args.samples_per_prompt, args.rollout_batch
    per_iteration = n // batch                                                  # rollouts per iteration
    prompt_ids = [data.truncate_prompt(data.chat_prompt_ids(tokenizer, r["prompt"]), args.max_prompt_length)
                  for r in records]
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    total = (args.iters + 1) * per_iteration
    bar = tqdm(total=total, initial=counters["rollout"], desc=f"{args.advantage} rollouts", unit="rollout")
    stopped_after, last = 0, counters["rollout"] // per_iteration - 1  # an iteration the last run ended but did not save
    if last >= 0 and counters["rollout"] % per_iteration == 0 and not done(last):
        save_iteration(run_dir / f"iter{last}", policy, tokenizer, args, counters, run_dir)
    while counters["rollout"] < total:
        r = counters["rollout"]
        iteration = r // per_iteration
        chosen = iteration_prompts(n, n // k, iteration, args.seed)
        chosen = chosen[(r % per_iteration) * (batch // k):(r % per_iteration + 1) * (batch // k)]
        items = [records[i] for i in chosen for _ in range(k)]                  # a prompt's k answers consecutive
        ids = [prompt_ids[i] for i in chosen for _ in range(k)]
        generator = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + r)
        t0 = time.time()
        with autocast:
            answers = sample_answers(policy, ids, args.max_new_tokens, eos_id, pad_id, generator, args.temperature)
        texts = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]
        t1 = time.time()
        scored = judge.score_many([{"prompt": rec["prompt"], "answer": text, "record": rec}
                                   for rec, text in zip(items, texts)])
        missing = [(rec["id"], err) for rec, (s, err) in zip(items, scored) if s is None]
        if counters["missing"] + len(missing) > args.judge_max_missing * (counters["judge_calls"] + len(items)):
            raise errors.Refusal(f"the judge gave no score for {counters['missing'] + len(missing)} of "
                                 f"{counters['judge_calls'] + len(items)} answers so far (first in rollout {r}: "
                                 f"{missing[0][0]}: {' '.join(str(missing[0][1]).split())[:200]}), more than "
                                 f"--judge-max-missing {args.judge_max_missing:g}; fix the judge and rerun (rollouts "
                                 f"up to {r - 1} are kept)")
        keep = [g * k + j for g in range(len(items) // k) for j in range(k)  # a prompt's k answers, all scored
                if all(scored[g * k + i][0] is not None for i in range(k))]
        scores = [scored[i][0] for i in keep]
        t2 = time.time()
        metrics = {}
        if keep:  # a rollout without a scored answer (or prompt) changes nothing
            scaler.update(scores)
            rows = [(ids[i], answers[i]) for i in keep]
            with torch.no_grad():
                ref_logps, _, _ = answer_logps_values(reference, rows, pad_id, autocast)
            standardised = torch.tensor(scaler.standardise(scores), dtype=ref_logps.dtype, device=device)
            metrics = train_on_rollout(policy, value_head, optimizer, rows, standardised, ref_logps, args, autocast,
                                       pad_id, generator)
        t3 = time.time()
        counters.update(rollout=r + 1, generations=counters["generations"] + len(answers),
                        judge_calls=counters["judge_calls"] + len(answers), missing=counters["missing"] + len(missing),
                        generate_s=counters["generate_s"] + t1 - t0, judge_s=counters["judge_s"] + t2 - t1,
                        update_s=counters["update_s"] + t3 - t2)
        row = dict(iter=iteration, rollout=r, score=sum(scores) / len(scores) if scores else None,
                   score_mean_so_far=scaler.mean, answer_tokens=sum(map(len, answers)) / len(answers),
                   missing=len(missing), trained_on=len(keep), **metrics, seconds=t3 - t0)
        with data.open_append(run_dir / "rollouts.jsonl") as fh:
            for rec, text, (s, err) in zip(items, texts, scored):
                data.append_jsonl(fh, dict(rollout=r, iter=iteration, id=rec["id"], prompt=rec["prompt"],
                                           generated=text, generated_score=s, judge=judge.name,
                                           **({"judge_error": err} if s is None else {})))
        with data.open_append(run_dir / "metrics.jsonl") as fh:
            data.append_jsonl(fh, row)
        save_state(state_path, policy, value_head, optimizer, scaler, counters, args)
        tqdm.write(f"{args.advantage} iter {iteration} | rollout {r + 1}/{total} | "
                   + (f"score {row['score']:.3f} | kl {row['kl']:.4f} | pg {row['policy_loss']:+.4f} | "
                      + (f"vf {row['value_loss']:.4f} | " if "value_loss" in row else "")
                      + f"clip {row['clip_frac']:.3f} | " if metrics else "no scored answer: no update | ")
                   + (f"{len(missing)} missing | " if missing else "") + f"{row['seconds']:.1f} s")
        bar.update(1)
        if (r + 1) % per_iteration == 0 and not done(iteration):
            save_iteration(run_dir / f"iter{iteration}", policy, tokenizer, args, counters, run_dir)
        stopped_after += 1
        if args.stop_after_rollouts and stopped_after == args.stop_after_rollouts and counters["rollout"] < total:
            print(f"ppo.py: stopped after {stopped_after} rollouts (--stop-after-rollouts); rerun to resume")
            return dict(stopped=True)
    bar.close()
    judge.close()
    return dict(stopped=False)


def save_iteration(it_dir, policy, tokenizer, args, counters, run_dir):
    """iter{k}/model, config.json (the flags, base_model first: what eval.py reads) and summary.json (the budget
    spent so far, cumulative over iterations 0..k)."""
    it_dir.mkdir(parents=True, exist_ok=True)
    data.write_json(it_dir / "config.json", dict(vars(args), iter=int(it_dir.name[4:]), method=args.advantage))
    models.save_model(policy, tokenizer, it_dir / "model")
    rows = [r for r in data.read_jsonl(run_dir / "metrics.jsonl") if r["iter"] == int(it_dir.name[4:])
            and r.get("score") is not None]
    mean = lambda key: sum(r[key] for r in rows) / len(rows) if rows else None  # noqa: E731
    data.write_json(it_dir / "summary.json", dict(
        iter=int(it_dir.name[4:]), method=args.advantage, **counters, rollout_s=counters["generate_s"]
        + counters["judge_s"] + counters["update_s"], mean_score=mean("score"), mean_kl=mean("kl")))


# ----------------------------------------------------------------------------- flags
def parse_args(argv=None):
    demo = config.PRESETS["demo"]  # the ablation study's prompts, start model, lengths and judge (one place per default)
    p = config.Parser(prog="ppo.py", description=__doc__.split("\n\n")[0])
    # --- run
    p.add_argument("--run-dir", default="runs/ppo", help="run directory (default %(default)s)")
    p.add_argument("--iters", type=config.COUNT, default=1,
                   help="train iterations 0..N, each one generation per prompt (default %(default)s)")
    p.add_argument("--seed", type=config.COUNT, default=0, help="prompt order, sampling and minibatches (default 0)")
    p.add_argument("--device", help="cpu | cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="compute dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--stop-after-rollouts", type=config.COUNT, default=0, help="debug: stop after N rollouts (0 = off)")
    # --- data and model
    p.add_argument("--data", default=demo["data"], help="training prompts: demo or a file (default %(default)s)")
    p.add_argument("--max-prompts", type=config.POSITIVE_INT, default=demo["max_prompts"],
                   help="training prompts = generations per iteration (default %(default)s)")
    p.add_argument("--flaw-rate", type=config.FINITE, default=0.3, help="--data demo: flawed human answers (unused "
                   "by PPO, kept so the prompts are train.py's; default %(default)s)")
    p.add_argument("--base-model", default=demo["base_model"], help="start model and KL anchor (default %(default)s)")
    p.add_argument("--max-prompt-length", type=config.POSITIVE_INT, default=demo["max_prompt_length"],
                   help="prompt tokens kept, the last ones (default %(default)s)")
    p.add_argument("--max-new-tokens", type=config.POSITIVE_INT, default=demo["max_new_tokens"],
                   help="answer length in tokens (default %(default)s)")
    p.add_argument("--temperature", type=config.POSITIVE, default=1.0, help="sampling temperature (default 1)")
    # --- reward: the judge's settings, declared once for every command (judge.SETTINGS)
    judges.add_judge_flags(p.add_argument_group("reward (the judge)"), judge=demo["judge"])
    # --- PPO
    p.add_argument("--advantage", choices=ADVANTAGES, default="gae",
                   help="gae: PPO with a value head; rloo: leave-one-out baseline, no value head (default gae)")
    p.add_argument("--samples-per-prompt", type=config.POSITIVE_INT,
                   help="answers per prompt, k (default 1 for gae, 4 for rloo)")
    p.add_argument("--rollout-batch", type=config.POSITIVE_INT, default=16, help="answers per rollout (default 16)")
    p.add_argument("--ppo-epochs", type=config.POSITIVE_INT, default=3, help="epochs over each rollout (default 3)")
    p.add_argument("--minibatch", type=config.POSITIVE_INT, default=8, help="answers per optimizer step (default 8)")
    p.add_argument("--clip", type=config.POSITIVE, default=0.2, help="ε of the clipped ratio (default 0.2)")
    p.add_argument("--value-clip", type=config.POSITIVE, default=0.2, help="ε_V of the clipped value (default 0.2)")
    p.add_argument("--kl-coef", type=config.NONNEGATIVE, default=0.05, help="β_KL per token (0 = off; default 0.05)")
    p.add_argument("--gamma", type=config.NONNEGATIVE, default=1.0, help="discount γ (default 1)")
    p.add_argument("--lam", type=config.NONNEGATIVE, default=0.95, help="GAE λ (default 0.95)")
    # --- optimization
    p.add_argument("--lr", type=config.POSITIVE32, default=demo["lr"], help="policy AdamW lr (default %(default)s)")
    p.add_argument("--value-lr", type=config.POSITIVE32, default=1e-4, help="value head AdamW lr (default %(default)s)")
    p.add_argument("--max-grad-norm", type=config.NONNEGATIVE, default=1.0,
                   help="gradient clipping norm, policy and value head each (0 = off; default %(default)s)")
    args = p.parse_args(argv)
    args.samples_per_prompt = args.samples_per_prompt or (4 if args.advantage == "rloo" else 1)
    if args.gamma > 1 or args.lam > 1:
        p.error(f"--gamma and --lam must be ≤ 1 (got {args.gamma}, {args.lam})")
    judges.check_judge_args(args)  # errors.Refusal: one line from main
    if args.judge_mode != "single":
        p.error("--judge-mode pairwise compares two answers; PPO's reward is each answer's own score (single)")
    config.check_device(args.device)
    return args


def main(argv=None):
    """`python ppo.py ...`: a refusal of any module ends the process in one line (errors.one_line)."""
    try:
        args = parse_args(argv)
        return run(args)
    except (ValueError, OSError) as e:
        raise SystemExit(errors.one_line("ppo.py", e)) from None
    except KeyboardInterrupt:
        raise SystemExit("ppo.py: interrupted; rerun the same command to resume after the last saved rollout") from None


if __name__ == "__main__":
    main(sys.argv[1:])
