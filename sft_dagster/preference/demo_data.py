"""The preference demo data set: short questions, candidate replies and rankings, all written by us.

Questions have one right answer each (sums, products, unit conversions, capitals, colour mixing), so
a rule can be checked by code. Each question gets K candidate replies in different styles (correct
and concise, correct but long-winded, hedging, wrong). A simulated annotator ranks them by a stated
rule, with stated noise:

    RULE: a good reply is correct, does not hedge, and is concise (at most 12 words).
    The annotator orders replies by (correct, no hedging, concise, fewer words); with probability
    `noise` a ranking has one random adjacent pair swapped (a mistake).

A second annotator ranks an overlapping share of the prompts (so agreement can be measured) and the
first re-ranks a few (so self-consistency can be measured), each with the same noise. Everything is
deterministic for a seed. `rule_checks`/`satisfies_rule` are the rule as code, for measuring how
often a policy's free-form replies satisfy it. The default size (60 prompts x 4 candidates, 400-odd
pairs of about 40 tokens) is chosen to keep a reward model, DPO and PPO on SmolLM2-135M on CPU
within minutes each.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pandas as pd

from .. import atomic
from .columns import CANDIDATE_COLUMNS, candidate_id_of, prompt_id_of
from .rankings import RANKING_FIELDS

RULE = ("A good reply is correct (it states the right answer and no other), does not hedge, and is concise "
        "(at most 12 words).")
MAX_WORDS = 12
HEDGES = ("i think", "maybe", "might", "probably", "not sure", "i believe", "perhaps", "possibly", "could be",
          "i guess", "not certain")
STYLES = ("concise_correct", "verbose_correct", "hedged_correct", "concise_wrong", "hedged_wrong", "verbose_wrong")
# The SFT writer: the replies the model imitates before any feedback (`sft.jsonl`). It hedges or explains
# at length most of the time, which the annotator's rule then corrects. Measured: with SFT on the ranked
# candidates themselves (a third of them concise), the SFT model's sampled replies to the held-out
# questions were 93% unhedged and concise (8 samples of 13 prompts at temperature 0.8, BENCHMARKS.md),
# leaving preference tuning nothing of the style to fix.
SFT_STYLE_WEIGHTS = {"concise_correct": 0.1, "verbose_correct": 0.35, "hedged_correct": 0.35, "concise_wrong": 0.0,
                     "hedged_wrong": 0.1, "verbose_wrong": 0.1}

CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
            "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
            "Poland": "Warsaw", "Greece": "Athens", "Portugal": "Lisbon", "Ireland": "Dublin", "Austria": "Vienna"}
MIXES = {("blue", "yellow"): "green", ("red", "yellow"): "orange", ("red", "blue"): "purple",
         ("red", "white"): "pink", ("black", "white"): "grey"}
CONVERSIONS = [("minutes", "hours", 60), ("days", "weeks", 7), ("centimetres", "metres", 100),
               ("months", "years", 12), ("seconds", "minutes", 60), ("grams", "kilograms", 1000)]
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _question(rng: random.Random, kind: str) -> dict:
    if kind == "sum":
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        return {"prompt": f"What is {a} + {b}?", "answer": str(a + b), "allowed": [a, b]}
    if kind == "product":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return {"prompt": f"What is {a} times {b}?", "answer": str(a * b), "allowed": [a, b]}
    if kind == "conversion":
        small, big, factor = rng.choice(CONVERSIONS)
        n = rng.randint(2, 9)
        return {"prompt": f"How many {small} are in {n} {big}?", "answer": str(n * factor), "allowed": [n, factor],
                "unit": small}
    if kind == "capital":
        country = rng.choice(sorted(CAPITALS))
        return {"prompt": f"What is the capital of {country}?", "answer": CAPITALS[country], "allowed": []}
    (a, b), colour = rng.choice(sorted(MIXES.items()))
    a, b = (a, b) if rng.random() < 0.5 else (b, a)
    return {"prompt": f"Which colour do you get by mixing {a} and {b} paint?", "answer": colour, "allowed": []}


KINDS = ("sum", "product", "conversion", "capital", "colour")


def _wrong(rng: random.Random, q: dict) -> str:
    if q["kind"] == "capital":
        return rng.choice(sorted(set(CAPITALS.values()) - {q["answer"]}))
    if q["kind"] == "colour":
        return rng.choice(sorted(set(MIXES.values()) - {q["answer"]}))
    return str(int(q["answer"]) + rng.choice([-10, -2, -1, 1, 2, 10]))


def _reply(rng: random.Random, q: dict, style: str) -> str:
    value = q["answer"] if style.endswith("correct") else _wrong(rng, q)
    unit = f" {q['unit']}" if q.get("unit") else ""
    if style.startswith("concise"):
        return rng.choice([f"{value}{unit}.", f"It is {value}{unit}.", f"The answer is {value}{unit}."])
    if style.startswith("hedged"):
        return rng.choice([f"I think it might be {value}{unit}, but I am not completely sure.",
                           f"It is probably {value}{unit}.", f"Maybe {value}{unit}? I could be wrong."])
    explanation = {  # 16-21 words in all: well over the rule's 12, a third of the tokens of the first version
        "capital": "The government has sat in this city for a long time",
        "colour": "The two pigments combine into this colour",
    }.get(q["kind"], "You can check it step by step on paper")
    return f"{value}{unit}. {explanation}, so the answer is {value}{unit}."


def rule_checks(reply: str, answer: str, allowed_numbers=()) -> dict[str, bool]:
    """The rule as code, for any reply (the demo's candidates or a policy's generations).

    correct: the answer is stated and no other answer is: for a number, the reply's numbers other
    than those of the question (`allowed_numbers`) are exactly the answer; for a word (a capital, a
    colour), the answer appears as a word and no other capital or colour of the demo does.
    """
    text = str(reply)
    lower = text.lower()
    if _NUMBER.fullmatch(str(answer)):
        allowed = {float(n) for n in allowed_numbers}
        numbers = {float(n) for n in _NUMBER.findall(text)} - allowed
        correct = numbers == {float(answer)}
    else:
        words = set(re.findall(r"[a-z]+", lower))
        options = {v.lower() for v in CAPITALS.values()} | set(MIXES.values())
        correct = answer.lower() in words and not (words & (options - {answer.lower()}))
    hedging = any(re.search(rf"\b{re.escape(h)}\b", lower) for h in HEDGES)
    return {"correct": bool(correct), "no_hedging": not hedging, "concise": len(text.split()) <= MAX_WORDS}


def satisfies_rule(reply: str, answer: str, allowed_numbers=()) -> bool:
    return all(rule_checks(reply, answer, allowed_numbers).values())


RULE_PARTS = ("satisfied", "style", "correct", "no_hedging", "concise")


def rule_parts(reply: str, answer: str, allowed_numbers=()) -> dict[str, bool]:
    """`rule_checks` plus `style` (no hedging and concise: the part a reply's form decides) and
    `satisfied` (the whole rule), so a report can say whether the style or the correctness moved."""
    c = rule_checks(reply, answer, allowed_numbers)
    return {"satisfied": all(c.values()), "style": c["no_hedging"] and c["concise"], **c}


def rule_satisfaction(prompts: pd.DataFrame, replies: list[str]) -> dict:
    """Share of replies that satisfy the rule, and of each part (`RULE_PARTS`), for rows of the demo's
    prompts.jsonl (`answer`, `allowed_numbers`) and one reply per row."""
    checks = [rule_parts(r, str(a), allowed) for r, a, allowed in
              zip(replies, prompts["answer"], prompts["allowed_numbers"])]
    n = max(1, len(checks))
    return {"n": len(checks), **{part: sum(c[part] for c in checks) / n for part in RULE_PARTS}}


def annotator_key(reply: str, answer: str, allowed_numbers=()) -> tuple:
    """The annotator's order, best first: correct, then no hedging, then concise, then fewer words."""
    c = rule_checks(reply, answer, allowed_numbers)
    return (not c["correct"], not c["no_hedging"], not c["concise"], len(str(reply).split()))


def _ranking(rng: random.Random, candidates: list[dict], q: dict, noise: float) -> tuple[list[list[str]], bool]:
    ordered = sorted(candidates, key=lambda c: (annotator_key(c["response"], q["answer"], q["allowed"]), c["candidate_id"]))
    ids = [c["candidate_id"] for c in ordered]
    noisy = rng.random() < noise
    if noisy:
        i = rng.randrange(len(ids) - 1)
        ids[i], ids[i + 1] = ids[i + 1], ids[i]
    return [[i] for i in ids], noisy


def _sft_replies(seed: int, questions: list[dict], per_prompt: int, weights: dict[str, float]) -> list[dict]:
    """`per_prompt` replies of distinct styles per question, styles drawn without replacement with `weights`
    (from their own random stream: the other files do not depend on the SFT writer)."""
    rng = random.Random(f"sft:{seed}")
    rows = []
    for q in questions:
        left = {style: w for style, w in weights.items() if w > 0}
        for _ in range(min(per_prompt, len(left))):
            style = rng.choices(list(left), weights=list(left.values()))[0]
            del left[style]
            rows.append({"prompt": q["prompt"], "response": _reply(rng, q, style), "style": style,
                         "prompt_id": q["prompt_id"]})
    return rows


def generate_preference_demo(out_dir: str | Path, n_prompts: int = 60, k: int = 4, seed: int = 0, noise: float = 0.1,
                             second_annotator_share: float = 0.3, repeat_share: float = 0.1, sft_per_prompt: int = 3,
                             sft_style_weights: dict[str, float] | None = None) -> dict:
    """Write prompts.jsonl, sft.jsonl (the SFT writer's replies), candidates.jsonl, rankings.jsonl,
    preferences.jsonl (an import-style file with a few broken rows) and truth/manifest.json to `out_dir`;
    returns the manifest."""
    if not 2 <= k <= len(STYLES):
        raise ValueError(f"k must be between 2 and {len(STYLES)}")
    weights = SFT_STYLE_WEIGHTS if sft_style_weights is None else sft_style_weights
    if set(weights) - set(STYLES):
        raise ValueError(f"sft_style_weights: unknown styles {sorted(set(weights) - set(STYLES))}; styles are {STYLES}")
    rng = random.Random(seed)
    out = Path(out_dir)
    questions: list[dict] = []
    seen: set[str] = set()
    kinds = list(KINDS)  # in turn; a kind whose questions run out (capitals, colours) leaves the rotation
    while len(questions) < n_prompts:
        if not kinds:
            raise ValueError(f"the demo has fewer than {n_prompts} distinct questions")
        kind = kinds[len(questions) % len(kinds)]
        for _ in range(200):
            q = _question(rng, kind) | {"kind": kind}
            if q["prompt"] not in seen:
                seen.add(q["prompt"])
                questions.append(q)
                break
        else:
            kinds.remove(kind)

    candidates, rankings, noisy_ids = [], [], []
    minute = 0

    def stamp() -> str:
        nonlocal minute
        minute += 1
        return f"2026-11-24T{9 + minute // 60:02d}:{minute % 60:02d}:00+00:00"

    for q in questions:
        q["prompt_id"] = prompt_id_of(q["prompt"])
        rows, texts = [], set()
        for index, style in enumerate(rng.sample(STYLES, k)):
            text = _reply(rng, q, style)
            while text in texts:
                text = _reply(rng, q, style)
            texts.add(text)
            rows.append({"prompt_id": q["prompt_id"], "candidate_id": candidate_id_of(q["prompt_id"], text),
                         "prompt": q["prompt"], "system": None, "history": None, "response": text,
                         "sample_index": index, "finished": True, "n_response_tokens": None,
                         "model": f"demo-writer:{style}", "seed": seed, "temperature": None, "top_p": None,
                         "max_new_tokens": None})
        candidates += rows
        judges = ["sim-a"] + (["sim-b"] if rng.random() < second_annotator_share else [])
        judges += ["sim-a"] if rng.random() < repeat_share else []
        for author in judges:
            tiers, noisy = _ranking(rng, rows, q, noise)
            rankings.append({"prompt_id": q["prompt_id"], "kind": "full", "ranking": tiers, "author": author,
                             "timestamp": stamp(), "note": "", "source": "simulated"})
            if noisy:
                noisy_ids.append(len(rankings) - 1)

    prompt_rows = [{"prompt": q["prompt"], "answer": q["answer"], "allowed_numbers": q["allowed"], "kind": q["kind"],
                    "prompt_id": q["prompt_id"]} for q in questions]
    atomic.write_text(out / "prompts.jsonl", "".join(json.dumps(r) + "\n" for r in prompt_rows))
    sft_rows = _sft_replies(seed, questions, sft_per_prompt, weights)
    atomic.write_text(out / "sft.jsonl", "".join(json.dumps(r) + "\n" for r in sft_rows))
    atomic.write_text(out / "candidates.jsonl", "".join(json.dumps({c: r[c] for c in CANDIDATE_COLUMNS}) + "\n"
                                                        for r in candidates))
    atomic.write_text(out / "rankings.jsonl", "".join(json.dumps({f: r[f] for f in RANKING_FIELDS}) + "\n" for r in rankings))

    # An import-style preference file on other questions: prompt/chosen/rejected text, chat-style rows,
    # and rows every gate or the quarantine must catch.
    imported, broken = [], 0
    for i in range(max(6, n_prompts // 4)):
        q = _question(rng, KINDS[i % len(KINDS)]) | {"kind": KINDS[i % len(KINDS)]}
        chosen, rejected = _reply(rng, q, "concise_correct"), _reply(rng, q, rng.choice(STYLES[1:]))
        if i % 3 == 2:
            imported.append({"chosen": [{"role": "user", "content": q["prompt"]}, {"role": "assistant", "content": chosen}],
                             "rejected": [{"role": "user", "content": q["prompt"]}, {"role": "assistant", "content": rejected}],
                             "annotator": "vendor"})
        else:
            imported.append({"prompt": q["prompt"], "chosen": chosen, "rejected": rejected, "annotator": "vendor"})
    lines = [json.dumps(r) for r in imported]
    problems = [
        json.dumps({"prompt": "What is 2 + 2?", "chosen": "4."}),  # no rejected side: quarantined
        json.dumps({"prompt": "What is 3 + 3?", "chosen": "6.", "rejected": "6.", "annotator": "vendor"}),  # identical
        json.dumps({"prompt": "What is 4 + 4?", "chosen": "8.", "rejected": "  ", "annotator": "vendor"}),  # empty side
        '{"prompt": "What is 5 + 5?", "chosen": "10.", ',  # malformed JSON: quarantined
    ]
    for n, line in enumerate(problems):
        lines.insert(1 + n * 3, line)
        broken += 1
    atomic.write_text(out / "preferences.jsonl", "\n".join(lines) + "\n")

    manifest = {
        "rule": RULE,
        "annotator": "orders replies by (correct, no hedging, concise, fewer words); with probability `noise` one "
                     "random adjacent pair of a ranking is swapped",
        "noise": noise, "seed": seed, "prompts": len(questions), "candidates": len(candidates),
        "sft_replies": len(sft_rows), "sft_style_weights": weights,
        "sft_styles": {style: sum(r["style"] == style for r in sft_rows) for style in STYLES},
        "rankings": len(rankings), "noisy_rankings": len(noisy_ids), "noisy_ranking_lines": [i + 1 for i in noisy_ids],
        "annotators": sorted({r["author"] for r in rankings}), "imported_pairs": len(imported),
        "imported_broken_rows": broken,
        "files": {name: str(out / name) for name in ("prompts.jsonl", "sft.jsonl", "candidates.jsonl", "rankings.jsonl",
                                                     "preferences.jsonl")},
    }
    atomic.write_json(out / "truth" / "manifest.json", manifest)
    return manifest
