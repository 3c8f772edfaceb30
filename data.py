"""Datasets, the built-in demo task, chat-template tokenization, collation and DSL pairing.

Record formats read by `load_records` (JSONL, or parquet when pyarrow is installed), one object per line:
  plain      {"id"?, "prompt", "response", "answer"?}
  UltraChat  {"prompt_id"?, "messages": [{"role", "content"}, ...]}   first user turn / first assistant turn after it
  SPIN       {"real": [user msg, assistant msg], "generated": [...]}  the "generated" side is ignored (we regenerate)
all normalised to {"id", "prompt", "response", ["answer", "family", "flawed", "flaw"]}; a missing id is
`prompt_id(prompt)`, a stable hash.

Demo task (`demo_records`): seven families of short questions with a canonical `answer` checked by
`check_answer`: numbers -> the last number in the response that is not also in the prompt must equal it
(number words zero..twenty count, thousands commas are dropped); "yes"/"no" -> the first yes/no word;
anything else -> the answer appears as a whole word/phrase, case- and accent-insensitive.

Where this departs from, or fills a gap in, the paper:
1. The paper trains on UltraChat-200k with GPT-4o-mini as judge; the demo task is a small synthetic
   stand-in with checkable answers so the whole loop runs offline. Its human answers are flawed at a set
   rate (default 0.3, the paper's ~30 % observation) in four ways: wrong value (40 %), refusal, off-topic,
   truncated before the answer (20 % each).
2. Truncation (paper: max length 1024, max prompt length 512; the rule is TRL/SPIN's): when prompt + the
   longer answer exceed max_length, the prompt keeps its LAST max_prompt_length tokens (the generation
   prompt stays), then each answer keeps its FIRST max_length - len(prompt) tokens (EOS may be cut).
3. DSL tie rule: equal scores keep the human answer chosen (SPIN's pairing, the paper's baseline); a record
   with a missing score keeps SPIN's pairing and is counted; a record whose generated answer equals the
   human answer (after stripping whitespace) is dropped and counted: its margin is 0 whatever θ is, so it
   carries no preference.
4. α-SPIN history (`history_pairs`) concatenates the pairs of the last h iterations unchanged.
"""
import hashlib
import json
import os
import pathlib
import random
import re
import sys
import tempfile
import unicodedata

import torch

# --- JSONL ------------------------------------------------------------------------------------------


def read_jsonl(path) -> list[dict]:
    """All objects of a JSONL file (blank lines skipped); ValueError "file:line: reason" on a bad line."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                records.append(_parse_line(path, lineno, line))
    return records


def _parse_line(path, lineno, line) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    return obj


def write_jsonl(path, records) -> None:
    """Write records as JSONL atomically (tmp file in the same directory, then os.replace)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def append_jsonl(fh, record) -> None:
    """Append one record as a line and flush, so a crash loses at most the line being written."""
    fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    fh.flush()


def prompt_id(prompt: str) -> str:
    """Stable id of a prompt: the first 16 hex digits of its SHA-1."""
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:16]


# --- dataset formats --------------------------------------------------------------------------------

PASS_THROUGH = ("answer", "family", "flawed", "flaw")


