"""Every command line the README and docs/*.md show is one their script accepts: each `python SCRIPT.py ...`,
`python -m bench ...` and `torchrun ... SCRIPT.py ...` of a shell block (```bash, ```sh, ```console or a bare
```), and the flags of each such command quoted inline (`python judge.py ... --judge-scale 100`), is read by the
parser that script itself builds, caught before it parses anything (nothing runs, nothing is written). A flag
the command lacks, or only accepts as a hidden older spelling, fails the test with the doc's file and line.

How a shell block is read: lines joined across trailing backslashes, `# comments` dropped, a console prompt
(`$ `) and environment assignments (`WANDB_MODE=offline python ...`) skipped, `&&`, `||`, `;` and `|` chains split
into separate commands. A command holding `...` elides arguments: only its flag names are checked; any other
is parsed whole (values, choices, required flags). The flags after a study script's `--` go to the script it
runs (ablate.py and noise_study.py: train.py, with --iter 1 when they name none; ppo_study.py: ppo.py)."""
import argparse
import contextlib
import io
import pathlib
import re
import runpy
import shlex
import sys
from unittest import mock

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent  # the repository
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = {"", "bash", "sh", "shell", "console", "zsh"}
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
CONTROL = {"&&", "||", ";", "|", "&"}
REDIRECT = {">", ">>", "<", ">&"}  # with the file they name, not part of the command line
ELLIPSIS = {"...", "…"}
PASS_ON = {"ablate.py": "train.py", "noise_study.py": "train.py", "ppo_study.py": "ppo.py"}  # flags after `--`
INLINE = re.compile(r"`((?:[A-Za-z_]\w*=\S*\s+)*(?:python3?|torchrun)\s[^`]*)`")


# ----------------------------------------------------------------------------- reading the docs
def fenced(text):
    """(line number, line, inside a fenced block, inside a shell block) of every line of a markdown text; a
    fence line counts as inside. A fence with an info string opens a block, a bare one opens or closes one."""
    inside = shell = False
    for number, line in enumerate(text.splitlines(), 1):
        found = FENCE.match(line)
        if found and not (inside and found.group(2)):  # an opening fence, or a bare closing one
            yield number, line, True, False
            inside = not inside
            shell = inside and found.group(2).lower() in SHELLS
            continue
        yield number, line, inside, shell


def shell_lines(text):
    """(line number, logical line) of the shell blocks of a markdown text, continuation lines joined."""
    joined, start = "", 0
    for number, line, _, shell in fenced(text):
        if not shell:
            joined = ""
            continue
        start = start if joined else number
        if line.rstrip().endswith("\\"):
            joined += line.rstrip()[:-1] + " "
            continue
        yield start, joined + line
        joined = ""


def inline_commands(text):
    """(line number, command) of the `python ...` code spans outside fenced blocks (a span may wrap a line)."""
    prose = "\n".join("" if inside else line for _, line, inside, _ in fenced(text))
    for m in INLINE.finditer(prose):
        yield prose.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split())


def commands(line):
    """(script, argv, elided) of every command of ours in one logical shell line; script is 'bench' for
    `python -m bench`. Lines that name no python or torchrun are not tokenized (prose, templates, output)."""
    if not re.search(r"\b(python3?|torchrun)\b", line):
        return []
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    tokens, found, part = list(lexer), [], []
    tokens = [t for i, t in enumerate(tokens) if t not in REDIRECT and (i == 0 or tokens[i - 1] not in REDIRECT)]
    for token in tokens + [";"]:
        if token not in CONTROL:
            part.append(token)
            continue
        while part and (part[0] == "$" or re.fullmatch(r"[A-Za-z_]\w*=.*", part[0])):
            part = part[1:]  # a console prompt, an environment assignment
        script, argv = None, []
        if part[:1] in (["python"], ["python3"]) and len(part) > 1:
            if part[1] == "-m" and part[2:3] == ["bench"]:
                script, argv = "bench", part[3:]
            elif part[1].endswith(".py"):
                script, argv = part[1], part[2:]
        elif part[:1] == ["torchrun"]:
            at = next((i for i, t in enumerate(part) if t.endswith(".py")), None)
            if at is not None:
                script, argv = part[at], part[at + 1:]
        if script is not None:
            found.append((script, [t for t in argv if t not in ELLIPSIS], any(t in ELLIPSIS for t in argv)))
        part = []
    return found


