"""Question answering: exact match and token-level F1 after SQuAD's answer normalisation.

SQuAD normalisation (the official v1.1 evaluation script): lower case, punctuation removed, the articles
a/an/the removed, whitespace collapsed. Token F1 is the harmonic mean of token precision and recall of
the normalised answers (an empty answer against an empty reference scores 1, as in SQuAD v2). Several
references per row: the best score over them (SQuAD's `metric_max_over_ground_truths`).

Maths answers: a row whose reference has a GSM8K-style final answer (`#### 42`) is scored on final
answers, the text after the last `####` (its first line) in the reference and in the generation, or the
generation's last number when it has no `####`; two final answers that are both numbers are compared as
numbers (`1,000` = `1000` = `1000.0`, a `$` dropped). A pair that `normalise_answer` (the earlier reports'
exact match) calls equal is a match too, so exact match can only go up from the earlier reports', by the
answers the earlier rule missed ("The answer is 18." against `#### 18`).

The qa default is exact match: on GSM8K-style answers token F1 of a number is match or miss as well, and
it is the number the earlier reports gave (qa specs keep their promotion metric and history); token F1
is reported beside it for extractive and free-form answers.
"""

from __future__ import annotations

import re
import string
from collections import Counter

from .registry import Rows, Summed, mean_of, metric

QA = frozenset({"qa"})
FINAL_ANSWER = "####"
NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise_answer(text: str) -> str:
    """The earlier exact-match normalisation: the text after the last `####`, whitespace collapsed, an outer
    `.` stripped, lower case."""
    text = text.strip()
    if FINAL_ANSWER in text:
        text = text.rsplit(FINAL_ANSWER, 1)[1]
    return re.sub(r"\s+", " ", text).strip().strip(".").lower()


def squad_normalise(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def final_answer(text: str) -> str:
    """A maths answer's final answer: the first line after the last `####`, else the last number, else the text."""
    if FINAL_ANSWER in text:
        after = text.rsplit(FINAL_ANSWER, 1)[1].strip()
        return after.split("\n", 1)[0].strip() if after else ""
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else text.strip()


def _number(text: str) -> float | None:
    text = text.strip().rstrip(".").replace(",", "").replace("$", "")
    try:
        return float(text)
    except ValueError:
        return None


def _answers(rows: Rows) -> list[tuple[str, list[str], bool]]:
    """Per row: the answer scored, its references, and whether they are maths final answers."""
    out = []
    for output, refs in zip(rows.outputs, rows.references):
        maths = any(FINAL_ANSWER in r for r in refs)
        out.append((final_answer(output), [final_answer(r) for r in refs], True) if maths else (output, refs, False))
    return out


def answers_match(answer: str, reference: str, maths: bool = False) -> bool:
    if maths and (a := _number(answer)) is not None and (b := _number(reference)) is not None:
        return a == b
    return squad_normalise(answer) == squad_normalise(reference)


def token_f1(answer: str, reference: str) -> float:
    """SQuAD token F1 of two answers (normalised)."""
    a, r = squad_normalise(answer).split(), squad_normalise(reference).split()
    if not a or not r:
        return float(a == r)
    same = sum((Counter(a) & Counter(r)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(a), same / len(r)
    return 2 * precision * recall / (precision + recall)


@metric("exact_match", tasks=QA, primary=QA)
def exact_match(rows: Rows) -> Summed:
    """Share of rows whose answer equals a reference after SQuAD normalisation (maths: the final answer)."""
    return mean_of(any(answers_match(a, r, maths) or normalise_answer(output) == normalise_answer(raw)
                       for r, raw in zip(refs, raw_refs))
                   for (a, refs, maths), output, raw_refs in zip(_answers(rows), rows.outputs, rows.references))


@metric("token_f1", tasks=QA)
def token_f1_metric(rows: Rows) -> Summed:
    """SQuAD token-level F1 of the answer against its best reference, mean over rows (maths: final answers)."""
    return mean_of(max(token_f1(a, r) for r in refs) for a, refs, _ in _answers(rows))