def _first_turns(messages):
    """(first user content, first assistant content after it) of a chat message list."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError("messages must be a list of {role, content} objects")
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise ValueError("no user turn in messages")
    replies = [m for m in messages[users[0] + 1:] if m.get("role") == "assistant"]
    if not replies:
        raise ValueError("no assistant turn after the first user turn")
    return messages[users[0]].get("content"), replies[0].get("content")


def normalize_record(obj: dict) -> dict:
    """One input object in any supported format -> {"id","prompt","response",...}; ValueError on a bad one."""
    if "messages" in obj:
        prompt, response = _first_turns(obj["messages"])
        rid = obj.get("prompt_id", obj.get("id"))
    elif "real" in obj:
        prompt, response = _first_turns(obj["real"])
        rid = obj.get("id")
    elif "prompt" in obj:
        if "response" not in obj:
            raise ValueError("missing field 'response'")
        prompt, response, rid = obj["prompt"], obj["response"], obj.get("id")
    else:
        raise ValueError("unknown format: expected 'prompt'+'response', 'messages' (UltraChat) or 'real' (SPIN)")
    for name, value in (("prompt", prompt), ("response", response)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"empty or non-string {name}")
    record = {"id": str(rid) if rid is not None else prompt_id(prompt), "prompt": prompt, "response": response}
    record.update({k: obj[k] for k in PASS_THROUGH if k in obj})
    return record


def _raw_rows(path):
    """(line number, object or error) for JSONL; (row number, object) for parquet."""
    if str(path).endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        yield from enumerate(pq.read_table(path).to_pylist(), 1)
        return
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield lineno, _parse_line(path, lineno, line)
                except ValueError as e:
                    yield lineno, e


def load_records(path, skip_bad=False, return_skipped=False):
    """Normalised records of a dataset file. A bad line raises ValueError("file:line: reason"), or with
    skip_bad is skipped and counted (warning on stderr; (records, skipped) when return_skipped)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    records, seen, skipped = [], set(), 0
    for lineno, obj in _raw_rows(path):
        try:
            if isinstance(obj, Exception):
                raise obj
            record = normalize_record(obj)
            if record["id"] in seen:
                raise ValueError(f"duplicate id {record['id']!r}")
        except ValueError as e:
            message = str(e) if str(e).startswith(f"{path}:") else f"{path}:{lineno}: {e}"
            if not skip_bad:
                raise ValueError(message) from None
            skipped += 1
            continue
        seen.add(record["id"])
        records.append(record)
    if skipped:
        print(f"{path}: skipped {skipped} bad line(s)", file=sys.stderr)
    if not records:
        raise ValueError(f"{path}: no usable records")
    return (records, skipped) if return_skipped else records


# --- the demo task: answers and the rule that checks them --------------------------------------------

NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
_NUMBER_WORD_RE = re.compile(r"\b(" + "|".join(NUMBER_WORDS) + r")\b")


def _normalize_text(text: str) -> str:
    text = unicodedata.normalize("NFKD", text or "").encode("ascii", "ignore").decode().lower()
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)                 # 3,000 -> 3000
    return _NUMBER_WORD_RE.sub(lambda m: NUMBER_WORDS[m.group(1)], text)


def _numbers(text: str) -> list[float]:
    return [float(n) for n in re.findall(r"\d+(?:\.\d+)?", text)]


def check_answer(response: str, answer: str, prompt: str = "") -> bool:
    """True if `response` gives the canonical `answer` (rule in the module docstring). Pass the prompt so
    numbers copied from the question are ignored ("7 + 5 = 12": 12 counts, not 5)."""
    text, answer = _normalize_text(response), _normalize_text(str(answer)).strip()
    if answer in ("yes", "no"):
        found = re.findall(r"\b(yes|no)\b", text)
        return bool(found) and found[0] == answer
    if re.fullmatch(r"\d+(?:\.\d+)?", answer):
        in_prompt = set(_numbers(_normalize_text(prompt)))
        found = [n for n in _numbers(text) if n not in in_prompt]
        return bool(found) and found[-1] == float(answer)
    return re.search(r"(?<![a-z0-9])" + re.escape(answer) + r"(?![a-z0-9])", text) is not None


# --- the demo task: families ----------------------------------------------------------------------
# Each family maps an rng to (prompt, answer, correct human answer, wrong human answer).

WORDS = ("strawberry banana letter apple coffee balloon bookkeeper committee success pepper rabbit butter "
         "cherry summer yellow dinner puppy tomato potato giraffe elephant umbrella kitten hello little "
         "bubble cookie grass glass address parallel possession engineer referee teeth cucumber pineapple "
         "mammal llama spoon moon door floor street green queen sheep three cheese needle window garden "
         "orange purple school pizza jazz happy zebra river paper sister mirror carrot tunnel channel pillow "
         "cabbage lemon melon monkey donkey turtle planet rocket silver winter spring autumn bridge castle "
         "forest island desert valley candle pencil basket bottle button jacket ladder marble muffin napkin "
         "tennis violin wallet yogurt").split()
SHORT_WORDS = ("cat dog sun map pen cup box hat bird fish star tree book lamp frog milk rain snow wind door "
               "ship coin desk road rock leaf moon ring bell king gold salt corn bean nest wolf bear lion "
               "duck goat fire sand time word game note hand song wave cake plan stone cloud horse table "
               "chair bread light plant water grape").split()
UNITS = [("meters", "kilometers", 1000), ("centimeters", "meters", 100), ("minutes", "hours", 60),
         ("seconds", "minutes", 60), ("days", "weeks", 7), ("hours", "days", 24), ("grams", "kilograms", 1000),
         ("months", "years", 12), ("inches", "feet", 12), ("millimeters", "centimeters", 10)]
CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Canada": "Ottawa", "Australia": "Canberra",
            "Greece": "Athens", "Portugal": "Lisbon", "Norway": "Oslo", "Sweden": "Stockholm", "Kenya": "Nairobi",
            "Peru": "Lima", "Poland": "Warsaw", "Austria": "Vienna", "Ireland": "Dublin", "Turkey": "Ankara",
            "Argentina": "Buenos Aires", "India": "New Delhi", "Thailand": "Bangkok", "Cuba": "Havana",
            "Finland": "Helsinki", "Denmark": "Copenhagen", "Hungary": "Budapest", "Chile": "Santiago",
            "South Korea": "Seoul", "Belgium": "Brussels", "Netherlands": "Amsterdam", "Switzerland": "Bern",
            "Iran": "Tehran", "Vietnam": "Hanoi", "Colombia": "Bogota", "Morocco": "Rabat"}
COUNTS = {"legs does a spider have": 8, "legs does an insect have": 6, "legs does a dog have": 4,
          "legs does a bird have": 2, "arms does an octopus have": 8, "sides does a triangle have": 3,
          "sides does a hexagon have": 6, "sides does a pentagon have": 5, "sides does an octagon have": 8,
          "days are in a week": 7, "continents are there on Earth": 7, "months are in a year": 12,
          "hours are in a day": 24, "players are on a soccer team on the field": 11, "planets are in the solar system": 8}
OPPOSITES = {"hot": "cold", "up": "down", "big": "small", "fast": "slow", "happy": "sad", "light": "dark",
             "early": "late", "open": "closed", "full": "empty", "old": "young", "wet": "dry", "hard": "soft",
             "rich": "poor", "strong": "weak", "high": "low", "loud": "quiet", "left": "right", "win": "lose"}
REFUSALS = ["I'm sorry, but I can't help with that.", "I don't know the answer to that.",
            "As an AI, I am not able to answer this question.", "Sorry, I cannot answer that."]
OFF_TOPIC = ["Photosynthesis is how plants turn sunlight into chemical energy.",
             "The Great Wall is a famous landmark that attracts many tourists.",
             "Drinking enough water every day is good for your health.",
             "Learning a new language takes practice and patience.",
             "Jazz music grew out of blues and ragtime traditions."]


def _arithmetic(rng):
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(3, 19), rng.randint(3, 19)
        answer = a * b
    else:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
        answer = a + b if op == "+" else a - b
    if answer in (a, b):
        return None
    delta = rng.choice([-10, -2, -1, 1, 2, 10])
    wrong = answer + delta if answer + delta >= 0 else answer - delta
    sym = {"*": "×", "+": "+", "-": "-"}[op]
    return (f"What is {a} {'times' if op == '*' else op} {b}?", str(answer),
            f"{a} {sym} {b} = {answer}.", f"{a} {sym} {b} = {wrong}.")


def _comparison(rng):
    a, b = rng.sample(range(10, 1000), 2)
    bigger = a > b
    verdict = lambda yes: f"{a} is {'larger' if yes else 'smaller'} than {b}, so the answer is {'yes' if yes else 'no'}."
    return (f"Is {a} larger than {b}? Answer yes or no.", "yes" if bigger else "no", verdict(bigger), verdict(not bigger))


def _counting(rng):
    word = rng.choice(WORDS)
    letter = rng.choice(sorted(set(word)))
    n = word.count(letter)
    wrong = n + 1 if n == 1 or rng.random() < 0.5 else n - 1
    times = lambda k: "1 time" if k == 1 else f"{k} times"
    return (f"How many times does the letter '{letter}' appear in the word '{word}'?", str(n),
            f"The letter '{letter}' appears {times(n)} in '{word}'.", f"The letter '{letter}' appears {times(wrong)} in '{word}'.")


def _reversal(rng):
    word = rng.choice(SHORT_WORDS)
    answer = word[::-1]
    if answer == word:
        return None
    wrong = answer[1] + answer[0] + answer[2:]            # a realistic slip: first two letters swapped
    wrong = word if wrong == answer else wrong            # ... or the word not reversed at all
    return (f"Write the word '{word}' backwards.", answer, f"'{word}' backwards is '{answer}'.", f"'{word}' backwards is '{wrong}'.")


