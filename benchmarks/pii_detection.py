"""PII detection: false positives on real data, true positives on planted values, and speed.

Compares the detector of the `pii` check (`sft_dagster/quality/pii.py`: libphonenumber for phone
numbers, Luhn + issuer prefix for card numbers) with the broad regexes it replaced (kept below as the
baseline), in one run on the same texts:

- false positives: every GSM8K problem (question + worked answer) and every Banking77 message of the
  shared data sets, which hold no personal data; every flag there is false (the flagged texts are
  printed so a person can confirm);
- true positives: e-mail addresses, US and UK phone numbers in common formats and Luhn-valid card
  numbers of five networks, each planted between two words of a random real text; for the detector a
  hit is a finding of the right kind whose span covers the whole planted value (so masking removes
  it); the baseline reports a kind only, so its hit is the right kind;
- speed: rows per second over the real texts.

    .venv/bin/python benchmarks/pii_detection.py [--planted 600] [--seed 0] [--out benchmarks/results/pii.json]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

import pandas as pd

from sft_dagster.quality.pii import find_pii, luhn_valid, mask_pii

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"

# The baseline: the regexes the pii check used before (sft_dagster/quality/checks.py at aa31c95).
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")
_PHONE = re.compile(r"(?<![\w+])\+?\(?\d[\d\s().-]{7,}\d(?!\w)")
_CARD = re.compile(r"(?<!\d)(?:\d[ -]?){13,19}(?!\d)")


def baseline(text: str) -> str | None:
    if _EMAIL.search(text):
        return "email"
    for match in _CARD.finditer(text):
        digits = re.sub(r"\D", "", match.group())
        if 13 <= len(digits) <= 19 and luhn_valid(digits):
            return "card_number"
    for match in _PHONE.finditer(text):
        if 9 <= len(re.sub(r"\D", "", match.group())) <= 15:
            return "phone"
    return None


def detector(text: str) -> str | None:
    found = find_pii(text)
    return found[0].kind if found else None


def real_texts() -> dict[str, list[str]]:
    gsm = [json.loads(line) for line in (DATA / "gsm8k" / "test.jsonl").read_text().splitlines() if line.strip()]
    banking = pd.read_csv(DATA / "banking77" / "train.csv")
    return {"gsm8k": [r["question"] + "\n" + r["answer"] for r in gsm], "banking77": banking["text"].astype(str).tolist()}


def _card(rng: random.Random, prefix: str, length: int) -> str:
    body = prefix + "".join(str(rng.randrange(10)) for _ in range(length - len(prefix) - 1))
    return next(body + d for d in "0123456789" if luhn_valid(body + d))


def planted_values(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """(kind, value) pairs in the formats people write."""
    first = ["ana", "bo", "j.doe", "maria.lopez", "k_smith", "li.wei+shop", "o'neil"]
    domains = ["example.com", "mail.example.co.uk", "example.org", "uni.example.edu"]
    out: list[tuple[str, str]] = []
    for i in range(n):
        kind = ("email", "phone", "card_number")[i % 3]
        if kind == "email":
            out.append((kind, f"{rng.choice(first)}{rng.randrange(100)}@{rng.choice(domains)}"))
        elif kind == "phone":
            area = rng.choice(["212", "415", "650", "202", "312", "617", "206", "512"])
            ex, sub = f"{rng.randrange(200, 999)}", f"{rng.randrange(10000):04d}"
            # UK mobiles from allocated ranges (Ofcom's fictional 07700 900xxx is no valid number, and not found)
            uk_london = f"7946 {rng.randrange(10000):04d}"
            uk_mobile = f"{rng.choice(['7400', '7824', '7985'])} {rng.randrange(1000000):06d}"
            fmt = rng.choice([f"({area}) {ex}-{sub}", f"{area}-{ex}-{sub}", f"{area}.{ex}.{sub}", f"+1 {area} {ex} {sub}",
                              f"+1-{area}-{ex}-{sub}", f"+44 20 {uk_london}", f"020 {uk_london}", f"0{uk_mobile}",
                              f"+44 {uk_mobile}"])
            out.append((kind, fmt))
        else:
            prefix, length = rng.choice([("4", 16), ("51", 16), ("55", 16), ("2221", 16), ("34", 15), ("37", 15),
                                         ("6011", 16)])
            digits = _card(rng, prefix, length)
            if length == 16:
                style = rng.choice(["plain", "space", "dash"])
                sep = {"plain": "", "space": " ", "dash": "-"}[style]
                digits = sep.join(digits[j:j + 4] for j in range(0, 16, 4))
            else:
                digits = rng.choice([digits, f"{digits[:4]} {digits[4:10]} {digits[10:]}"])
            out.append((kind, digits))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--planted", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    texts = real_texts()
    detectors = {"baseline_regex": baseline, "libphonenumber_luhn": detector}
    result: dict = {"false_positives": {}, "true_positives": {}, "rows_per_second": {}, "flagged_examples": {}}
    for name, fn in detectors.items():
        for dataset, rows in texts.items():
            start = time.perf_counter()
            kinds = [fn(t) for t in rows]
            seconds = time.perf_counter() - start
            flagged = [(k, t) for k, t in zip(kinds, rows) if k]
            result["false_positives"][f"{name}/{dataset}"] = {
                "rows": len(rows), "flagged": len(flagged), "rate": round(len(flagged) / len(rows), 5),
                "by_kind": pd.Series([k for k, _ in flagged], dtype=object).value_counts().to_dict()}
            result["rows_per_second"][f"{name}/{dataset}"] = round(len(rows) / seconds, 1)
            result["flagged_examples"][f"{name}/{dataset}"] = [t[:160] for _, t in flagged[:5]]
    rng = random.Random(args.seed)
    hosts = texts["gsm8k"][:200] + texts["banking77"][:800]
    planted = planted_values(rng, args.planted)
    for name, fn in detectors.items():
        hits: dict[str, list[int]] = {}
        for kind, value in planted:
            host = rng.choice(hosts)
            cut = rng.randrange(len(host) + 1)
            cut = host.rfind(" ", 0, cut) + 1  # plant between words
            text = f"{host[:cut]}{value} {host[cut:]}"
            if name == "libphonenumber_luhn":  # the whole planted value inside one finding of its kind
                hit = any(f.kind == kind and f.start <= cut and f.end >= cut + len(value) for f in find_pii(text))
                hit &= value not in mask_pii(text)
            else:  # the baseline names a kind only
                hit = fn(text) == kind
            hits.setdefault(kind, []).append(int(hit))
        result["true_positives"][name] = {k: {"planted": len(v), "found": sum(v), "recall": round(sum(v) / len(v), 4)}
                                          for k, v in hits.items()}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
