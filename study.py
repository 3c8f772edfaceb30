"""The driver of the study commands (ablate.py, noise_study.py, ppo_study.py): a study is a list of steps, the
train.py and eval.py commands it runs, each with the test that its outputs exist; a step whose outputs exist is
skipped, so rerunning the same command continues where it stopped.

    opts = parse_args(argv)                  # the script's flags; check_commands: train.py's and eval.py's checks
    run_study("ablate.py", opts, plan(opts), check_settings, execute, report, table="ablation.md", run_dirs=dirs)

A step is a dict: `label` and `done` (a callable: the step's outputs exist), and any of `cmd` (the command, a list
or a callable that builds it when the step runs), `link=(target, path)` (make `path` a symbolic link to `target`),
`prepare=(directory, write)` (call `write()` before the command), `when` (a callable: run the step only while it
returns true) and `ok_rc` (the exit statuses that are not failures; default (0,)). A link and a `write` go into a
run directory only while this process holds its lock (`row_locks`): never into a run another process trains.

Every flag is checked before anything is written (`check_commands`); one study per --out (runlock.py); OUT's
settings file refuses a rerun with other settings (`keep_settings`); the table is written also after a failed
or interrupted step. Errors are errors.Refusal (one line); each script's `main` turns them into its exit.

Where this departs from, or fills a gap in, the paper:
1. Nothing of the method; tooling of ours.
"""
import contextlib
import errno
import fcntl
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import config
import data
import errors
import eval as ev
import judge as judges
import runlock