def _units(rng):
    small, big, factor = rng.choice(UNITS)
    q = rng.randint(2, 30)
    answer = q * factor
    if answer == q:
        return None
    wrong = q * (factor // 10 if factor >= 100 else factor + 10)
    return (f"How many {small} are in {q} {big}?", str(answer), f"{q} {big} is {answer} {small}.", f"{q} {big} is {wrong} {small}.")


def _fact(rng):
    kind = rng.choice(["capital", "count", "opposite"])
    if kind == "capital":
        country = rng.choice(sorted(CAPITALS))
        city = CAPITALS[country]
        other = rng.choice([c for c in sorted(CAPITALS.values()) if c != city])
        return (f"What is the capital of {country}?", city.lower(), f"The capital of {country} is {city}.",
                f"The capital of {country} is {other}.")
    if kind == "count":
        what = rng.choice(sorted(COUNTS))
        n = COUNTS[what]
        return (f"How many {what}?", str(n), f"There are {n}.", f"There are {n + rng.choice([-2, -1, 1, 2])}.")
    word = rng.choice(sorted(OPPOSITES))
    other = rng.choice([o for o in sorted(OPPOSITES.values()) if o != OPPOSITES[word]])
    return (f"What is the opposite of '{word}'?", OPPOSITES[word], f"The opposite of '{word}' is '{OPPOSITES[word]}'.",
            f"The opposite of '{word}' is '{other}'.")


def _sequence(rng):
    start, step = rng.randint(1, 40), rng.randint(2, 12)
    terms = [start + i * step for i in range(4)]
    answer = start + 4 * step
    return (f"What number comes next: {', '.join(map(str, terms))}, ...?", str(answer),
            f"The next number is {answer}.", f"The next number is {answer + rng.choice([-1, 1, step])}.")


FAMILIES = {"arithmetic": _arithmetic, "comparison": _comparison, "counting": _counting, "reversal": _reversal,
            "units": _units, "facts": _fact, "sequence": _sequence}
FLAW_KINDS = ["wrong_value"] * 2 + ["refusal", "off_topic", "truncated"]   # wrong value 40 %, others 20 %
EVAL_PERCENT = 20      # a prompt belongs to the eval split iff its hash bucket (0..99) is below this
DEMO_SIZES = {"train": 2000, "eval": 200}


def demo_split(prompt: str) -> str:
    """"eval" or "train", a pure function of the prompt text: the splits are disjoint for every seed."""
    return "eval" if int(hashlib.sha1(b"split:" + prompt.encode()).hexdigest()[:8], 16) % 100 < EVAL_PERCENT else "train"


def _flawed_text(kind, rng, answer, correct, wrong):
    if kind == "wrong_value":
        return wrong
    if kind == "refusal":
        return rng.choice(REFUSALS)
    if kind == "off_topic":
        return rng.choice(OFF_TOPIC)
    cut = correct.lower().rfind(answer.lower())                       # truncated just before the answer
    return correct[:cut].rstrip(" '\"")


def demo_records(split="train", n=None, seed=0, flaw_rate=0.3) -> list[dict]:
    """The demo task: n records {"id","prompt","response","answer","family","flawed","flaw"}.
    Deterministic for (split, seed, flaw_rate); the first k of n records equal demo_records(n=k)."""
    if split not in DEMO_SIZES:
        raise ValueError(f"demo split must be 'train' or 'eval', got {split!r}")
    if not 0.0 <= flaw_rate <= 1.0:
        raise ValueError(f"flaw rate must be in [0, 1], got {flaw_rate}")
    n = DEMO_SIZES[split] if n is None else n
    rng = random.Random(f"dnpo-demo:{split}:{seed}")
    families, records, seen = list(FAMILIES), [], set()
    misses = dict.fromkeys(families, 0)
    while len(records) < n and families:
        family = families[len(records) % len(families)]
        item = FAMILIES[family](rng)
        if item is None or item[0] in seen or demo_split(item[0]) != split:
            misses[family] += 1
            if misses[family] > 2000:               # a family with a finite pool ran dry
                families.remove(family)
            continue
        misses[family] = 0
        prompt, answer, correct, wrong = item
        seen.add(prompt)
        flawed = rng.random() < flaw_rate
        flaw = rng.choice(FLAW_KINDS) if flawed else None
        response = _flawed_text(flaw, rng, answer, correct, wrong) if flawed else correct
        assert check_answer(response, answer, prompt) != flawed, (prompt, response, answer)
        records.append({"id": f"demo-{prompt_id(prompt)}", "prompt": prompt, "response": response,
                        "answer": answer, "family": family, "flawed": flawed, "flaw": flaw})
    if len(records) < n:
        raise ValueError(f"the demo {split} split has only {len(records)} distinct prompts, asked for {n}")
    return records


def load_prompts(data=None, split="train", max_prompts=None, seed=0, flaw_rate=0.3, skip_bad=False) -> list[dict]:
    """Records to train or evaluate on: the demo task when data is None/"demo" (default sizes: train 2000,
    eval 200), else a dataset file; max_prompts keeps a deterministic prefix (None = all / the default)."""
    if data in (None, "demo"):
        return demo_records(split, n=max_prompts, seed=seed, flaw_rate=flaw_rate)
    records = load_records(data, skip_bad=skip_bad)
    return records if max_prompts is None else records[:max_prompts]


# --- DSL pairing and history ---------------------------------------------------------------------------


def dsl_pairs(judged: list[dict], dsl: bool):
    """Pairs from judged rows: DSL puts the higher-scored answer chosen (ties and missing scores keep the
    human answer chosen, identical answers are dropped); dsl=False always keeps the human chosen.
    Returns (pairs, stats(n, flips, ties, missing, identical))."""
    pairs, stats = [], dict(n=len(judged), flips=0, ties=0, missing=0, identical=0)
    for row in judged:
        for key in ("id", "prompt", "human", "generated"):
            if key not in row:
                raise ValueError(f"record {row.get('id', '?')}: judged row is missing {key!r}")
        human, generated = row["human"], row["generated"]
        if human.strip() == generated.strip():
            stats["identical"] += 1
            continue
        hs, gs = row.get("human_score"), row.get("generated_score")
        flip = False
        if dsl:
            if hs is None or gs is None:
                stats["missing"] += 1
            elif gs > hs:
                flip = True
                stats["flips"] += 1
            elif gs == hs:
                stats["ties"] += 1
        pairs.append({"id": row["id"], "prompt": row["prompt"],
                      "chosen": generated if flip else human, "rejected": human if flip else generated,
                      "chosen_source": "generated" if flip else "human"})
    return pairs, stats


def history_pairs(run_dir, k, h) -> list[dict]:
    """α-SPIN mixing: iter{j}/pairs.jsonl for j = max(0, k-h+1) .. k, concatenated, each pair tagged "iter": j."""
    if h < 1:
        raise ValueError(f"history must be >= 1 iteration, got {h}")
    pairs = []
    for j in range(max(0, k - h + 1), k + 1):
        path = pathlib.Path(run_dir) / f"iter{j}" / "pairs.jsonl"
        if not path.is_file():
            raise ValueError(f"{path}: missing (history {h} needs iterations {max(0, k - h + 1)}..{k})")
        pairs.extend({**p, "iter": j} for p in read_jsonl(path))
    return pairs


# --- tokenization and collation ------------------------------------------------------------------------


def tokenize_pair(tokenizer, pair, max_length=1024, max_prompt_length=512) -> dict:
    """Chat-template token ids and labels (-100 on the prompt) of a pair's chosen and rejected sequences,
    truncated by the rule in the module docstring (item 2)."""
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length ({max_prompt_length}) < max_length ({max_length})")
    prompt_ids = list(tokenizer.apply_chat_template([{"role": "user", "content": pair["prompt"]}],
                                                    add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"])
    eos = tokenizer.eos_token_id
    answers = {side: tokenizer(pair[side], add_special_tokens=False)["input_ids"] + [eos]
               for side in ("chosen", "rejected")}
    if len(prompt_ids) + max(map(len, answers.values())) > max_length:
        prompt_ids = prompt_ids[-max_prompt_length:]                  # keep the end: the generation prompt
        answers = {side: ids[:max_length - len(prompt_ids)] for side, ids in answers.items()}
    out = {}
    for side, ids in answers.items():
        out[f"{side}_input_ids"] = prompt_ids + ids
        out[f"{side}_labels"] = [-100] * len(prompt_ids) + ids
    return out


def collate_pairs(examples, pad_token_id) -> dict:
    """Stack B tokenized pairs into 2B right-padded rows (chosen rows 0..B-1, rejected rows B..2B-1)."""
    rows = [(e["chosen_input_ids"], e["chosen_labels"]) for e in examples]
    rows += [(e["rejected_input_ids"], e["rejected_labels"]) for e in examples]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)     # (2B, T)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)                # (2B, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)             # (2B, T)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[i, :len(lab)] = torch.tensor(lab, dtype=torch.long)
        attention_mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
