"""The reward-model judge (`--judge rm --judge-model DIR_OR_ID`): one scalar per (prompt, answer) from a Hugging
Face sequence-classification reward model (`num_labels = 1`), e.g. the paper's PPO reward model
OpenAssistant/reward-model-deberta-v3-large-v2 or Skywork/Skywork-Reward-Llama-3.1-8B-v0.2.

The input is the (prompt, answer) conversation the reward model was trained on: through its tokenizer's chat
template when it has one (`[user: prompt, assistant: answer]`, no generation prompt after the answer, as the
Skywork and ArmoRM cards score), else the tokenizer's text pair `tokenizer(prompt, answer)` (the
OpenAssistant DeBERTa card). The score is the model's logit, written as a float; higher is better. Answers are
scored in batches of similar length, right-padded with the model config's `pad_token_id` (so a
last-token model pools the same token as unbatched, HF's rule), one at a time when the config has none. A
score that is not finite is a missing score (`null` + "judge_error"), as for the other judges. Scores are
cached like the HTTP judge's (judge_http.ScoreCache), keyed by sha256(the model's identity, the input format,
max_length, prompt, answer); the identity of a directory is the sha256 of its files (streamed once per process,
about 1.5 s per GB), of a hub id its name and the commit of its local snapshot.

Where this departs from, or fills a gap in, the paper:
1. The paper's DSL judge is GPT-4o-mini; its PPO baseline (Table 2) uses reward-model-deberta-v3-large-v2 as the
   reward. This judge serves both roles here: DSL (`train.py --judge rm`) and the reward of ppo.py.
2. Scores are real numbers on the model's own scale, not ratings 1..10, so DSL's tie rule (data.dsl_outcome:
   equal scores keep the human answer chosen) is an exact float equality: with a reward model two different
   answers almost never tie, and DSL flips whenever the generated answer scores higher by any amount (no
   margin, as the paper gives none). The head runs in float32 even when the model runs in bf16, so scores are
   not rounded to bf16's 8-bit mantissa (a spacing of 0.03 near 5, where different answers would tie);
   batching may still move a score in its 7th digit.
3. Empty answers: the other judges give an empty answer 1, the bottom of their scale, without asking; a reward
   scale has no bottom (1 can be a good score), so the reward model scores the empty answer itself (counted
   as `empty_answers`).
4. Length: an input longer than `max_length` tokens (default 4096, or the tokenizer's own smaller limit) keeps
   its first `max_length` tokens as a text pair (the tokenizer's truncation) and its last ones through a chat
   template (a last-token reward model reads the end); counted as `truncated`.
5. Weights load on the first score, not when the judge is built: train.py and judge.py build a judge once to
   check its settings before any work, and that check reads only the config and the tokenizer.
"""
import hashlib
import json
import math
import pathlib

import torch

import data
import stages
from judge_base import BATCH_SIZE, Judge
from judge_http import ScoreCache
from model import _from_pretrained, pick_device, pick_dtype, resolve_model

DEFAULT_MAX_LENGTH = 4096
FORMAT_VERSION = "rm-v1"  # the input format in cache keys: a change of it reuses no score


def hub_snapshot(name):
    """The commit of hub model `name` in the local Hugging Face cache (the snapshot a load uses), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
        found = try_to_load_from_cache(name, "config.json")
    except (ImportError, ValueError):
        return None
    return pathlib.Path(found).parent.name if isinstance(found, str) else None


def render_conversation(tokenizer, prompt, answer) -> list[int]:
    """Token ids of [user: prompt, assistant: answer] through the chat template, without a generation prompt,
    bounded in time and size as data.render_chat (a failing template: one line naming the tokenizer)."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    source = getattr(tokenizer, "name_or_path", "") or "the reward model's tokenizer"
    try:
        out = data._run_limited(lambda: tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True),
                                data.CHAT_TEMPLATE_SECONDS)
    except data._TemplateTimeout:
        raise ValueError(f"{source}: rendering one conversation through the chat template took over "
                         f"{data.CHAT_TEMPLATE_SECONDS:g} s (a runaway loop?)") from None
    except Exception as e:  # anything the template's code raised
        raise ValueError(f"{source}: the chat template cannot be rendered: {data._template_reason(tokenizer, e)}")
    ids = list(out["input_ids"])
    limit = 4 * (len(prompt) + len(answer)) + data.CHAT_TEMPLATE_MAX_CHARS
    if len(ids) > limit:
        raise ValueError(f"{source}: the chat template turns one conversation into {len(ids)} tokens (at most "
                         f"{limit})")
    return ids


