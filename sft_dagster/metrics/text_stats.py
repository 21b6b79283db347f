"""What every generation task's outputs look like: length against the reference, empty and cut-off
outputs, repetition.

Lengths are in words (whitespace-separated tokens of the output as generated, stripped), the unit a
reader of the samples counts; they describe the outputs and have no better direction (never a promotion
metric), except `length_ratio`, which is corpus level: all outputs' words over all references' words
(the row's own reference), as BLEU's brevity ratio. Cut-off outputs are those whose generation used all of
`evaluation.max_new_tokens` (`Rows.output_tokens`; evaluation counts them by re-tokenizing the decoded
output, exact when the text round-trips: see `evaluation.score_model`). Repetition is distinct-2 within each output: distinct word bigrams
over bigrams, mean over the outputs of two words or more (1.0: no bigram repeated; a generation stuck in
a loop scores near 0).
"""

from __future__ import annotations

import numpy as np

from ..task_types import GENERATION_TASKS
from .registry import Quantile, Rows, Summed, mean_of, metric, ratio_of


def _words(rows: Rows) -> np.ndarray:
    return rows.memo("words", lambda: np.array([len(o.split()) for o in rows.outputs], dtype=float))


@metric("words_mean", tasks=GENERATION_TASKS, higher_is_better=None)
def words_mean(rows: Rows) -> Summed:
    """Mean output length in words."""
    return mean_of(_words(rows))


@metric("words_p50", tasks=GENERATION_TASKS, higher_is_better=None)
def words_p50(rows: Rows) -> Quantile:
    """Median output length in words."""
    return Quantile(_words(rows), 50)


@metric("words_p90", tasks=GENERATION_TASKS, higher_is_better=None)
def words_p90(rows: Rows) -> Quantile:
    """90th percentile of the output length in words."""
    return Quantile(_words(rows), 90)


@metric("length_ratio", tasks=GENERATION_TASKS, higher_is_better=None, corpus=True)
def length_ratio(rows: Rows) -> Summed:
    """Output words over reference words, summed over the rows (1.0: as long as the references)."""
    return ratio_of(_words(rows), [len(e.split()) for e in rows.expected])


@metric("empty_rate", tasks=GENERATION_TASKS, higher_is_better=False)
def empty_rate(rows: Rows) -> Summed:
    """Share of outputs that are empty (or only whitespace)."""
    return mean_of(not o.strip() for o in rows.outputs)


@metric("cutoff_rate", tasks=GENERATION_TASKS, higher_is_better=False)
def cutoff_rate(rows: Rows) -> Summed | None:
    """Share of outputs that used all of max_new_tokens (cut off before they ended)."""
    if rows.output_tokens is None or rows.max_new_tokens is None:
        return None
    return mean_of(n >= rows.max_new_tokens for n in rows.output_tokens)


def distinct_2(text: str) -> float:
    """Distinct word bigrams over word bigrams of one text (NaN under two words)."""
    words = text.split()
    bigrams = list(zip(words, words[1:]))
    return len(set(bigrams)) / len(bigrams) if bigrams else float("nan")


@metric("distinct_2", tasks=GENERATION_TASKS)
def distinct_2_metric(rows: Rows) -> Summed:
    """Distinct-2 within each output (1.0: no repeated bigram), mean over outputs of two words or more."""
    return mean_of(distinct_2(o) for o in rows.outputs)


def reference_lengths(references: list[list[str]]) -> dict:
    """The references' length in words (the row's own reference): mean, median, 90th percentile."""
    words = np.array([len(refs[0].split()) for refs in references], dtype=float)
    if not len(words):
        return {}
    return {"words_mean": float(words.mean()), "words_p50": float(np.percentile(words, 50)),
            "words_p90": float(np.percentile(words, 90)),
            "rows_with_several_references": int(sum(len(refs) > 1 for refs in references))}
