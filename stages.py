"""What each stage of an iteration was made from, so that a rerun never reuses, or mixes into, the outputs
of other settings: `iter{k}/stages.json`, one record per stage, written by rank 0.

    {"generate": {"flags": {...}, "inputs": {"data": sha256|null, "start_model": sha256|null},
                  "output": {"generated.jsonl": sha256}},
     "judge":    {"flags": {...}, "inputs": {"generated.jsonl": sha256}, "output": {"judged.jsonl": sha256}},
     "label":    {"flags": {...}, "inputs": {"judged.jsonl": sha256},    "output": {"pairs.jsonl": sha256}},
     "train":    {"flags": {...}, "inputs": {"pairs": sha256 of the pairs trained on}, "output": {}}}

`flags` are the resolved flags that determine the stage's output (`stage_flags`); `inputs` the sha256 of
what it read; `output` the sha256 of its final file, added once that file is written. A record is
written before its stage produces anything, so partial files (`*.partial`, checkpoint/) are covered
too. `check` refuses, in one line naming the differing flags and the ways out (the old flags, a new
--run-dir, or deleting the iteration directory), a stage whose record differs from this run, whose
output file changed since it was written, or whose outputs exist without a record. A record whose
stage has left nothing on disk (nor has any later stage) is simply replaced.

Where this departs from, or fills a gap in, the paper:
1. The paper describes no run directory or resumption; this bookkeeping is ours. The start model is
   identified by its name (relative to the run directory when inside it) and, for a local directory,
   the sha256 of its files; a hub id by its name only.
"""
import hashlib
import json
import os
import pathlib
import urllib.parse

import data
import errors

RECORD = "stages.json"
ORDER = ("generate", "judge", "label", "train")
# Flags added after runs were recorded, with the value such a run had: a record or checkpoint without the key
# compares as this value, so `--no-pack-pairs` resumes or reuses what the code before --pack-pairs made.
LEGACY = {"pack_pairs": False, "noise_init_variance": 0.01,
          "fp32_head": True}  # bf16 was opt-in on CPU and no GPU ran the code before --fp32-head: fp32 runs, unchanged


def with_legacy(recorded, keys):
    """Recorded flags (a stage record's or a checkpoint's) with LEGACY values for the keys among `keys` that
    were not recorded."""
    return {**{k: v for k, v in LEGACY.items() if k in keys}, **recorded}


OUTPUTS = {  # files (globs) whose presence means a stage has produced something
    "generate": ("generated.jsonl", "generated.jsonl.partial*"),
    "judge": ("judged.jsonl", "judged.jsonl.partial"),
    "label": ("pairs.jsonl",),
    "train": ("checkpoint/state.pt", "model/config.json"),
}