class RewardModelJudge(Judge):
    """score = the reward model's scalar logit for (prompt, answer); higher is better."""

    def __init__(self, model, tokenizer=None, *, device=None, dtype=None, batch_size=BATCH_SIZE,
                 max_length=DEFAULT_MAX_LENGTH, cache_path=None, trust_remote_code=False):
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1 or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"rm judge: batch_size must be ≥ 1 and max_length ≥ 2 (got {batch_size}, {max_length})")
        self.batch_size, self.device, self.dtype, self.trust_remote_code = batch_size, device, dtype, trust_remote_code
        self.stats.update(truncated=0)
        if tokenizer is not None:  # a model object (tests, notebooks): nothing to load
            self.model, self.tokenizer, self.path = model, tokenizer, None
            config = model.config
            self.name = f"rm:{getattr(config, '_name_or_path', '') or type(model).__name__}"
        else:
            from transformers import AutoConfig, AutoTokenizer
            self.path = resolve_model(model)
            self.name, self.model = f"rm:{model}", None  # the weights load on the first score (departure 5)
            config = _from_pretrained(AutoConfig, model, self.path, trust_remote_code=trust_remote_code)
            self.tokenizer = _from_pretrained(AutoTokenizer, model, self.path, trust_remote_code=trust_remote_code)
        if getattr(config, "num_labels", None) != 1:
            raise ValueError(f"{self.name[3:]}: a reward model has one output (num_labels = 1); this config has "
                             f"{getattr(config, 'num_labels', None)} (a classifier, or not a sequence-classification "
                             f"model: pairwise rankers such as PairRM are not supported)")
        self.pad_id = config.pad_token_id  # None: every answer scored alone
        self.chat = bool(self.tokenizer.chat_template)
        if self.chat:
            render_conversation(self.tokenizer, data.SAMPLE_TURN, "5")  # a broken template: one line now
        own = getattr(self.tokenizer, "model_max_length", None)
        self.max_length = min(max_length, own) if isinstance(own, int) and 2 <= own < max_length else max_length
        self.cache = ScoreCache(cache_path) if cache_path else None
        self._identity = None

    # ---------------------------------------------------------------- loading, cache keys
    def attach_cache(self, path):
        self.cache = ScoreCache(path)

    def _load(self):
        """The weights, on the first score: eval mode, the head in float32 (departure 2)."""
        if self.model is not None:
            return
        from transformers import AutoModelForSequenceClassification
        device = pick_device(self.device)
        model = _from_pretrained(AutoModelForSequenceClassification, self.name[3:], self.path,
                                 dtype=pick_dtype(device, self.dtype), trust_remote_code=self.trust_remote_code)
        self.model = float32_head(model).to(device).eval()

    def identity(self):
        """What the scores are made from (module docstring): computed once."""
        if self._identity is None:
            if self.path is None:
                weights = self.model.state_dict()
                digest = hashlib.sha256()
                for key in sorted(weights):
                    digest.update(key.encode() + weights[key].detach().float().cpu().numpy().tobytes())
                self._identity = {"object": type(self.model).__name__, "sha256": digest.hexdigest()}
            elif pathlib.Path(self.path).is_dir():
                self._identity = {"directory": True, "sha256": stages.sha256_dir(self.path)}
            else:
                self._identity = {"hub": self.path, "revision": hub_snapshot(self.path)}
        return self._identity

    def key(self, prompt, answer) -> str:
        return hashlib.sha256(json.dumps([self.identity(), FORMAT_VERSION, self.chat, self.max_length, prompt,
                                          answer], sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    # ---------------------------------------------------------------- scoring
    def input_ids(self, prompt, answer) -> list[int]:
        """The token ids the reward model reads for one answer (module docstring; truncation: departure 4)."""
        if self.chat:
            ids = render_conversation(self.tokenizer, prompt, answer)
            if len(ids) > self.max_length:
                self.stats["truncated"] += 1
                ids = ids[-self.max_length:]
            return ids
        full = self.tokenizer(prompt, answer)["input_ids"]
        if len(full) <= self.max_length:
            return list(full)
        self.stats["truncated"] += 1
        return list(self.tokenizer(prompt, answer, truncation=True, max_length=self.max_length)["input_ids"])

    @torch.no_grad()
    def rewards(self, id_lists) -> list[float]:
        """The model's scalar output for each token-id list: batches of similar length, right-padded with the
        config's pad id (alone when it has none); float32 logits as Python floats."""
        self._load()
        device = next(self.model.parameters()).device
        order = sorted(range(len(id_lists)), key=lambda i: -len(id_lists[i]))
        size = self.batch_size if self.pad_id is not None else 1
        out = [None] * len(id_lists)
        for start in range(0, len(order), size):
            chunk = order[start:start + size]
            input_ids, mask = data.pad_rows([id_lists[i] for i in chunk], self.pad_id or 0, side="right")  # (b, T)
            logits = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits  # (b, 1)
            for i, value in zip(chunk, logits[:, 0].float().tolist()):
                out[i] = value
        return out

    def score_many(self, items):
        """(score | None, error | None) per item, empty answers included (departure 3); cached."""
        results, todo = [None] * len(items), []
        for i, item in enumerate(items):
            if not isinstance(item["answer"], str):
                raise ValueError(f"record {item.get('record', {}).get('id')}: answer is not a string")
            self.stats["empty_answers"] += not item["answer"].strip()
            hit = self.cache.get(self.key(item["prompt"], item["answer"])) if self.cache else None
            if hit is not None:
                results[i] = (hit["score"], None)
                self.stats["cache_hits"] += 1
            else:
                todo.append(i)
        for i, res in zip(todo, self._score([items[i] for i in todo]) if todo else []):
            results[i] = res
        return results

    def _score(self, items):
        ids = [self.input_ids(it["prompt"], it["answer"]) for it in items]
        self.stats["requests"] += len(items)
        self.stats["prompt_tokens"] += sum(map(len, ids))
        out = []
        for item, item_ids, value in zip(items, ids, self.rewards(ids)):
            if not math.isfinite(value):
                out.append((None, f"the reward model returned {value}"))
                continue
            if self.cache:
                self.cache.put(self.key(item["prompt"], item["answer"]), dict(score=value, prompt_tokens=len(item_ids),
                                                                                completion_tokens=0))
            out.append((value, None))
        return out

    def close(self):
        if self.cache:
            self.cache.close()


def float32_head(model):
    """The model with its output head (the last Linear with num_labels outputs) in float32, its input cast up."""
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == model.config.num_labels]
    if heads and heads[-1].weight.dtype != torch.float32:
        head = heads[-1].float()
        head.register_forward_pre_hook(lambda module, args: tuple(a.float() if torch.is_tensor(a) else a for a in args))
    return model
