"""One exit point per command: library modules raise, the commands print one line and exit.

    raise Refusal("--run-dir x is a file, not a directory")      # in any module a notebook may import
    except (ValueError, OSError) as e: raise SystemExit(one_line("train.py", e))   # only in a command's main

A `Refusal` is a ValueError whose message is written for the user (what is wrong, where, the way out), so
code that already catches ValueError for bad input (every command's main) handles it unchanged. Only
train.py, generate.py, judge.py, eval.py, ablate.py and noise_study.py turn errors into an exit.

Where this departs from, or fills a gap in, the paper:
1. Nothing of the method; tooling of ours.
"""


class Refusal(ValueError):
    """A run refused with a one-line message for the user (no traceback): bad flags, inputs or run state."""


def one_line(prog, error) -> str:
    """'PROG: message' on one line (whitespace runs folded); a message that already names PROG keeps one."""
    text = " ".join(str(error).split())
    if text.startswith(f"{prog}: "):
        text = text[len(prog) + 2:]
    return f"{prog}: {text}"