# ----------------------------------------------------------------------------- the scripts' own parsers
class Caught(BaseException):  # not an Exception: no script's `except` may swallow it
    def __init__(self, parser, argv):
        super().__init__(parser.prog)
        self.parser, self.argv = parser, argv


def parser_of(script, argv):
    """(parser, argv it was given) of `python script argv`: the script runs as __main__ until its first
    ArgumentParser.parse_args call, which is caught before it parses anything."""
    def catch(self, args=None, namespace=None):
        raise Caught(self, list(sys.argv[1:] if args is None else args))
    path = ROOT / script
    with mock.patch.object(argparse.ArgumentParser, "parse_args", catch), \
            mock.patch.object(sys, "argv", [script, *argv]), contextlib.redirect_stdout(io.StringIO()):
        try:
            if script == "bench":
                runpy.run_module("bench", run_name="__main__")
            else:
                runpy.run_path(str(path), run_name="__main__")
        except Caught as caught:
            return caught.parser, caught.argv
    raise AssertionError(f"{script} finished without parsing its command line")


def flags_of(parser, argv=None):
    """{option string: action} of a parser and of its subcommands' parsers: the subcommand argv names, or all."""
    out = {}
    for action in parser._actions:
        out.update({o: action for o in action.option_strings})
        if isinstance(action, argparse._SubParsersAction):
            named = [action.choices[t] for t in argv or () if t in action.choices][:1]
            for sub in named if argv is not None else action.choices.values():
                out.update(flags_of(sub, argv))
    return out


def flag_problems(parser, argv):
    """One line per flag of argv the parser (or the subcommand argv names) lacks, or accepts only as a hidden
    older spelling."""
    flags, problems = flags_of(parser, argv), []
    for token in argv:
        if not token.startswith("--") or token == "--":
            continue
        name = token.split("=", 1)[0]
        action = flags.get(name)
        if action is None:
            problems.append(f"{name} is not a flag of {parser.prog}")
        elif action.help == argparse.SUPPRESS:
            shown = [o for o, a in flags.items() if a.dest == action.dest and a.help != argparse.SUPPRESS]
            problems.append(f"{name} is a hidden older spelling in {parser.prog}; write {shown[0] if shown else '?'}")
    return problems


