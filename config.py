"""train.py's flags: each flag's default, range and help on its own `flag(...)` line, the presets, and the
one-line checks that run before anything is written. `parse_args(argv)` returns the parsed flags; train.py
never writes into them (how the run was started lives in train.RunState). The settings train.py shares with
other commands are declared once where they belong and added by the same function as there: the judge's
(`--judge-*`, judge.add_judge_flags, also judge.py's and eval.py's) and the generation settings
(cli.add_generation_flags, also eval.py's); cli.py holds the one-line `Parser` and the number types.

A preset is a plain dict of flag defaults applied with argparse's set_defaults; a flag given on the command
line overrides it, and `--help` shows the chosen preset's values. `TRAINING_KEYS` are the flags declared
with `trains=True` (those whose change would make a resumed run differ from an uninterrupted one) plus
RUN_STATE: a checkpoint records them and refuses to resume under others (checkpoint.restore), and
stages.py records them for the train stage. Adding a training flag is one `flag(..., trains=True)` line.

Where this departs from, or fills a gap in, the paper:
1. The paper preset is Table 3; what Table 3 does not give (noise α, noise-network learning rate, chunk
   sizes, clipping, the demo preset) is argued where it is used: noise.py for α, train.py's docstring
   for the rest. The demo preset is ours: the configuration the ablation study chose on 2 CPU cores
   (docs/study.md: AdamW, where RMSprop at these step counts either moves nothing or collapses the model).
"""
import argparse
import sys

import data
import errors
import judge as judges
import noise as noises
import tracking
from cli import (COUNT, FINITE, NONNEGATIVE, NONNEGATIVE32, POSITIVE, POSITIVE32, POSITIVE_INT, Parser,  # noqa: F401
                 add_generation_flags, hidden_alias)  # POSITIVE: config.POSITIVE of ablate.py and ppo.py
from loss import LOSS_TYPES

# A preset is a plain dict of flag defaults (argparse set_defaults): it overrides the defaults written on the
# flags below, and a flag given on the command line overrides both.
PRESETS = {
    # embedded SmolLM2-135M, demo task, rule judge; the ablation study's configuration (docs/study.md): iterations
    # 0 and 1 and a 200-prompt evaluation in under 10 minutes on 2 CPU cores, DSL's effect beyond its interval;
    # a checkpoint at each epoch's end (8 steps: 64 prompts in batches of 8), ~5 s each for 1.6 GB of state
    "demo": dict(
        run_dir="runs/demo", base_model="smollm2-135m", data="demo", max_prompts=64, max_length=256,
        max_prompt_length=128, max_new_tokens=32, gen_batch_size=16, judge="rule", judge_model=None,
        epochs=3, batch_size=8, lr=3e-6, optimizer="adamw", save_every=8, gradient_checkpointing=False,
        logp_examples=16),
    "paper": dict(  # Table 3 on zephyr-7b-sft-full, 20k UltraChat prompts, gpt-4o-mini judge
        run_dir="runs/paper", base_model="alignment-handbook/zephyr-7b-sft-full", data=None,
        max_prompts=20000, max_length=1024, max_prompt_length=512, max_new_tokens=512, gen_batch_size=32,
        judge="openai", judge_model="gpt-4o-mini", epochs=3, batch_size=4, lr=5e-7, optimizer="rmsprop",
        dtype="bf16", save_every=200, gradient_checkpointing=True, logp_examples=64),
}
# How a run was started, recorded beside the training flags (train.RunState): a checkpoint made under another
# world size, start model or set of pairs is never resumed.
RUN_STATE = ("world_size", "start_model", "pairs_sha256")


