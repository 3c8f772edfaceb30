"""The local LM judge (`--judge hf`): a causal LM rates an answer by its next-token probabilities.

The model gets the single-answer template (judge_base.template(scale)) as a chat turn, followed by
"Rating: [[". With p_i the probability that the rating i (1..scale) is written next, the score is the
expected rating  Σ_i p_i·i / Σ_i p_i. A rating may take several tokens (digit-by-digit tokenizers such as
SmolLM2's write "10" as "1", "0"), so p_i is read from the tree of the ratings' token sequences:
p_i = Π_j P(t_j | prompt, t_<j) · (1 − Σ_c P(c | prompt, t)) where c runs over the tokens that extend
t = i's tokens into a longer rating ("1" into "10"): the mass left for "i ends here". The root is one
forward pass; every inner node of the tree (scale 10, digit tokens: "1"; scale 100: "1".."9" and "10") is
one more pass over its few tokens on a copy of the prompt's KV cache.

Where this departs from, or fills a gap in, the paper:
1. Local judge: the paper judges with GPT-4o-mini only; this judge is for offline runs and reads
   probabilities instead of a generated reply, so it never fails to parse.
2. Rating ends: "i ends here" also holds continuations that are not ratings ("1.5", "11" on scale 10), and
   a rating with no longer rating above it in the tree is taken to end: both approximations.
3. The judge model's chat template renders every grading prompt through data.render_chat: bounded in time
   and size, a failing template is one line naming the judge model's directory (data.py departure 5).
"""
import copy

import torch

from data import pad_rows, render_chat
from judge_base import BATCH_SIZE, DEFAULT_SCALE, RATING_PREFIX, Judge, build_prompt, check_scale_and_mode, judge_name
from model import load_model


class HFJudge(Judge):
    """Expected rating from a local causal LM's next-token probabilities after "Rating: [["."""

    def __init__(self, model, tokenizer=None, device=None, batch_size=BATCH_SIZE, scale=DEFAULT_SCALE):
        super().__init__()
        check_scale_and_mode(scale)
        if tokenizer is None:
            name = model
            model, tokenizer = load_model(model, device=device)
        else:
            name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.model, self.tokenizer, self.batch_size, self.scale = model, tokenizer, batch_size, scale
        self.name = judge_name(f"hf:{name}", scale)
        self.stats["rating_mass"] = 0.0  # Σ over answers of Σ_i p_i: low means the LM ignores the format
        self.rating_ids = self._rating_tokens()  # rating i -> its token ids after the prompt
        self.inner = sorted({tuple(ids[:j]) for ids in self.rating_ids.values() for j in range(1, len(ids))})
        self.extensions = {node: sorted({ids[len(node)] for ids in self.rating_ids.values()  # next tokens below node
                                         if len(ids) > len(node) and tuple(ids[:len(node)]) == node})
                           for node in self.inner}

    def prompt_text(self, question, answer) -> str:
        messages = [{"role": "user", "content": build_prompt(question, answer, self.scale)}]
        if self.tokenizer.chat_template:  # bounded, one-line errors naming the judge model's directory
            text = render_chat(self.tokenizer, messages)
        else:
            text = messages[0]["content"] + "\n\n"
        return text + RATING_PREFIX

    def _ids(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _rating_tokens(self) -> dict:
        """{i: token ids of the rating i as it follows the prompt} for i = 1..scale, all distinct."""
        prefix = self.prompt_text("q", "a")
        base = self._ids(prefix)

        def continuation(s):
            ids = self._ids(prefix + s)
            if ids[:len(base)] != base or len(ids) == len(base):
                raise ValueError(f"{self.name}: the tokenizer merges the rating {s!r} into the prompt")
            return ids[len(base):]
        ratings = {i: continuation(str(i)) for i in range(1, self.scale + 1)}
        if len({tuple(ids) for ids in ratings.values()}) != self.scale:
            raise ValueError(f"{self.name}: two ratings of 1..{self.scale} share their tokens")
        return ratings

    @torch.no_grad()
    def _rating_probs(self, id_lists):
        """(b, scale) float64 probabilities of the ratings 1..scale as the next token(s) after each prompt."""
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids, mask = (t.to(device) for t in pad_rows(id_lists, pad, side="left"))  # (b, T)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # pads do not shift positions
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                         use_cache=bool(self.inner), logits_to_keep=1)
        next_probs = {(): out.logits[:, -1].double().softmax(-1)}      # node -> (b, V)
        for n, node in enumerate(self.inner):  # one pass per inner node, on a copy of the prompt's cache
            cache = out.past_key_values if n == len(self.inner) - 1 else copy.deepcopy(out.past_key_values)
            ids = torch.tensor([node] * len(id_lists), device=device)  # (b, len(node))
            step = self.model(input_ids=ids, attention_mask=torch.cat([mask, torch.ones_like(ids)], 1),
                              position_ids=position_ids[:, -1:] + 1 + torch.arange(len(node), device=device),
                              past_key_values=cache, logits_to_keep=1)
            next_probs[node] = step.logits[:, -1].double().softmax(-1)
        columns = []
        for ids in self.rating_ids.values():
            p = torch.ones(len(id_lists), dtype=torch.float64, device=device)
            for j, token in enumerate(ids):
                p = p * next_probs[tuple(ids[:j])][:, token]
            if tuple(ids) in self.extensions:  # the mass of "the rating ends here"
                p = p * (1 - next_probs[tuple(ids)][:, self.extensions[tuple(ids)]].sum(-1))
            columns.append(p)
        return torch.stack(columns, dim=1)                             # (b, scale)

    def _score(self, items):
        out = []
        for start in range(0, len(items), self.batch_size):
            batch = items[start:start + self.batch_size]
            p = self._rating_probs([self._ids(self.prompt_text(it["prompt"], it["answer"])) for it in batch])
            ratings = torch.arange(1, self.scale + 1, dtype=p.dtype, device=p.device)
            mass = p.sum(-1)
            scores = (p * ratings).sum(-1) / mass                     # expected rating Σ p_i·i / Σ p_i
            self.stats["requests"] += len(batch)
            self.stats["rating_mass"] += float(mass.sum())
            out += [(float(s), None) for s in scores.tolist()]
        return out
