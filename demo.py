"""The built-in demo task: short questions with checkable answers, human answers flawed at a set rate.

Seven families of short questions with a canonical `answer` checked by `check_answer`: numbers -> the last
number in the response that is not also in the prompt must equal it (number words zero..twenty count,
thousands commas are dropped); "yes"/"no" -> the first yes/no word; anything else -> the answer appears as
a whole word/phrase, case- and accent-insensitive. Train and eval prompts are disjoint for every seed (a
prompt's split is a function of its text's hash); the records depend only on the seed. `data.load_prompts`
returns these records for `--data demo` (the default).

Where this departs from, or fills a gap in, the paper:
1. The paper trains on UltraChat-200k with GPT-4o-mini as judge; the demo task is a small synthetic
   stand-in with checkable answers so the whole loop runs offline. Its human answers are flawed at a set
   rate (default 0.3, the paper's ~30 % observation) in four ways: wrong value (40 %), refusal, off-topic,
   truncated before the answer (20 % each). The rule judge (judge.py) scores answers with `check_answer`.
"""
import hashlib
import random
import re
import unicodedata

NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())} | {"once": "1", "twice": "2", "thrice": "3"}
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


REFUSAL_RE = re.compile(r"\b(sorry|cannot|can't|can not|don't know|do not know|not able|unable|not sure|as an ai)\b")
STOPWORDS = set("the a an is are was of in on to and or what which how many much does do it its this that "
                "for with word letter write answer yes no there".split())


def grade_answer(response: str, answer: str, prompt: str = "") -> str:
    """"correct" (check_answer passes), "attempt" (on topic but wrong) or "none" (empty, a refusal, or
    off topic). An attempt gives an answer of the right kind (a number not copied from the prompt, a
    yes/no; for word answers, a content word shared with the prompt); a refusal never counts as one.
    The graded rule judge (judge.py) scores these 10 / 3 / 1."""
    if check_answer(response, answer, prompt):
        return "correct"
    text = _normalize_text(response)
    if not text.strip() or REFUSAL_RE.search(text.replace("\u2019", "'")):
        return "none"
    content = lambda t: {w for w in re.findall(r"[a-z]{3,}|\d+", t) if w not in STOPWORDS}  # noqa: E731
    on_topic = bool(content(text) & content(_normalize_text(prompt))) if prompt else True
    answer = _normalize_text(str(answer)).strip()
    if answer in ("yes", "no"):      # a yes/no or a new number is an attempt even without shared words
        return "attempt" if re.search(r"\b(yes|no)\b", text) else "none"
    if re.fullmatch(r"\d+(?:\.\d+)?", answer):
        in_prompt = set(_numbers(_normalize_text(prompt)))
        return "attempt" if any(n not in in_prompt for n in _numbers(text)) else "none"
    return "attempt" if on_topic else "none"


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
    verdict = lambda yes: f"{'Yes' if yes else 'No'}, {a} is {'larger' if yes else 'smaller'} than {b}."
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


def demo_id(prompt: str) -> str:
    """"demo-" and the prompt's stable hash, the same as data.prompt_id (this module imports nothing of the project)."""
    return "demo-" + hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:16]


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
    if cut == 0:                                                      # answer-first ("Yes, ..."): the verdict is lost
        rest = correct[len(answer):].lstrip(" ,.")
        return rest[:1].upper() + rest[1:]
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
        records.append({"id": demo_id(prompt), "prompt": prompt, "response": response,
                        "answer": answer, "family": family, "flawed": flawed, "flaw": flaw})
    if len(records) < n:
        raise ValueError(f"the demo {split} split has only {len(records)} distinct prompts, asked for {n}")
    return records