# ----------------------------------------------------------------------------- the command line
def split_argv(argv=None):
    """(the script's own flags, the train flags after `--`) of a command line (sys.argv when None)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    return argv[:cut], argv[cut + 1:]


def check_commands(train_argvs, eval_argvs=(), eval_judge=None):
    """train.py's and eval.py's own flag checks (config.parse_args and config.check_judge; eval.parse_args) on
    the argument lists of the commands a study will run, before the study writes anything: a bad flag after
    `--` (or an eval flag) is one line (errors.Refusal), not the failure of its first step after the study's
    settings, table and figure are written. The data file is read once, with the first train command; the
    others are checked with --data demo (the same file, already read). eval_judge: (kind, model, base_url)
    of an openai eval judge, built once without its cache (its URL and API key)."""
    def refused(what, e, command):  # e: a parser's SystemExit, or the errors.Refusal / ValueError of a check
        if isinstance(e, SystemExit) and e.code in (None, 0):  # --help after --: train.py's help was printed
            raise e
        message = " ".join(str(e.code if isinstance(e, SystemExit) else e).split())
        message = message.removeprefix("train.py: ").removeprefix(f"eval.py {command[0]}: ")
        message = message.removeprefix("eval.py: ").removesuffix(" (see --help)")
        return errors.Refusal(f"{what}: {message} (see python {' '.join(command)} --help)")
    for i, argv in enumerate(train_argvs):
        try:
            args = config.parse_args([*argv, *(["--data", "demo"] if i else [])])
            if i == 0:
                config.check_judge(args)
        except (SystemExit, ValueError) as e:  # the parser exits; config.check_args and check_judge raise
            raise refused("a train flag after -- is refused by train.py", e, ["train.py"]) from None
    for argv in eval_argvs:
        try:
            ev.parse_args(argv)
        except SystemExit as e:
            raise refused(f"eval.py {argv[0]} refuses an eval flag", e, ["eval.py", argv[0]]) from None
    if eval_judge and eval_judge[0] == "openai":
        try:
            judges.make_judge("openai", model=eval_judge[1], base_url=eval_judge[2])
        except ValueError as e:  # JudgeFatalError is a ValueError
            raise errors.Refusal(f"--eval-judge openai: {' '.join(str(e).split())}") from None


# ----------------------------------------------------------------------------- OUT's settings
def keep_settings(path, now, write):
    """Refuse (errors.Refusal, one line naming the changed settings) a study whose settings file `path` holds other
    settings than `now`; without the file, write `now` there when `write`."""
    path = Path(path)
    if path.is_file():
        was = data.read_json(path)
        same = lambda key: (flag_settings(was.get(key)) == flag_settings(now[key]) if key == "train_flags"  # noqa: E731
                            else was.get(key) == now[key])
        changed = [key for key in now if not same(key)]
        if changed:
            raise errors.Refusal(f"{path.parent} was run with " + ", ".join(f"{k}={was.get(k)!r}" for k in changed)
                                 + " (now " + ", ".join(f"{now[k]!r}" for k in changed) + "); rerun with those or use "
                                 "another --out")
    elif write:
        data.write_json(path, now)


def flag_settings(flags):
    """Train flags as a set of settings: {flag: its values} (the last one given wins, as in argparse), so the
    same flags in another order, or as --flag=value, are the same settings. Anything but a list: as it is."""
    if not isinstance(flags, list):
        return flags
    settings, flag = {}, None
    for token in map(str, flags):
        if token.startswith("--"):
            flag, _, value = token.partition("=")
            settings[flag] = [value] if value else []
        elif flag is not None:
            settings[flag].append(token)
        else:
            settings[None] = settings.get(None, []) + [token]
    return settings


# ----------------------------------------------------------------------------- the steps
def has_keys(path, field, keys) -> bool:
    """Whether the JSON file `path` exists and its `field` has every one of `keys` (eval.py's scores.json:
    models)."""
    return Path(path).is_file() and set(keys) <= set(data.read_json(path).get(field, {}))


@contextlib.contextmanager
def row_locks(dirs, prog):
    """Hold, for the block, the lock (runlock.py, `.lock`) of each directory in `dirs` that has one: a study
    writes into its run directories only while no other process holds them (train.py holds its --run-dir
    while it runs). Another holder is a one-line errors.Refusal naming it, before anything is written. The locks
    are released at the end of the block, so the train.py and eval.py commands the study runs next can take
    them; a directory without a `.lock` was never run by anyone, and one this process holds (runlock.hold,
    train.main called in-process) is skipped."""
    fds = []
    try:
        for directory in map(Path, dirs):
            path = directory / runlock.LOCK_NAME
            if os.path.realpath(directory) in runlock._held:
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            except OSError as e:
                why = "it is a symbolic link" if e.errno == errno.ELOOP else (e.strerror or str(e))
                raise errors.Refusal(f"cannot open the lock file {path} ({why})") from None
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise errors.Refusal(f"cannot lock {path} ({e.strerror or e})") from None
                raise errors.Refusal(f"{directory} is in use by {runlock._holder(fd)} (lock {path}); {prog} writes "
                                     f"into its run directories: wait for that process to finish, or use another "
                                     f"--out") from None
        yield
    finally:
        for fd in fds:
            os.close(fd)


def run_command(cmd) -> int:
    """Run one train.py / eval.py command as a subprocess; its exit status."""
    return subprocess.run(cmd).returncode


def execute(opts, steps, prog, times_name, report=None):
    """Run the steps not done yet, in order (a step: the module docstring); the seconds of each step run now go to
    OUT/`times_name`. A command that exits with a status not in the step's `ok_rc`, or leaves the step not done,
    stops the study (errors.Refusal, one line). `report(opts)`, when given, rewrites the study's table after every
    eval step (the table so far). Returns the seconds of every step run so far, by label."""
    times_path = Path(opts.out) / times_name
    times = data.read_json(times_path) if times_path.is_file() else {}
    for i, step in enumerate(steps, 1):
        done = step["done"]()
        if done or (step.get("when") and not step["when"]()):
            print(f"[{i}/{len(steps)} {'done' if done else 'skipped'}] {step['label']}", flush=True)
            continue
        t0 = time.time()
        if "link" in step:
            target, link = step["link"]
            link.parent.mkdir(parents=True, exist_ok=True)
            with row_locks([link.parent], prog):
                os.symlink(target, link, target_is_directory=True)
        if step.get("prepare"):
            directory, write = step["prepare"]
            with row_locks([directory], prog):
                write()
        if "cmd" in step:
            cmd = step["cmd"]() if callable(step["cmd"]) else step["cmd"]
            print(f"[{i}/{len(steps)}] {shlex.join(cmd)}", flush=True)
            rc = run_command(cmd)
            if rc not in step.get("ok_rc", (0,)) or not step["done"]():
                raise errors.Refusal(f"{step['label']} failed (exit status {rc}); fix the cause and rerun {prog} "
                                     f"(finished work is kept)")
        times[step["label"]] = time.time() - t0
        data.write_json(times_path, times)
        if report is not None and step["label"].startswith("eval"):
            report(opts)
    return times


def describe(step) -> str:
    """A step as --dry-run prints it: the link, the command, or (a command built when it runs) its label."""
    if "link" in step:
        return f"ln -s {step['link'][0]} {step['link'][1]}"
    return shlex.join(step["cmd"]) if isinstance(step.get("cmd"), list) else step["label"]


# ----------------------------------------------------------------------------- the study
def run_study(prog, opts, steps, check_settings, execute, report, table, describe=describe, run_dirs=()):
    """Run a study. --dry-run: print each step (`describe`), "# done: " before the finished ones, and write
    nothing. Otherwise stop (one line) if another process holds one of the study's `run_dirs` (row_locks), hold
    the lock on --out (one writer, runlock.py), check or write its settings file (`check_settings(opts, write)`),
    run the steps not done (`execute(opts, steps)`), and write the table with `report(opts)`, also after a
    failed or interrupted step (the table so far; the step's error is what is raised), then print OUT/`table`.
    Returns the steps (dry run) or report's result. The flags were checked by the script's parse_args."""
    if opts.dry_run:
        check_settings(opts, write=False)
        for step in steps:
            print(("# done: " if step["done"]() else "") + describe(step))
        return steps
    with row_locks(run_dirs, prog):  # a run directory another process holds: one line before anything is written
        pass
    runlock.hold(opts.out, prog)
    check_settings(opts, write=True)
    Path(opts.out).mkdir(parents=True, exist_ok=True)
    try:
        execute(opts, steps)
    except BaseException:
        with contextlib.suppress(Exception):
            report(opts)
        raise
    result = report(opts)
    print(Path(opts.out, table).read_text())
    return result


def exit_line(prog, error) -> str:
    """The one line a study command exits with (its `main` raises SystemExit with it): Ctrl-C, or a refusal, bad
    input or OS error of any module it calls (errors.one_line)."""
    if isinstance(error, KeyboardInterrupt):
        return f"{prog}: interrupted; rerun the same command to continue"
    return errors.one_line(prog, error)
