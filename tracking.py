"""Experiment tracking: train.py's metrics rows to TensorBoard or Weights & Biases (`--report-to`).

    tracker = open_run(kind, it_dir, config, resumed_step)   # rank 0; kind: none | tensorboard | wandb
    tracker.log(row, step)                                   # every row train.py appends to metrics.jsonl
    tracker.close()

One tracker run per (run directory, iteration), named "<run-dir name>/iter<k>"; its config is the resolved
public flags (stages.public_args, applied here, so no credential reaches a tracker). Every number of a
row is logged under its metrics.jsonl key, at the row's optimizer step; other values (None, strings) are
left out. Both libraries are optional: `require(kind)` (config.check_args, before any model loads) turns a
missing one into a one-line errors.Refusal naming the pip command.

TensorBoard (torch.utils.tensorboard.SummaryWriter): event files go into the iteration directory itself,
so `tensorboard --logdir <the folder holding the run directories>` lists the runs as "<run dir>/iter<k>";
scalars are TensorBoard's classic float32 summaries (metrics.jsonl's numbers rounded to float32: the
ones TensorBoard's readers purge on a resume, below); the config is a text summary "config" (a JSON block). W&B (wandb.init): project $WANDB_PROJECT or "dnpo",
group the run directory's name, files under the iteration directory ($WANDB_DIR overrides), mode
$WANDB_MODE (offline needs no account: `wandb sync` uploads later).

Resume: train.py logs only the steps after the checkpoint it resumed from (rows up to it were logged by
the earlier process). TensorBoard also gets purge_step = resumed step + 1: its readers (EventAccumulator,
tests/test_tracking.py) hide the events a
killed process wrote after its last checkpoint (metrics.jsonl drops those rows too), so the event files
read back exactly as metrics.jsonl; a fresh start (resumed step 0) purges every older event of the
iteration. W&B resumes the run of the same id (the iteration directory's path and the sha256 of its
training pairs); it cannot purge, and drops a re-logged step not above the last one it holds (a resumed
run computes the same numbers for those steps, so they agree; W&B warns).

Where this departs from, or fills a gap in, the paper:
1. The paper names no tracker; this is tooling of ours and changes no number of the method.
"""
import hashlib
import importlib.util
import json
import os
import pathlib

import errors
import stages

KINDS = ("none", "tensorboard", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # kind -> the module find_spec looks for (= pip name)


def require(kind):
    """errors.Refusal (one line) when the library of `kind` is not installed, or (wandb) when it has neither a key nor
    a local mode (wandb_credentials): called before any model loads, not at the train stage after generation."""
    package = PACKAGES.get(kind)
    if package is not None and importlib.util.find_spec(package) is None:
        raise errors.Refusal(f"--report-to {kind} needs the {package} package: pip install {package} "
                             f"(or pip install -r requirements-track.txt)")
    if kind == "wandb" and wandb_credentials() is None:
        raise errors.Refusal("--report-to wandb has no W&B API key (no WANDB_API_KEY, no `wandb login` entry "
                             "in ~/.netrc) and no local mode; export WANDB_API_KEY, run `wandb login`, or set "
                             "WANDB_MODE=offline (then `wandb sync` uploads later)")


def wandb_credentials(environ=None):
    """How wandb.init will authenticate, read the documented ways without importing wandb: "mode" (WANDB_MODE
    offline/disabled/dryrun, or `wandb offline`'s settings file), "env" (WANDB_API_KEY or
    WANDB_IDENTITY_TOKEN_FILE), "netrc" (`wandb login`'s entry for the host of WANDB_BASE_URL), else None.
    The key itself is never read into a value we keep."""
    import configparser
    import netrc
    import urllib.parse
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return "mode"
    if environ.get("WANDB_API_KEY") or environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "env"
    config_dir = pathlib.Path(environ.get("WANDB_CONFIG_DIR") or pathlib.Path.home() / ".config" / "wandb")
    settings = configparser.ConfigParser()
    try:
        settings.read(config_dir / "settings")
        if settings.get("default", "mode", fallback="").lower() in ("offline", "disabled", "dryrun"):
            return "mode"
    except (configparser.Error, OSError, UnicodeDecodeError):
        pass
    host = urllib.parse.urlparse(environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    for name in filter(None, (environ.get("NETRC"), str(pathlib.Path.home() / ".netrc"),
                              str(pathlib.Path.home() / "_netrc"))):
        try:
            if netrc.netrc(name).authenticators(host):
                return "netrc"
        except (FileNotFoundError, netrc.NetrcParseError, OSError):
            continue
    return None


def run_name(it_dir):
    """'<run-dir name>/iter<k>' of an iteration directory."""
    it_dir = pathlib.Path(it_dir).resolve()
    return f"{it_dir.parent.name}/{it_dir.name}"


def numbers(row):
    """The loggable part of a metrics row: its numbers as floats (booleans, None and strings left out)."""
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class NullTracker:
    """--report-to none, and every rank but 0."""

    def log(self, row, step):
        pass

    def close(self):
        pass


class TensorBoardTracker(NullTracker):
    def __init__(self, it_dir, config, resumed_step):
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when asked for

        self.writer = SummaryWriter(log_dir=str(it_dir), purge_step=resumed_step + 1 if resumed_step else 0)
        if not resumed_step:  # the config once per fresh start (a resume keeps the first one: step 0 is not purged)
            self.writer.add_text("config", "```json\n" + json.dumps(config, indent=1, sort_keys=True) + "\n```", 0)

    def log(self, row, step):
        for key, value in numbers(row).items():
            if key != "step":
                self.writer.add_scalar(key, value, step)
        self.writer.flush()  # one row per optimizer step: cheap, and `tensorboard` shows it at once

    def close(self):
        self.writer.close()


class WandbTracker(NullTracker):
    def __init__(self, it_dir, config, wandb):
        it_dir = pathlib.Path(it_dir).resolve()
        run_id = hashlib.sha256(f"{it_dir}\0{config.get('pairs_sha256')}".encode()).hexdigest()[:16]
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "dnpo", name=run_name(it_dir),
                                  group=it_dir.parent.name, job_type=it_dir.name, id=run_id, resume="allow",
                                  config=config, dir=os.environ.get("WANDB_DIR") or str(it_dir),
                                  mode=os.environ.get("WANDB_MODE") or None)
        except wandb.errors.Error as e:  # no account / key, a server refusing: one line (a rerun resumes)
            raise errors.Refusal(f"--report-to wandb: {' '.join(str(e).split())} (without an account: "
                                 f"WANDB_MODE=offline, then `wandb sync` later)") from None

    def log(self, row, step):
        self.run.log({k: v for k, v in numbers(row).items() if k != "step"}, step=step)

    def close(self):
        self.run.finish()


def _wandb():
    import wandb  # the module boundary the tests may replace

    return wandb


def open_run(kind, it_dir, config, resumed_step=0):
    """The tracker of one iteration: `config` (a flags dict) is made public here; resumed_step is the
    optimizer step of the checkpoint training resumed from (0: a fresh start)."""
    require(kind)
    config = stages.public_args(config)
    if kind == "tensorboard":
        return TensorBoardTracker(it_dir, config, resumed_step)
    if kind == "wandb":
        return WandbTracker(it_dir, config, _wandb())
    return NullTracker()
