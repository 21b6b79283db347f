"""Catastrophic forgetting, measured: general prompts the base model handles, scored before and after.

The retention set is written by us and built deterministically here (no data file, no download):
short questions with one short reference answer each, in nine families (arithmetic, capitals, opposites,
plurals, the day or month that follows, colours of familiar things, animal facts, counts, and
translations of everyday words). Two measurements per model:

- **reference NLL**: mean negative log-likelihood of the reference answers' tokens (as in training:
  the reply and its end-of-turn token) — a smooth signal that moves even when answers stay right;
- **exact answers**: a greedy answer is right when its first line names the reference as a whole word
  (number words and digits are the same). Forgetting is the share of the items the *base* model
  answers right that the tuned model now gets wrong; `promotion.max_forgetting` can block promotion on it.
"""

from __future__ import annotations

import random
import re

import pandas as pd

_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                 "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]

_CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "China": "Beijing",
    "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens", "Portugal": "Lisbon", "Ireland": "Dublin",
    "Austria": "Vienna", "Poland": "Warsaw", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Belgium": "Brussels", "the Netherlands": "Amsterdam", "Hungary": "Budapest",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Argentina": "Buenos Aires", "Peru": "Lima", "Chile": "Santiago",
    "Kenya": "Nairobi", "Thailand": "Bangkok", "South Korea": "Seoul", "India": "New Delhi", "Turkey": "Ankara",
    "Australia": "Canberra", "the United Kingdom": "London", "the United States": "Washington",
}
_OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "light": "dark", "open": "closed",
    "early": "late", "full": "empty", "hard": "soft", "rich": "poor", "old": "young", "strong": "weak",
    "wet": "dry", "high": "low", "long": "short", "thick": "thin", "loud": "quiet", "first": "last",
    "push": "pull", "win": "lose", "above": "below", "inside": "outside", "buy": "sell", "day": "night",
}
_PLURALS = {
    "cat": "cats", "dog": "dogs", "box": "boxes", "child": "children", "mouse": "mice", "man": "men",
    "woman": "women", "tooth": "teeth", "foot": "feet", "goose": "geese", "baby": "babies", "city": "cities",
    "knife": "knives", "leaf": "leaves", "bus": "buses", "church": "churches", "person": "people",
    "sheep": "sheep", "fish": "fish", "potato": "potatoes", "wolf": "wolves", "book": "books",
}
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_COLOURS = {
    "the sky on a clear day": "blue", "fresh grass": "green", "snow": "white", "a ripe banana": "yellow",
    "coal": "black", "a ripe tomato": "red", "an orange": "orange", "milk": "white", "a lemon": "yellow",
    "a strawberry": "red",
}
_ANIMALS = {
    "How many legs does a spider have?": "8", "How many legs does a dog have?": "4",
    "How many legs does a bird have?": "2", "How many legs does an insect have?": "6",
    "What sound does a cow make?": "moo", "What sound does a cat make?": "meow",
    "What sound does a dog make?": "woof", "Which animal is known as the king of the jungle?": "lion",
    "Which animal has a long trunk?": "elephant", "Which bird is a symbol of peace?": "dove",
    "What do bees make?": "honey", "What is a baby cat called?": "kitten", "What is a baby dog called?": "puppy",
}
_COUNTS = {
    "How many days are in a week?": "7", "How many months are in a year?": "12", "How many hours are in a day?": "24",
    "How many minutes are in an hour?": "60", "How many sides does a triangle have?": "3",
    "How many sides does a square have?": "4", "How many wheels does a bicycle have?": "2",
    "How many continents are there?": "7", "How many seconds are in a minute?": "60",
    "How many players are on a football (soccer) team on the field?": "11",
}
_TRANSLATIONS = {
    ("thank you", "French"): "merci", ("hello", "French"): "bonjour", ("cat", "French"): "chat",
    ("water", "French"): "eau", ("yes", "French"): "oui", ("thank you", "Spanish"): "gracias",
    ("hello", "Spanish"): "hola", ("water", "Spanish"): "agua", ("yes", "Spanish"): "si", ("dog", "Spanish"): "perro",
    ("house", "Spanish"): "casa", ("thank you", "German"): "danke", ("yes", "German"): "ja",
    ("water", "German"): "wasser", ("house", "German"): "haus",
}


def retention_set(n: int | None = None, seed: int = 0) -> pd.DataFrame:
    """The general prompts (columns prompt, response, family), in a fixed order; `n` takes a seeded,
    family-balanced subset."""
    rows: list[tuple[str, str, str]] = []
    rng = random.Random(1234)  # the set itself never changes with the caller's seed
    for _ in range(60):
        a, b = rng.randint(2, 50), rng.randint(2, 50)
        op = rng.choice(["+", "-", "x"])
        a, b = (b, a) if op == "-" and a < b else (a, b)
        value = a + b if op == "+" else (a - b if op == "-" else a * b)
        if op == "x":
            a, b = a % 12 + 1, b % 12 + 1
            value = a * b
        rows.append((f"What is {a} {op if op != 'x' else 'times'} {b}? Answer with the number only.", str(value), "arithmetic"))
    rows += [(f"What is the capital of {c}? Answer with the city name only.", city, "capitals") for c, city in _CAPITALS.items()]
    rows += [(f"What is the opposite of '{w}'? Answer with one word.", o, "opposites") for w, o in _OPPOSITES.items()]
    rows += [(f"What is the plural of '{w}'? Answer with one word.", p, "plurals") for w, p in _PLURALS.items()]
    rows += [(f"Which day of the week comes after {d}? Answer with one word.", _DAYS[(i + 1) % 7], "sequence")
             for i, d in enumerate(_DAYS)]
    rows += [(f"Which month comes after {m}? Answer with one word.", _MONTHS[(i + 1) % 12], "sequence")
             for i, m in enumerate(_MONTHS)]
    rows += [(f"What colour is {thing}? Answer with one word.", c, "colours") for thing, c in _COLOURS.items()]
    rows += [(q, a, "animals") for q, a in _ANIMALS.items()]
    rows += [(f"{q} Answer with the number only.", a, "counts") for q, a in _COUNTS.items()]
    rows += [(f"How do you say '{w}' in {lang}? Answer with one word.", t, "translation")
             for (w, lang), t in _TRANSLATIONS.items()]
    frame = pd.DataFrame(rows, columns=["prompt", "response", "family"])
    frame.insert(0, "example_id", [f"retention-{i:03d}" for i in range(len(frame))])
    frame["system"] = None
    if n is not None and n < len(frame):
        # round-robin over families in a seeded order, so a small subset still covers every family
        shuffled = frame.sample(frac=1.0, random_state=seed)
        shuffled["rank"] = shuffled.groupby("family").cumcount()
        frame = shuffled.sort_values(["rank", "family"]).head(n).drop(columns="rank").sort_values("example_id")
    return frame.reset_index(drop=True)


