"""Paired bootstrap 95% intervals over the test rows, for each model's metrics and their differences.

One set of resamples of the row indices (`RESAMPLES`, seeded with `SEED`) is used for every model and
every metric, so a difference is measured on the same rows for both models (paired): the candidate minus
champion interval is the percentile interval of the per-resample differences. Each metric is recomputed
on each resample from its per-row statistics (`registry.Summed`: corpus metrics such as BLEU and chrF from
their summed n-gram counts, not a mean of sentence scores; `registry.Quantile` for percentiles), so the
intervals of all metrics of a model cost a matrix product and one small call per resample.

1000 resamples (`RESAMPLES`): the lower end of the interval of a 200-row exact match near 0.5 moves by
0.004 from seed to seed (standard deviation over 20 seeds; 0.007 with 200 resamples, 0.001 with 5000),
against an interval half-width of about 0.07; the seed is fixed, so a report's intervals are reproducible.

Cost (`benchmarks/metrics_cost.py`: 200 rows, four models: base, base 5-shot, champion, candidate; two
differences; 2-core AMD EPYC shared with other work): the metrics of the four models plus the report's
intervals took 1.1-1.9 s for translation (10 metrics; the 1000 resamples 0.6-1.0 s of it, sacrebleu's
per-resample score a Python call), 1.7-3.6 s for summarization (11 metrics; ROUGE's Porter stemming most,
1.5 s of it importing rouge-score and nltk once), 0.3-0.5 s for qa and 0.06 s for a label task. Issue 21
measured an evaluation stage of about 12 minutes for 160 translation rows: the metrics add under 0.5% of
it, and under 1% of a stage made twice as fast.
"""

from __future__ import annotations

import numpy as np

from .registry import REGISTRY, Resample, Statistic

RESAMPLES = 1000
SEED = 0
CONFIDENCE = 0.95


def resample(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> Resample:
    """`resamples` draws of n row indices with replacement, and each row's count per draw."""
    indices = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    counts = np.zeros((resamples, n))
    np.add.at(counts, (np.repeat(np.arange(resamples), n), indices.ravel()), 1.0)
    return Resample(indices=indices, counts=counts)


def _interval(values: np.ndarray) -> list[float] | None:
    values = values[~np.isnan(values)]
    if not len(values):
        return None
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


def _finite(value: float) -> float | None:
    return None if value != value else float(value)


def paired_intervals(stats: dict[str, dict[str, Statistic]], differences: dict[str, tuple[str, str]],
                     resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """Intervals of every model's metrics (`stats`: model -> metric -> per-row statistics, all on the same
    rows) and of the differences `name -> (model, minus model)` on the metrics both have.

    Returns {"method", "resamples", "seed", "confidence", "models": {model: {metric: [low, high]}},
    "differences": {name: {metric: {"value", "interval"}}}}; an interval is None where no resample has a
    value (a metric of no row)."""
    n = next((len(stat) for metrics in stats.values() for stat in metrics.values()), 0)
    out = {"method": (f"paired bootstrap over the {n} test rows: {resamples} resamples (seed {seed}), the same "
                      f"resamples for every model; {CONFIDENCE:.0%} percentile intervals; corpus metrics recomputed "
                      "on each resample"),
           "resamples": resamples, "seed": seed, "confidence": CONFIDENCE, "models": {}, "differences": {}}
    if n == 0:
        return out
    sample = resample(n, resamples, seed)
    drawn = {model: {name: stat.resampled(sample) for name, stat in metrics.items()} for model, metrics in stats.items()}
    out["models"] = {model: {name: _interval(values) for name, values in metrics.items()} for model, metrics in drawn.items()}
    for label, (a, b) in differences.items():
        if a in stats and b in stats:
            out["differences"][label] = {
                name: {"value": _finite(stats[a][name].value() - stats[b][name].value()),
                       "interval": _interval(drawn[a][name] - drawn[b][name])}
                for name in stats[a] if name in stats[b]}
    return out


def gain_interval(intervals: dict | None, difference: str, metric: str) -> list[float] | None:
    """The interval of a difference as a gain (better is positive: a lower-is-better metric's is negated)."""
    found = (((intervals or {}).get("differences") or {}).get(difference) or {}).get(metric) or {}
    interval = found.get("interval")
    if interval is None:
        return None
    return [-interval[1], -interval[0]] if lower_is_better(metric) else list(interval)


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of the metric is better: TER, the rates of invalid/empty/cut-off outputs, and
    the model's loss and perplexity."""
    return metric in MODEL_METRICS or (metric in REGISTRY and REGISTRY[metric].higher_is_better is False)


# Measured on the model rather than on its outputs (evaluation.score_model): lower is better, no interval.
MODEL_METRICS = ("loss", "perplexity")


def _cell(value, interval) -> str:
    text = "" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
    return f"{text} [{interval[0]:.4f}, {interval[1]:.4f}]" if interval and text else text


def markdown_table(intervals: dict, values: dict[str, dict], columns: list[tuple[str, str]], difference: str | None,
                   difference_heading: str) -> list[str]:
    """Markdown lines: how the intervals were drawn, then a table of each metric with its interval, per model
    (`columns`: (model, heading)), and the difference `difference` (a key of `intervals["differences"]`)."""
    models = intervals.get("models") or {}
    columns = [(k, h) for k, h in columns if k in models]
    if not columns:
        return []
    diff = (intervals.get("differences") or {}).get(difference) or {}
    names = list(dict.fromkeys(n for k, _ in columns for n in models[k]))
    lines = [f"{intervals['method'][:1].upper()}{intervals['method'][1:]}.", "",
             f"| metric | {' | '.join(h for _, h in columns)} | {difference_heading} |",
             "|" + "|".join("---" for _ in range(len(columns) + 2)) + "|"]
    for name in names:
        cells = [_cell((values.get(k) or {}).get(name), models[k].get(name)) for k, _ in columns]
        d = diff.get(name) or {}
        change = _cell(d.get("value"), d.get("interval"))
        lines.append(f"| {name} | {' | '.join(cells)} | {('+' if change and not change.startswith('-') else '') + change} |")
    return lines
