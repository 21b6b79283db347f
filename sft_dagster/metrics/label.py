"""Label tasks (classification, sentiment): accuracy, macro-F1 and the share of invalid answers.

Scored on the normalised predictions (`Rows.predictions`: the label a generation names, or INVALID).
Macro-F1 is sklearn's `f1_score(average="macro", labels=task labels, zero_division=0)`, computed from
summed per-label counts (F1 = 2 TP / (predicted + true)) so that every bootstrap resample recomputes it
at corpus level; tests/test_metrics.py checks it against sklearn.
"""

from __future__ import annotations

import numpy as np

from ..task_types import LABEL_TASKS
from .registry import Rows, Summed, mean_of, metric

INVALID = "<invalid>"  # a generation that names no label, or several


@metric("accuracy", tasks=LABEL_TASKS, primary=LABEL_TASKS)
def accuracy(rows: Rows) -> Summed:
    """Share of rows whose predicted label is the expected one."""
    return mean_of(p == e for p, e in zip(rows.predictions, rows.expected))


def _macro_f1(sums: np.ndarray) -> np.ndarray:
    tp, predicted, true = np.split(sums, 3, axis=1)
    denominator = predicted + true
    f1 = np.where(denominator > 0, 2 * tp / np.where(denominator > 0, denominator, 1), 0.0)
    return f1.mean(axis=1)


@metric("macro_f1", tasks=LABEL_TASKS, corpus=True)
def macro_f1(rows: Rows) -> Summed:
    """Unweighted mean over the task's labels of each label's F1 (a label never predicted nor expected: 0)."""
    predicted = np.array([[p == label for label in rows.labels] for p in rows.predictions], dtype=float)
    true = np.array([[e == label for label in rows.labels] for e in rows.expected], dtype=float)
    return Summed(np.hstack([predicted * true, predicted, true]), _macro_f1)


@metric("invalid_rate", tasks=LABEL_TASKS, higher_is_better=False)
def invalid_rate(rows: Rows) -> Summed:
    """Share of rows whose generation names no label (or several)."""
    return mean_of(p == INVALID for p in rows.predictions)
