"""What the commands' parsers share: one-line argparse errors (`Parser`), the number types of flags, the
generation settings (`add_generation_flags`) and hidden aliases of renamed flags. The judge's settings are
declared in judge.py (`add_judge_flags`), train.py's own flags in config.py.

A setting that more than one command takes is declared once, with its default and its `%(default)s` help, and
added to each command's parser by the same function, so it has one name in every command.

Where this departs from, or fills a gap in, the paper:
1. Nothing of the method; tooling of ours.
"""
import argparse
import math


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block; "argument --x: must be …" reads "--x must be …"
        if message.startswith("argument ") and ": " in message:
            name, rest = message[len("argument "):].split(": ", 1)
            message = f"{name.split('/')[0]} {rest}" if rest.startswith("must") else f"{name}: {rest}"
        raise SystemExit(f"{self.prog}: {message} (see --help)")


def number(kind, low=None, strict=False, high=None):
    """An argparse type: a finite int/float, > low (strict) or ≥ low, and ≤ high; the error reads "must be > 0,
    got -1"."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if low is not None and (value <= low if strict else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '≥'} {low}, got {text}")
        if high is not None and value > high:
            why = " (the float32 range of the tensors it scales)" if high == FLOAT32_MAX else ""
            raise argparse.ArgumentTypeError(f"must be ≤ {high:.4g}{why}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


POSITIVE_INT, POSITIVE, COUNT, NONNEGATIVE, FINITE = (number(int, 0, True), number(float, 0, True), number(int, 0),
                                                     number(float, 0), number(float))
def fraction(text):
    """An argparse type: a number in [0, 1] (a rate or a share)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


# Flags that multiply float32 tensors (learning rates, β, σ, weight decay): beyond float32's range they would
# overflow in the first step, after generation and judging; refused when parsed instead.
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max
POSITIVE32, NONNEGATIVE32 = number(float, 0, True, FLOAT32_MAX), number(float, 0, False, FLOAT32_MAX)


def hidden_alias(group, old, action):
    """`old` as a second spelling of `action`'s flag, accepted but not shown by --help (a renamed flag)."""
    kw = dict(dest=action.dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS)
    if action.nargs == 0:  # store_true / store_const
        return group.add_argument(old, action="store_const", const=action.const, **kw)
    return group.add_argument(old, type=action.type, choices=action.choices, metavar=action.metavar, **kw)


def default_help(text, unset=None):
    """`text (default %(default)s)`; with `unset`, what a None value means: `(default %(default)s; None = unset)`."""
    return f"{text} (default %(default)s; None = {unset})" if unset else f"{text} (default %(default)s)"


def add_generation_flags(group, *, max_new_tokens=None, gen_batch_size=8, sampling=True, unset_max_new_tokens=None,
                         gen_batch_size_alias=None, unset_gen_batch_size=None):
    """How answers are generated, under the same names in train.py and eval.py: --max-new-tokens and
    --gen-batch-size; with `sampling` (train.py) also --temperature, --top-p and --gen-backend (eval.py decodes
    greedily, eval.py departure 1). `unset_max_new_tokens` (`unset_gen_batch_size`) says what a None
    --max-new-tokens (--gen-batch-size) means;
    `gen_batch_size_alias` is a hidden older spelling of --gen-batch-size. Returns {dest: action}."""
    out = {}
    out["max_new_tokens"] = group.add_argument(
        "--max-new-tokens", type=POSITIVE_INT, default=max_new_tokens, metavar="N",
        help=default_help("generation length in tokens", unset_max_new_tokens))
    if sampling:
        out["temperature"] = group.add_argument("--temperature", type=NONNEGATIVE, default=0.0,
                                                help=default_help("sampling temperature (0 = greedy)"))
        out["top_p"] = group.add_argument("--top-p", type=FINITE, default=1.0,
                                          help=default_help("nucleus sampling mass (1 = off)"))
    out["gen_batch_size"] = group.add_argument("--gen-batch-size", type=POSITIVE_INT, default=gen_batch_size,
                                               metavar="N", help=default_help("prompts per generation batch",
                                                                                unset_gen_batch_size))
    if gen_batch_size_alias:
        hidden_alias(group, gen_batch_size_alias, out["gen_batch_size"])
    if sampling:
        out["gen_backend"] = group.add_argument("--gen-backend", choices=["hf", "vllm"], default="hf",
                                                help=default_help("generation backend"))
    return out