def parse_problem(parser, argv):
    """The parser's own error for argv (values, choices, required flags), or None."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(argv)
    except SystemExit as e:
        if e.code in (0, None):
            return None
        lines = [x for x in err.getvalue().splitlines() if x.strip()]
        return str(e.code) if isinstance(e.code, str) else (lines[-1] if lines else f"exit {e.code}")
    return None


def check_command(script, argv, elided):
    """The problems of one documented command line (empty: the script accepts it)."""
    if script != "bench" and not (ROOT / script).is_file():
        return [f"{script} is not a script of this repository"]
    cut = argv.index("--") if script in PASS_ON and "--" in argv else len(argv)
    own, passed = argv[:cut], argv[cut + 1:]
    parser, given = parser_of(script, own)
    problems = flag_problems(parser, given)
    if not problems and not elided and (problem := parse_problem(parser, given)):
        problems.append(problem)
    if script in PASS_ON and passed:
        inner = PASS_ON[script]
        if inner == "train.py" and "--iter" not in passed:
            passed = ["--iter", "1", *passed]
        problems += [f"after --: {p}" for p in check_command(inner, passed, elided)]
    return problems


def doc_problems(text, name="doc"):
    """Every problem of every command of a markdown text, as 'name:line: `command`: problem'."""
    out = []
    found = [(n, c) for n, line in shell_lines(text) for c in commands(line)]
    found += [(n, (script, argv, True)) for n, line in inline_commands(text) for script, argv, _ in commands(line)]
    for number, (script, argv, elided) in found:
        shown = shlex.join(["python", script, *argv])
        out += [f"{name}:{number}: `{shown}`: {p}" for p in check_command(script, argv, elided)]
    return out


def planted(text, line="python train.py --no-such-flag"):
    """text with `line` added as the last line of its first shell block (or in a new block at the end)."""
    lines, rows = text.splitlines(), list(fenced(text))
    for (number, _, _, shell), after in zip(rows, rows[1:]):
        if shell and not after[3]:  # the shell block's last line: its closing fence follows
            return "\n".join(lines[:number] + [line] + lines[number:])
    return text + f"\n\n```bash\n{line}\n```\n"


# ----------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_documented_command_is_accepted_by_its_script(doc):
    """Each command line of the page parses with the parser of the script it calls."""
    problems = doc_problems(doc.read_text(), doc.relative_to(ROOT).as_posix())
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_a_planted_flag_the_command_lacks_fails(doc):
    """`python train.py --no-such-flag` added to a shell block of the page is found."""
    problems = doc_problems(planted(doc.read_text()), doc.name)
    assert any("--no-such-flag is not a flag of train.py" in p for p in problems), problems


def test_the_reader_of_shell_blocks():
    """Continuation lines, comments, console prompts, environment prefixes, `&&` chains, elisions, torchrun,
    study flags after `--`, inline spans; other fenced blocks are not read."""
    doc = "\n".join([
        "Run `python judge.py ... --judge-scale 100` or `python eval.py score runs/demo",
        "--no-such-inline`.",
        "```bash",
        "python train.py --iter 1 \\",
        "    --judge openai --no-such-joined   # a comment --no-such-comment",
        "WANDB_MODE=offline python train.py --iter 0 && python eval.py score runs/demo --no-such-chained",
        "python judge.py ... --no-such-elided",
        "python judge.py --in a --out b --concurrency 4",
        "python train.py --iter 1 --judge-scale 7",
        "python train.py --judge rule",
        "torchrun --nproc_per_node 2 train.py --iter 0 --no-such-torchrun",
        "python ablate.py --iters 2 -- --max-prompts 64 --no-such-passed",
        "python -m bench --only no_such_benchmark",
        "python missing.py --x",
        "python -m pytest -q --no-such-pytest",
        "python eval.py score runs/demo --n 8",
        "```",
        "```console",
        "$ python judge.py --flip-report runs/demo --no-such-console",
        "```",
        "```python",
        "python train.py --no-such-python-block",
        "```",
        "```text",
        "python train.py --no-such-text-block",
        "```",
    ])
    problems = doc_problems(doc)
    text = "\n".join(problems)
    for expected in ["doc:1: `python eval.py score runs/demo --no-such-inline`: --no-such-inline is not a flag",
                     "doc:4: `python train.py --iter 1 --judge openai --no-such-joined`: --no-such-joined is not",
                     "--no-such-chained is not a flag of eval.py", "doc:7: `python judge.py --no-such-elided`",
                     "--concurrency is a hidden older spelling in judge.py; write --judge-concurrency",
                     "--judge-scale: invalid choice: 7", "the following arguments are required: --iter",
                     "--no-such-torchrun is not a flag of train.py", "after --: --no-such-passed is not a flag of "
                     "train.py", "no_such_benchmark", "missing.py is not a script of this repository",
                     "--n is not a flag of eval.py",
                     "doc:19: `python judge.py --flip-report runs/demo --no-such-console`"]:
        assert expected in text, (expected, problems)
    assert len(problems) == 13, problems  # nothing from the comment, pytest, the python or the text block
    assert not [p for p in problems if re.search(r"--no-such-(comment|pytest|python-block|text-block)", p)]


def test_a_temporary_doc_with_a_flag_train_py_lacks_fails(tmp_path):
    """The issue's check on a page written to disk: the planted line fails; the page without it passes."""
    page = tmp_path / "page.md"
    page.write_text("# A page\n\n```bash\npython train.py --iter 0\n```\n")
    assert doc_problems(page.read_text()) == []
    page.write_text(planted(page.read_text()))
    assert doc_problems(page.read_text(), "page.md") == [
        "page.md:5: `python train.py --no-such-flag`: --no-such-flag is not a flag of train.py"]