def sha256_file(path):
    """Hex sha256 of a file's bytes, or None when it does not exist."""
    if not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj):
    """Hex sha256 of an object's canonical JSON (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def sha256_dir(path):
    """Hex sha256 of a directory's files (names and bytes, hidden files excluded), or None if not a directory."""
    root = pathlib.Path(path)
    if not root.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*")
                    if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)):
        h.update(f.relative_to(root).as_posix().encode("utf-8") + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()


def redact_url(url):
    """url without its user:password@ part (credentials never land on disk)."""
    if not isinstance(url, str) or "@" not in url:
        return url
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def public_args(args):
    """A dict of flags fit to write to disk: every *url* value without credentials."""
    return {k: redact_url(v) if "url" in k else v for k, v in dict(args).items()}


def canonical_model(name):
    """A model as the records compare it: a local directory as its absolute, resolved path (one directory however
    it is spelled: relative to another working directory, absolute, through a link); a hub id or the embedded
    model's name as given."""
    path = pathlib.Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _model_name(name, run_dir):
    """The start model's name, relative to the run directory when inside it (a run directory may move), else
    canonical_model's."""
    name = canonical_model(name)
    try:
        return pathlib.Path(name).relative_to(pathlib.Path(run_dir).resolve()).as_posix()
    except ValueError:
        return name


def stage_flags(args, training_keys, run_dir, embedded=()):
    """({stage: flags}, {stage: inputs known before any stage runs}) for this run's resolved args."""
    start_model = _model_name(args.start_model, run_dir)
    generate = dict(data=args.data, max_prompts=args.max_prompts or None, seed=args.seed,
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    max_prompt_length=args.max_prompt_length, gen_backend=args.gen_backend, start_model=start_model)
    if args.data in (None, "demo"):  # the demo's human answers depend on the flaw rate
        generate["flaw_rate"] = getattr(args, "flaw_rate", 0.3)
    if args.temperature > 0:  # sampling is seeded per batch of each rank's shard
        generate.update(gen_batch_size=args.gen_batch_size, world_size=args.world_size)
    flags = dict(generate=generate,
                 judge=dict(judge=args.judge, judge_model=args.judge_model,
                            judge_base_url=redact_url(args.judge_base_url),
                            **{k: getattr(args, k) for k, default in (("judge_scale", 10), ("judge_mode", "single"))
                               if getattr(args, k, default) != default}),  # recorded when not the default
                 label=dict(dsl=args.dsl),
                 train={k: start_model if k == "start_model" else getattr(args, k, None)
                        for k in training_keys if k != "pairs_sha256"})
    model_sha = None if args.start_model in embedded else sha256_dir(args.start_model)
    data_sha = sha256_file(args.data) if args.data not in (None, "demo") else None
    return flags, dict(generate=dict(data=data_sha, start_model=model_sha))


def load(it_dir):
    """The records of an iteration directory ({} when none)."""
    path = pathlib.Path(it_dir) / RECORD
    if not os.path.lexists(path):
        return {}
    way_out = f"delete {it_dir} to redo the iteration"
    try:
        records = data.read_json(path)
    except ValueError as e:  # invalid JSON, not UTF-8, a directory, not an object
        reason = str(e).removeprefix(f"{path}: ").splitlines()[0][:120]
        raise errors.Refusal(f"{path} is corrupt ({reason}); {way_out}") from None
    for stage, rec in records.items():  # every field a later check reads, of the type it reads
        problem = None
        if not isinstance(rec, dict):
            problem = f"field {stage!r} must be an object, got {type(rec).__name__}"
        else:
            for field in ("flags", "inputs", "output"):
                if not isinstance(rec.get(field, {}), dict):
                    problem = f"field {stage}.{field} must be an object, got {type(rec[field]).__name__}"
                    break
            else:
                bad = [k for k, v in rec.get("output", {}).items() if not isinstance(v, str)]
                if bad:
                    problem = f"field {stage}.output.{bad[0]} must be a sha256 string"
        if problem:
            raise errors.Refusal(f"{path} is corrupt ({problem}); {way_out}")
    return records


def _produced(it_dir, stage):
    """Existing outputs of a stage, as paths."""
    return [p for pattern in OUTPUTS[stage] for p in sorted(pathlib.Path(it_dir).glob(pattern))]


def _fmt(d):
    return ", ".join(f"{k}={v}" for k, v in d.items())


def check(it_dir, stage, flags, inputs=None, records=None):
    """errors.Refusal (one line) unless this stage's outputs in it_dir may be reused by a run with these flags and
    inputs (only the inputs given are compared). Returns the stage's record, or None when it needs a new one."""
    it_dir = pathlib.Path(it_dir)
    records = load(it_dir) if records is None else records
    rec, way_out = records.get(stage), f"use a new --run-dir, or delete {it_dir} to redo the iteration"
    later = ORDER[ORDER.index(stage):]
    produced = [p for s in later for p in _produced(it_dir, s)]
    if rec is None:
        if _produced(it_dir, stage):
            raise errors.Refusal(f"{_produced(it_dir, stage)[0]} exists but {it_dir / RECORD} does not record "
                                 f"what it was made from (an older version, or a copied file); {way_out}")
        return None
    if not produced:
        return None  # nothing on disk depends on the old record: it is replaced
    old, new = with_legacy(rec.get("flags", {}), flags), flags
    if isinstance(old.get("start_model"), str):  # recorded as spelled then (an older record): compared as one model
        old = {**old, "start_model": _model_name(old["start_model"], pathlib.Path(it_dir).parent)}
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diff:
        raise errors.Refusal(f"{it_dir} holds {stage} outputs made with {_fmt({k: old.get(k) for k in diff})}; "
                             f"rerun with those flags (this run has {_fmt({k: new.get(k) for k in diff})}), "
                             f"or {way_out}")
    for name, sha in (inputs or {}).items():
        if rec.get("inputs", {}).get(name) != sha:
            raise errors.Refusal(f"{it_dir} holds {stage} outputs made from another {name} (sha256 "
                                 f"{str(rec.get('inputs', {}).get(name))[:12]}, now {str(sha)[:12]}); restore it, "
                                 f"or {way_out}")
    for name, sha in rec.get("output", {}).items():
        now = sha256_file(it_dir / name)
        if now is not None and now != sha:
            raise errors.Refusal(f"{it_dir / name} changed since the {stage} stage wrote it (sha256 {sha[:12]}, "
                                 f"now {now[:12]}); restore it, or {way_out}")
    return rec


def check_all(it_dir, flags, inputs):
    """`check` every stage of it_dir against this run before anything runs; inputs of judge, label and train
    are compared where their files exist now (judge and label here, the pairs when training starts)."""
    it_dir, records = pathlib.Path(it_dir), load(it_dir)
    known = dict(inputs)
    for stage, source in (("judge", "generated.jsonl"), ("label", "judged.jsonl")):
        if (it_dir / source).is_file():
            known[stage] = {source: sha256_file(it_dir / source)}
    for stage in ORDER:
        check(it_dir, stage, flags[stage], known.get(stage), records)


def check_history(run_dir, k, h):
    """The iterations k-h+1 .. k-1 whose pairs.jsonl --history h trains on, checked as the current one is:
    each must exist with a label record whose output sha256 is the file's now (errors.Refusal, one line)."""
    for j in range(max(0, k - h + 1), k):
        it_dir = pathlib.Path(run_dir) / f"iter{j}"
        pairs, rec = it_dir / "pairs.jsonl", load(it_dir).get("label")
        if not pairs.is_file():
            raise errors.Refusal(f"{pairs} is missing (--history {h} trains on iterations {max(0, k - h + 1)}.."
                                 f"{k}); run iteration {j} first, or lower --history")
        recorded = (rec or {}).get("output", {}).get("pairs.jsonl")
        if recorded is None:
            raise errors.Refusal(f"{pairs} exists but {it_dir / RECORD} does not record what it was made from "
                                 f"(--history {h} reads it); redo iteration {j}, or lower --history")
        now = sha256_file(pairs)
        if now != recorded:
            raise errors.Refusal(f"{pairs} changed since the label stage wrote it (sha256 {recorded[:12]}, now "
                                 f"{now[:12]}; --history {h} reads it); restore it, or redo iteration {j}")


def begin(it_dir, stage, flags, inputs):
    """Rank 0, before a stage produces anything: `check` it, then record its flags and inputs."""
    records = load(it_dir)
    rec = check(it_dir, stage, flags, inputs, records)
    if rec is None or (rec.get("flags"), rec.get("inputs")) != (flags, inputs):
        records[stage] = dict(flags=flags, inputs=inputs, output={})
        data.write_json(pathlib.Path(it_dir) / RECORD, records)


def finish(it_dir, stage, output):
    """Rank 0, once a stage's final file is written: record its sha256."""
    records = load(it_dir)
    records[stage]["output"] = {output: sha256_file(pathlib.Path(it_dir) / output)}
    data.write_json(pathlib.Path(it_dir) / RECORD, records)