def build_parser(preset="demo", training=None):
    """train.py's parser with `preset`'s defaults. A flag added with `trains=True` is one whose change would make
    a resumed run differ from an uninterrupted one: its name is appended to `training` (TRAINING_KEYS)."""
    p = Parser(prog="train.py", description="One DNPO iteration: generate, judge, label, train, save. "
               f"Defaults shown are those of --preset {preset}.")
    training = [] if training is None else training

    def flag(group, *names, trains=False, **kw):
        action = group.add_argument(*names, **kw)
        if trains:
            training.append(action.dest)
        return action

    g = p.add_argument_group("run")
    flag(g, "--iter", type=int, required=True, help="iteration k ≥ 0 (0 = plain SPIN from --base-model)")
    flag(g, "--preset", choices=sorted(PRESETS), default="demo", help="flag defaults (default %(default)s)")
    flag(g, "--run-dir", help="run directory holding iter{k}/ (default %(default)s)")
    flag(g, "--seed", type=COUNT, default=0, trains=True,
         help="seed of data order, noise and noise-network init (default %(default)s)")
    flag(g, "--device", help="cpu | cuda | cuda:N (default: cuda if available, else cpu)")
    flag(g, "--dtype", choices=["bf16", "fp32"], trains=True,
         help="compute dtype (default %(default)s: None = bf16 on CUDA, fp32 on CPU)")
    flag(g, "--fp32-head", action=argparse.BooleanOptionalAction, default=True, trains=True,
         help="under bf16: lm_head and the log-softmax in fp32 from the bf16 body's states (loss.py departure 7; "
              "--no-fp32-head: all bf16; default %(default)s)")
    g = p.add_argument_group("data")
    flag(g, "--data", help="training prompts: 'demo' or a jsonl/parquet file (plain, UltraChat, SPIN; "
                           "default %(default)s)")
    flag(g, "--max-prompts", type=COUNT, help="use the first N prompts (0 = all; default %(default)s)")
    flag(g, "--max-length", type=POSITIVE_INT, trains=True, help="max tokens of prompt + answer (default %(default)s)")
    flag(g, "--max-prompt-length", type=POSITIVE_INT, trains=True, help="max prompt tokens (default %(default)s)")
    flag(g, "--flaw-rate", type=FINITE, default=0.3,
         help="--data demo: fraction of flawed human answers (default %(default)s)")
    flag(g, "--history", type=POSITIVE_INT, default=1, trains=True,
         help="train on the pairs of the last h iterations (1 = this one only; default %(default)s)")
    g = p.add_argument_group("model and generation")
    flag(g, "--base-model", help="start model of iteration 0: hub id, dir, or smollm2-135m (embedded; "
                                 "default %(default)s)")
    flag(g, "--start-model", help="k ≥ 1: start from this dir or hub id, not <run-dir>/iter{k-1}/model (ablate.py)")
    flag(g, "--trust-remote-code", action="store_true", help="allow hub model code")
    flag(g, "--gradient-checkpointing", action=argparse.BooleanOptionalAction,
         help="recompute activations in backward (default %(default)s)")
    add_generation_flags(g, gen_batch_size=None)  # cli.py: the same names as eval.py score's (defaults: the preset)
    g = p.add_argument_group("DSL and judge (the same --judge-* flags as judge.py and eval.py score)")
    flag(g, "--dsl", action=argparse.BooleanOptionalAction, trains=True,
         help="dynamic sample labeling (default on for k ≥ 1; --no-dsl: human = chosen)")
    judges.add_judge_flags(g, judge=None)  # judge.py: every judge setting, its default and help (judge: the preset)
    g = p.add_argument_group("DNPO")
    flag(g, "--beta", type=POSITIVE32, default=0.1, trains=True, help="β of the margin (default %(default)s)")
    flag(g, "--loss-type", choices=LOSS_TYPES, default="sigmoid", trains=True,
         help="ℓ(m): sigmoid (paper) or hinge (SPIN repo; default %(default)s)")
    flag(g, "--noise", choices=["trainable", "fixed", "none"], trains=True,
         help="noise on reference logits of rejected answers (default trainable for k ≥ 1; none = SPIN)")
    flag(g, "--noise-alpha", type=NONNEGATIVE32, default=noises.DEFAULT_ALPHA, trains=True,
         help="α weight of mean σ² in the loss (0 = no bound; default %(default)s, see noise.py)")
    flag(g, "--noise-sigma", type=POSITIVE32, default=noises.DEFAULT_SIGMA, trains=True,
         help="σ of --noise fixed, in logits (default %(default).3g)")
    flag(g, "--noise-lr", type=POSITIVE32, default=1e-3, trains=True,
         help="learning rate of the noise network (default %(default)s)")
    flag(g, "--noise-init-variance", type=POSITIVE32, default=noises.DEFAULT_INIT_VARIANCE, trains=True,
         help="σ² of the trainable noise at the start of each iteration (Eq. 5 bias init; default %(default)s)")
    hidden_alias(g, "--noise-chunk-size", flag(  # its older name: it chunks the policy's head as well as the noise's
        g, "--head-chunk-size", dest="noise_chunk_size", metavar="N", type=POSITIVE_INT, default=256,
        help="answer tokens per chunk of lm_head + log-softmax: the policy's log-probs and the noise's z = "
             "lm_head(h) (memory; default %(default)s)"))
    g = p.add_argument_group("optimization")
    flag(g, "--epochs", type=POSITIVE_INT, trains=True, help="epochs over the pairs (default %(default)s)")
    flag(g, "--batch-size", type=POSITIVE_INT, trains=True,
         help="pairs per micro-batch per process (default %(default)s)")
    flag(g, "--grad-accum", type=POSITIVE_INT, default=1, trains=True,
         help="micro-batches per optimizer step (1 = off; default %(default)s)")
    flag(g, "--lr", type=POSITIVE32, trains=True, help="peak policy learning rate (default %(default)s)")
    flag(g, "--optimizer", choices=["rmsprop", "adamw", "sgd"], trains=True,
         help="optimizer (paper: rmsprop; sgd: plain, no momentum, for the noise study; default %(default)s)")
    flag(g, "--weight-decay", type=NONNEGATIVE32, default=0.0, trains=True, help="weight decay (default %(default)s)")
    flag(g, "--warmup-ratio", type=NONNEGATIVE, default=0.1, trains=True,
         help="fraction of steps of linear warmup, then linear decay to 0 (default %(default)s)")
    flag(g, "--max-grad-norm", type=NONNEGATIVE, default=1.0, trains=True,
         help="gradient clipping norm (0 = off; the norm is logged either way; default %(default)s)")
    flag(g, "--precompute-ref", action=argparse.BooleanOptionalAction, default=True, trains=True,
         help="run the frozen reference once per iteration, not in every step (default %(default)s; step.py)")
    flag(g, "--ref-cache-gb", type=NONNEGATIVE, default=4.0,
         help="memory for the reference's rejected-answer hidden states (default %(default)s)")
    flag(g, "--group-by-length", action=argparse.BooleanOptionalAction, default=True, trains=True,
         help="micro-batches of pairs of similar length (less padding; default %(default)s)")
    flag(g, "--pack-pairs", action=argparse.BooleanOptionalAction, default=True, trains=True,
         help="one row per pair, the prompt shared by both answers (packing.py; with --precompute-ref, "
              "sdpa or eager attention; default %(default)s)")
    g = p.add_argument_group("checkpoint and logging")
    flag(g, "--save-every", type=POSITIVE_INT,
         help="checkpoint every N optimizer steps and each epoch end (default %(default)s)")
    flag(g, "--keep-checkpoint", action="store_true",
         help="keep iter{k}/checkpoint/ after the model is saved (default: delete it)")
    flag(g, "--logp-examples", type=COUNT,
         help="pairs whose log-probs go to logps.jsonl (0 = off; default %(default)s)")
    flag(g, "--stop-after-steps", type=COUNT, default=0,
         help="debug: stop after N optimizer steps, as if killed (0 = off)")
    flag(g, "--report-to", choices=tracking.KINDS, default="none",
         help="also log every metrics row to tensorboard or wandb (tracking.py; default %(default)s)")
    g = p.add_argument_group("scale-out (distributed.py, memplan.py)")
    flag(g, "--dist", choices=["auto", "ddp", "fsdp"], default="auto",
         help="under torchrun: DDP or FSDP2 for the policy (auto: FSDP from 1 B parameters; default %(default)s)")
    flag(g, "--memory-check", action=argparse.BooleanOptionalAction, default=True,
         help="refuse a run whose memory plan does not fit the GPU (default %(default)s)")
    p.set_defaults(**PRESETS[preset])
    return p


