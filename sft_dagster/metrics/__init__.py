"""Task metrics behind one registry (`registry.py`), one module per metric family, and their paired
bootstrap intervals (`bootstrap.py`).

| task types | metrics (primary first) |
|---|---|
| classification, sentiment | accuracy, macro_f1, invalid_rate (`label.py`) |
| translation | chrf, bleu, ter (`translation.py`, sacrebleu) |
| summarization | rougeLsum, rouge1, rouge2, rougeL (`summarization.py`, rouge-score) |
| qa | exact_match, token_f1 (`qa.py`, SQuAD normalisation, GSM8K final answers) |
| instruction, style | rougeL, chrf |
| every generation task | words_mean/p50/p90, length_ratio, empty_rate, cutoff_rate, distinct_2 (`text_stats.py`) |

`loss` and `perplexity` are measured on the model (evaluation.py), not here; `accepted(task)` lists them
with the task's metrics, which is what `promotion.metric` may name. This package depends on nothing of
sft_dagster but the spec's task types.
"""

from __future__ import annotations

from . import label, qa, summarization, text_stats, translation  # noqa: F401  (registers the metrics)
from .bootstrap import MODEL_METRICS, gain_interval, lower_is_better, markdown_table, paired_intervals
from .label import INVALID
from .registry import REGISTRY, Rows, mean_of, metric, metrics_for, primary_metric, score, statistics, values
from .text_stats import reference_lengths

__all__ = ["INVALID", "MODEL_METRICS", "MULTI_REFERENCE", "REGISTRY", "Rows", "accepted", "describe", "gain_interval", "lower_is_better",
           "markdown_table", "mean_of", "metric", "metrics_for", "paired_intervals", "primary_metric", "reference_lengths",
           "score", "statistics", "values"]


# How several references per row (a `references` column) are scored, as the report states it.
MULTI_REFERENCE = ("several references per row: chrF, BLEU and TER use sacrebleu's multi-reference statistics (chrF "
                   "the best reference per row, BLEU n-gram matches clipped by the most in any reference and the "
                   "closest reference length, TER the fewest edits over the mean reference length); ROUGE, exact match and token F1 the maximum "
                   "over the row's references; lengths against the row's own response")


def accepted(task: str) -> list[str]:
    """What `promotion.metric` may name for a task type: its metrics with a better direction, loss, perplexity."""
    return [n for n in metrics_for(task) if REGISTRY[n].higher_is_better is not None] + list(MODEL_METRICS)


def describe(stats: dict) -> dict:
    """Per metric: its family, direction, whether corpus level, what it is, and its signature (if any)."""
    out = {}
    for name, stat in stats.items():
        m = REGISTRY[name]
        out[name] = {"family": m.family, "higher_is_better": m.higher_is_better, "corpus": m.corpus,
                     "description": m.description, **({"signature": stat.signature} if stat.signature else {})}
    return out