def _words(text: str) -> list[str]:
    words = re.findall(r"[a-z0-9]+", text.lower().replace("í", "i"))
    return [str(_NUMBER_WORDS.index(w)) if w in _NUMBER_WORDS else w for w in words]


def answer_is_right(generation: str, reference: str) -> bool:
    """The first line of the generation names the reference as a whole word (or word sequence)."""
    first_line = generation.strip().split("\n", 1)[0]
    said, wanted = _words(first_line), _words(reference)
    if not wanted:
        return False
    return any(said[i : i + len(wanted)] == wanted for i in range(len(said) - len(wanted) + 1))


def retention_summary(items: pd.DataFrame, outputs: dict[str, list[str]], nll: dict[str, float]) -> dict:
    """Per model: exact-answer accuracy and reference NLL; for every model but the base: the share of
    items the base answers right that it now gets wrong (`forgetting`) and its NLL change vs the base."""
    right = {name: [answer_is_right(g, r) for g, r in zip(gens, items["response"])] for name, gens in outputs.items()}
    base_right = right["base"]
    n_base_right = sum(base_right)
    summary: dict = {"n": len(items), "base_right": n_base_right, "models": {}}
    for name in outputs:
        entry = {"accuracy": sum(right[name]) / max(1, len(items)), "reference_nll": nll[name]}
        if name != "base":
            kept = sum(1 for b, m in zip(base_right, right[name]) if b and m)
            entry["forgetting"] = (1 - kept / n_base_right) if n_base_right else 0.0
            entry["nll_change"] = nll[name] - nll["base"]
        summary["models"][name] = entry
    by_family = pd.DataFrame({name: right[name] for name in outputs}).groupby(items["family"].to_numpy()).mean()
    summary["by_family"] = {fam: {k: round(float(v), 4) for k, v in row.items()} for fam, row in by_family.iterrows()}
    return summary


_LETTER_WORDS = ["apple", "banana", "cherry", "garden", "window", "pencil", "rabbit", "orange", "yellow", "kitchen",
                 "mountain", "river", "planet", "island", "forest", "castle", "bridge", "candle", "ladder", "marble",
                 "violin", "tiger", "zebra", "umbrella", "notebook", "helmet", "jacket", "lemon", "dragon", "pillow"]


def replay_set(n: int | None = None, seed: int = 0) -> pd.DataFrame:
    """General prompts with reference answers for replay and distillation (columns as `retention_set`).

    Written for training, never scored: no prompt of `retention_set` is in it (other numbers, and the
    families ask the other way round: the day *before*, the smaller number, a word's first letter), so
    training on it cannot inflate the retention evaluation by memorising its items.
    """
    scored = set(retention_set()["prompt"])
    rows: list[tuple[str, str, str]] = []
    rng = random.Random(98765)
    while len(rows) < 120:
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        op = rng.choice(["+", "-"])
        a, b = (b, a) if op == "-" and a < b else (a, b)
        prompt = f"What is {a} {'plus' if op == '+' else 'minus'} {b}? Reply with the number only."
        if prompt not in scored and prompt not in {r[0] for r in rows}:
            rows.append((prompt, str(a + b if op == "+" else a - b), "arithmetic"))
    for _ in range(60):
        a, b = rng.sample(range(1, 200), 2)
        rows.append((f"Which number is smaller, {a} or {b}? Reply with the number only.", str(min(a, b)), "comparison"))
    rows += [(f"Which day of the week comes before {d}? Reply with one word.", _DAYS[(i - 1) % 7], "sequence")
             for i, d in enumerate(_DAYS)]
    rows += [(f"Which month comes before {m}? Reply with one word.", _MONTHS[(i - 1) % 12], "sequence")
             for i, m in enumerate(_MONTHS)]
    rows += [(f"What is the first letter of the word '{w}'? Reply with the letter only.", w[0], "spelling")
             for w in _LETTER_WORDS]
    rows += [(f"What is the singular of '{p}'? Reply with one word.", w, "plurals") for w, p in _PLURALS.items() if w != p]
    frame = pd.DataFrame(rows, columns=["prompt", "response", "family"])
    frame.insert(0, "example_id", [f"replay-{i:03d}" for i in range(len(frame))])
    frame["system"] = None
    if n is not None and n < len(frame):
        frame = frame.sample(n=n, random_state=seed).sort_values("example_id")
    return frame.reset_index(drop=True)