_training = []
build_parser(training=_training)
# Flags whose change would make a checkpoint's resumed run differ from an uninterrupted one (the `trains=True`
# flags), and how the run was started: a checkpoint records them and refuses to resume under others
# (checkpoint.restore); stages.py records them for the train stage.
TRAINING_KEYS = tuple(_training) + RUN_STATE


def parse_args(argv=None):
    """The resolved flags: --preset's dict as argparse defaults, the command line over it, then check_args."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="demo")
    preset = pre.parse_known_args(argv)[0].preset
    return check_args(build_parser(preset if preset in PRESETS else "demo").parse_args(argv))


def check_args(args):
    """errors.Refusal (one line; train.py prefixes its name) for combinations no run can use (each flag's own
    range is checked by its type); resolves the iteration-dependent DSL/noise defaults."""
    def need(ok, message):
        if not ok:
            raise errors.Refusal(message)
    need(args.iter >= 0, f"--iter must be ≥ 0, got {args.iter}")  # each flag's own range: its type (number)
    need(str(args.run_dir).strip() != "", "--run-dir must name a directory, got an empty string")
    check_device(args.device)
    need(0 < args.top_p <= 1, f"--top-p must be in (0, 1], got {args.top_p}")
    need(0 <= args.flaw_rate <= 1, f"--flaw-rate must be in [0, 1], got {args.flaw_rate}")
    need(args.warmup_ratio < 1, f"--warmup-ratio must be < 1, got {args.warmup_ratio}")
    need(args.max_prompt_length < args.max_length,
         f"--max-prompt-length ({args.max_prompt_length}) must be < --max-length ({args.max_length})")
    need(args.data is not None, f"--preset {args.preset} needs --data FILE (an UltraChat jsonl/parquet file)")
    judges.check_judge_args(args)  # --judge-model for hf and rm, pairwise for openai, 1..10 for rule
    if args.data != "demo":  # every record read now, before the model loads (bad lines: file:line)
        try:
            records = data.load_prompts(args.data, max_prompts=args.max_prompts or None)
        except ValueError as e:
            raise errors.Refusal(f"--data {e}") from None
        no_answer = next((i for i, r in enumerate(records, 1) if "answer" not in r), None)
        need(args.judge != "rule" or no_answer is None,
             f"--judge rule needs an 'answer' field in every record; {args.data} record {no_answer} (id "
             f"{records[(no_answer or 1) - 1]['id']!r}) has none (use --judge openai or hf for other data)")
    if args.iter == 0:
        if args.dsl or args.noise not in (None, "none"):
            print("train.py: iteration 0 is plain SPIN (paper §4.1): ignoring --dsl / --noise", file=sys.stderr)
        args.dsl, args.noise = False, "none"
    args.dsl = True if args.dsl is None else args.dsl
    args.noise = args.noise or "trainable"
    need(args.noise != "fixed" or args.noise_sigma > 0, "--noise fixed needs --noise-sigma > 0")
    tracking.require(args.report_to)  # a missing tracker library stops here, before any model loads
    return args


def check_device(name):
    """errors.Refusal (one line), before anything is written, for a --device this machine cannot run: not a
    device name (tpu), or a CUDA device on a CPU-only build or machine, or an index beyond the GPUs present."""
    if name is None:
        return
    import torch
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise errors.Refusal(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise errors.Refusal(f"--device {name}: only cpu and cuda (cuda:N) are supported")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise errors.Refusal(f"--device {name}: no CUDA GPU is available (PyTorch {torch.__version__}, {build}); "
                             f"use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise errors.Refusal(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s) "
                             f"(cuda:0 … cuda:{torch.cuda.device_count() - 1})")


def check_judge(args):
    """The judge's own checks (base URL, API key in the environment), run before the model loads by building
    it once without its cache (the hf judge is not built: that would load its model); errors.Refusal (one line)
    with the judge's message."""
    if args.judge == "hf":
        return
    try:
        judges.judge_from_args(args)  # every --judge-* setting, as the judge stage builds it
    except ValueError as e:  # JudgeFatalError is a ValueError
        raise errors.Refusal(str(e)) from None
