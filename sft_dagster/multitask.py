"""Multi-task mixing: several tasks' train splits sampled into one training set for one adapter.

A spec's `tasks:` (`spec.ExtraTaskSpec`, wired in defs/multitask.py) lists the further tasks; the
spec's own task is `main`. Each task keeps its own rows, template and labels; only the *train* rows
are mixed, every task's validation and test rows are kept whole and tagged with their task, so each
task is still evaluated on its own test split.

Sampling (the T5 paper's "examples-proportional" and "temperature-scaled" mixing, Raffel et al. 2020
sec. 3.5.2; mT5 uses the latter across languages):

- `proportional`: task i is drawn with probability p_i ∝ w_i x n_i (n_i its train rows, w_i its
  weight): with equal weights, every train row is equally likely, as if the tasks were concatenated.
- `temperature`: p_i ∝ (w_i x n_i)^(1/T). T = 1 is proportional; a larger T flattens the mix towards
  uniform, so a small task is seen more often than its size alone would give (T -> inf: uniform).

The mixed train set has as many rows as the tasks' train splits together (`total` overrides it). A task
drawn more often than it has rows repeats rows (each row before any repeats); one drawn less often
uses a seeded subset.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

from .spec import TaskSpec

TASK_COLUMN = "task"


def mixing_probabilities(sizes: dict[str, int], weights: dict[str, float],
                         strategy: Literal["proportional", "temperature"] = "proportional",
                         temperature: float = 1.0) -> dict[str, float]:
    """Each task's share of the mixed train set (see the module docstring)."""
    if set(sizes) != set(weights):
        raise ValueError(f"tasks with sizes {sorted(sizes)} and weights {sorted(weights)} differ")
    if any(w < 0 for w in weights.values()) or not any(sizes[t] * weights[t] > 0 for t in sizes):
        raise ValueError("mixing needs non-negative weights and at least one task with rows and a positive weight")
    if strategy == "temperature" and temperature <= 0:
        raise ValueError("mixing temperature must be positive")
    exponent = 1.0 / temperature if strategy == "temperature" else 1.0
    mass = {t: (sizes[t] * weights[t]) ** exponent if sizes[t] * weights[t] > 0 else 0.0 for t in sizes}
    total = sum(mass.values())
    return {t: m / total for t, m in mass.items()}


def mix_train_rows(train: dict[str, pd.DataFrame], probabilities: dict[str, float], seed: int,
                   total: int | None = None) -> pd.DataFrame:
    """`total` train rows (default: all tasks' rows together), task i's count drawn from a seeded
    multinomial over `probabilities`, tagged with the `task` column."""
    rng = np.random.default_rng(seed)
    names = sorted(train)
    total = sum(len(train[t]) for t in names) if total is None else total
    counts = rng.multinomial(total, [probabilities[t] for t in names])
    parts = []
    for name, count in zip(names, counts):
        rows = train[name]
        if count == 0:
            continue
        if rows.empty:
            raise ValueError(f"task {name!r} is drawn {count} times but has no train rows")
        repeats, rest = divmod(int(count), len(rows))
        order = [i for _ in range(repeats) for i in rng.permutation(len(rows))] + list(rng.permutation(len(rows))[:rest])
        parts.append(rows.iloc[order].assign(**{TASK_COLUMN: name}))
    mixed = pd.concat(parts, ignore_index=True)
    return mixed.iloc[rng.permutation(len(mixed))].reset_index(drop=True)


def mix_splits(splits: dict[str, pd.DataFrame], weights: dict[str, float], seed: int,
               strategy: Literal["proportional", "temperature"] = "proportional", temperature: float = 1.0) -> pd.DataFrame:
    """Every task's `dataset_splits` frame (column `split`) -> one frame: mixed train rows, and each
    task's validation and test rows unchanged, all tagged with their task."""
    train = {t: df[df["split"] == "train"] for t, df in splits.items()}
    probabilities = mixing_probabilities({t: len(df) for t, df in train.items()}, weights, strategy, temperature)
    held_out = [df[df["split"] != "train"].assign(**{TASK_COLUMN: t}) for t, df in sorted(splits.items())]
    return pd.concat([mix_train_rows(train, probabilities, seed), *held_out], ignore_index=True)


def task_of_rows(df: pd.DataFrame, tasks: dict[str, TaskSpec]) -> list[TaskSpec]:
    """The task each row of a mixed frame is rendered with (its template, labels and system prompt)."""
    unknown = sorted(set(df[TASK_COLUMN]) - set(tasks))
    if unknown:
        raise ValueError(f"rows of unknown tasks {unknown}; known: {sorted(tasks)}")
    return [tasks[name] for name in df[TASK_COLUMN]]
