"""The one registry of task metrics: a metric is a function of the scored rows, registered with `@metric`.

A metric function takes `Rows` (one model's outputs on the test rows, with their references) and returns
its per-row statistics: `Summed` (statistics whose column sums over any sample of rows give the metric:
a mean of row scores, or a corpus metric such as BLEU from its summed n-gram counts) or `Quantile`
(a percentile of per-row values), or None when the rows lack what it needs. The point value and every
bootstrap resample (`bootstrap.py`) come from the same statistics, so a corpus metric is recomputed at
corpus level on each resample, never averaged over sentences.

Adding a metric is one function in its family's module and its registration:

    @metric("chrf", tasks={"translation"}, corpus=True, primary=("translation",))
    def chrf(rows: Rows) -> Summed: ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np


@dataclass
class Rows:
    """What the metrics score: one model's outputs on the test rows, in row order.

    outputs: the raw generations. references: each row's references, the row's response first (a
    `references` column adds more). predictions / labels: label tasks' normalised answers and label set.
    output_tokens: generated tokens per row (None: unknown, `cutoff_rate` is left out).
    """

    task: str
    outputs: list[str]
    references: list[list[str]]
    predictions: list[str] | None = None
    labels: list[str] | None = None
    output_tokens: list[int] | None = None
    max_new_tokens: int | None = None
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def expected(self) -> list[str]:
        """The row's own reference (its response, or its label)."""
        return [refs[0] for refs in self.references]

    def memo(self, key: str, compute: Callable):
        """A value several metrics of one family share (ROUGE's scores of every type), computed once."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]


@dataclass(frozen=True)
class Resample:
    """Bootstrap resamples of the rows: `indices` (resamples x rows) and how often each row is drawn."""

    indices: np.ndarray
    counts: np.ndarray


@dataclass(frozen=True)
class Summed:
    """Per-row statistics (rows x k) whose column sums over any sample of rows give the metric.

    from_sums maps summed statistics (m x k) to m metric values; signature: how the metric was computed
    (sacrebleu's reproducibility signature), when it has one."""

    stats: np.ndarray
    from_sums: Callable[[np.ndarray], np.ndarray]
    signature: str | None = None

    def __len__(self) -> int:
        return len(self.stats)

    def value(self) -> float:
        return float(self.from_sums(self.stats.sum(axis=0, keepdims=True))[0])

    def resampled(self, sample: Resample) -> np.ndarray:
        return np.asarray(self.from_sums(sample.counts @ self.stats), dtype=float)


@dataclass(frozen=True)
class Quantile:
    """A percentile (`q`, 0-100) of per-row values; NaN rows are left out."""

    values: np.ndarray
    q: float
    signature: str | None = None

    def __len__(self) -> int:
        return len(self.values)

    def value(self) -> float:
        return float(_nan_percentile(self.values[None, :], self.q)[0])

    def resampled(self, sample: Resample) -> np.ndarray:
        return _nan_percentile(self.values[sample.indices], self.q)


Statistic = Summed | Quantile


def _nan_percentile(values: np.ndarray, q: float) -> np.ndarray:
    """Row-wise percentile that is NaN (no warning) for a row of NaNs."""
    out = np.full(values.shape[0], np.nan)
    some = ~np.isnan(values).all(axis=1)
    if some.any():
        out[some] = np.nanpercentile(values[some], q, axis=1)
    return out


def _ratio(sums: np.ndarray) -> np.ndarray:
    """First column over second, NaN where the second is 0."""
    return np.divide(sums[:, 0], sums[:, 1], out=np.full(len(sums), np.nan), where=sums[:, 1] > 0)


def mean_of(values: Iterable[float]) -> Summed:
    """The mean of per-row values (NaN: the row has none and is left out) as summed statistics."""
    v = np.asarray(list(values), dtype=float)
    has = ~np.isnan(v)
    return Summed(np.column_stack([np.where(has, v, 0.0), has.astype(float)]), _ratio)


def ratio_of(numerators: Iterable[float], denominators: Iterable[float]) -> Summed:
    """sum(numerators) / sum(denominators) over the rows (a corpus-level ratio)."""
    return Summed(np.column_stack([np.asarray(list(numerators), float), np.asarray(list(denominators), float)]), _ratio)


@dataclass(frozen=True)
class Metric:
    name: str
    tasks: frozenset[str]
    # True / False: which way is better (promotion compares in that direction); None: a description of
    # the outputs (their length) with no better direction, never a promotion metric.
    higher_is_better: bool | None
    corpus: bool  # computed from the corpus's summed statistics, not a mean of row scores
    primary: frozenset[str]  # the task types it is the default (primary) metric of
    family: str
    description: str
    compute: Callable[[Rows], Statistic | None]


REGISTRY: dict[str, Metric] = {}


def metric(name: str, *, tasks: Iterable[str], higher_is_better: bool | None = True, corpus: bool = False,
           primary: Iterable[str] = ()):
    """Register `fn(rows) -> Summed | Quantile | None` as metric `name` of the task types `tasks`."""

    def register(fn: Callable[[Rows], Statistic | None]):
        if name in REGISTRY:
            raise ValueError(f"metric {name!r} is registered twice ({REGISTRY[name].family} and {fn.__module__})")
        REGISTRY[name] = Metric(name=name, tasks=frozenset(tasks), higher_is_better=higher_is_better, corpus=corpus,
                                primary=frozenset(primary), family=fn.__module__.rsplit(".", 1)[-1],
                                description=(fn.__doc__ or "").strip().split("\n\n", 1)[0].replace("\n", " "),
                                compute=fn)
        return fn

    return register


def metrics_for(task: str) -> list[str]:
    """The metrics a task type produces: its primary metric first, then the more task-specific ones (of fewer
    task types: BLEU before the length statistics every generation task has), in registration order."""
    names = [m.name for m in REGISTRY.values() if task in m.tasks]
    return sorted(names, key=lambda n: (task not in REGISTRY[n].primary, len(REGISTRY[n].tasks)))


def primary_metric(task: str) -> str:
    found = [m.name for m in REGISTRY.values() if task in m.primary]
    if len(found) != 1:
        raise ValueError(f"task type {task!r} has {len(found)} primary metrics registered ({found}); it needs one")
    return found[0]


def statistics(rows: Rows) -> dict[str, Statistic]:
    """Every metric of the rows' task type that the rows allow, as per-row statistics."""
    if not rows.outputs:
        return {}
    out = {}
    for name in metrics_for(rows.task):
        stat = REGISTRY[name].compute(rows)
        if stat is not None:
            out[name] = stat
    return out


def score(rows: Rows) -> dict[str, float | None]:
    """Every metric of the rows' task type: its value on all rows (None where no row has one: distinct-2 of
    outputs under two words; JSON, MLflow and the UI take None, not NaN)."""
    return values(statistics(rows))


def values(stats: dict[str, Statistic]) -> dict[str, float | None]:
    """The metrics' values from their per-row statistics (`statistics`), None for NaN (see `score`)."""
    return {name: (None if value != value else value) for name, value in ((name, stat.value()) for name, stat in stats.items())}
