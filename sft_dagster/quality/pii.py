"""Personal data in text: e-mail addresses, phone numbers and payment card numbers, found and masked.

Phone numbers are found by Google's libphonenumber (the `phonenumbers` port) at its `VALID` leniency: a
digit run counts only when it is a valid number of its region (numbering plan, length, area code), so
arithmetic ("16 - 3 - 4"), years, prices and quantities are not phone numbers. Numbers written in
international format (+CC ...) are found whatever the region; national formats only for `regions`.
Card numbers must pass the Luhn checksum and start with an issuer prefix of a card network, in one run
of digits or in groups separated by one space or hyphen.

Measured on the shared data (benchmarks/pii_detection.py, BENCHMARKS.md): the broad regexes this module
replaces flagged 25 of 1,319 GSM8K maths problems as containing phone numbers (all false); this detector
flags none of them, nor any of 10,003 Banking77 messages, and finds 595 of 600 planted values whole (the
5 missed phone numbers were planted beside another number, their digits running together).

`find_pii` returns the spans; `mask_pii` replaces them with `[email]`, `[phone]`, `[card_number]`, so
what reaches Dagster's event log (previews, failing rows, reports) never carries the value itself.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

import phonenumbers

DEFAULT_REGIONS = ("US", "GB")
KINDS = ("email", "phone", "card_number")

_EMAIL = re.compile(r"[\w.+'-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}")
# A card number: 13-19 digits, in one run or in groups split by a single space or hyphen.
_CARD = re.compile(r"(?<![\d-])\d{4}(?:[ -]?\d{2,6}){2,4}(?![\d-])")
# Issuer prefixes (IIN ranges) of the card networks: Visa, Mastercard, Amex, Discover, JCB, Diners, UnionPay, Maestro.
_CARD_PREFIX = re.compile(r"^(?:4|5[1-5]|2(?:2[2-9]|[3-6]\d|7[01]|720)|3[47]|6(?:011|5|4[4-9]|22)|35|3(?:0[0-5]|[689])|62|5[06-9]|6\d)")
# Cheap pre-filter: phonenumbers is run only on text with 7+ digits in a row of phone-like separators.
_PHONE_CANDIDATE = re.compile(r"\d(?:[\s().\-/]{0,3}\d){6,}")


@dataclass(frozen=True)
class Finding:
    kind: str
    start: int
    end: int


def luhn_valid(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = int(ch)
        if i % 2 == parity:
            d = d * 2 - 9 if d * 2 > 9 else d * 2
        total += d
    return total % 10 == 0


def _cards(text: str) -> list[Finding]:
    found = []
    for match in _CARD.finditer(text):
        raw = match.group()
        separators = set(re.sub(r"\d", "", raw))
        if len(separators) > 1:
            continue
        digits = re.sub(r"\D", "", raw)
        if 13 <= len(digits) <= 19 and _CARD_PREFIX.match(digits) and luhn_valid(digits):
            found.append(Finding("card_number", match.start(), match.end()))
    return found


def _phones(text: str, regions: tuple[str, ...]) -> list[Finding]:
    if not _PHONE_CANDIDATE.search(text):
        return []
    found: dict[tuple[int, int], Finding] = {}
    for region in regions or ("ZZ",):
        for match in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
            found.setdefault((match.start, match.end), Finding("phone", match.start, match.end))
    return list(found.values())


def find_pii(text: str, regions: tuple[str, ...] | list[str] = DEFAULT_REGIONS) -> list[Finding]:
    """Every e-mail address, phone number and card number in `text`, by position; overlaps resolved in
    favour of the earlier, then longer, span (a card number is never also reported as a phone)."""
    if not text:
        return []
    spans = [Finding("email", m.start(), m.end()) for m in _EMAIL.finditer(text)]
    spans += _cards(text)
    spans += _phones(text, tuple(regions))
    spans.sort(key=lambda f: (f.start, -(f.end - f.start), KINDS.index(f.kind)))
    kept: list[Finding] = []
    for f in spans:
        if kept and f.start < kept[-1].end:
            continue
        kept.append(f)
    return kept


def contains_pii(text: str, regions: tuple[str, ...] | list[str] = DEFAULT_REGIONS) -> str | None:
    """The kind of the first finding in `text`, or None."""
    found = find_pii(text, regions)
    return found[0].kind if found else None


def mask_pii(text: str, regions: tuple[str, ...] | list[str] = DEFAULT_REGIONS) -> str:
    """`text` with every finding replaced by its kind in brackets."""
    if not isinstance(text, str):
        return text
    out, last = [], 0
    for f in find_pii(text, regions):
        out += [text[last:f.start], f"[{f.kind}]"]
        last = f.end
    return "".join(out) + text[last:]


# Below this many texts the scan runs in this process. Measured (BENCHMARKS.md, "Data-quality gate"):
# with a 9-digit order number in every row, libphonenumber's matcher takes ~0.27 ms a row per region,
# ~27 s of the 100k-row gate on one core; starting a spawned worker costs about 1 s.
PARALLEL_MIN_TEXTS = 20_000


def _kinds(texts: list[str], regions: tuple[str, ...]) -> list[str]:
    return [",".join(sorted({f.kind for f in find_pii(t, regions)})) for t in texts]


def pii_kinds(texts: list[str], regions: tuple[str, ...] | list[str] = DEFAULT_REGIONS,
              workers: int | None = None, min_texts: int = PARALLEL_MIN_TEXTS) -> list[str]:
    """For each text, the kinds found in it, comma-separated and sorted ("" when none). From `min_texts`
    texts on, the texts are scanned in contiguous chunks by one spawned process per usable CPU (`workers`,
    default the CPUs this process may run on): the same results in the same order."""
    regions = tuple(regions)
    workers = workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if workers < 2 or len(texts) < min_texts:
        return _kinds(texts, regions)
    size = -(-len(texts) // workers)
    chunks = [texts[i:i + size] for i in range(0, len(texts), size)]
    with ProcessPoolExecutor(len(chunks), mp_context=get_context("spawn")) as pool:
        parts = pool.map(_kinds, chunks, [regions] * len(chunks))
        return [kinds for part in parts for kinds in part]
