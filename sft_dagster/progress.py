"""Following a training run while it trains: one log line every N steps, and the loss curve.

The trainer calls its `on_metrics` callback after every optimizer step with `step`, `total_steps`,
`train_loss`, `lr`, `trained_tokens`, `seconds`, `validation_seconds` and, at evaluation steps,
`val_loss`. `Progress` turns that into a log line (step, loss, tokens/s, time left) every `every`
steps and at every evaluation, and keeps the curve for the adapter's metadata. The line has one
format, parsed back by `parse_line` (the CLI shows it as a live progress line).
"""

from __future__ import annotations

import re
from collections.abc import Callable

PREFIX = "training progress:"
LINES_PER_RUN = 20  # default: about this many progress lines per run, whatever its length
_LINE = re.compile(
    r"training progress: step (?P<step>\d+)/(?P<total_steps>\d+) \| train loss (?P<train_loss>[\d.naninf-]+)"
    r"(?: \| validation loss (?P<val_loss>[\d.naninf-]+))? \| (?P<tokens_per_second>[\d.]+) tokens/s"
    r" \| (?P<eta_seconds>\d+) s left")


def tokens_per_second(metrics: dict) -> float:
    training_seconds = metrics["seconds"] - metrics.get("validation_seconds", 0.0)
    return metrics["trained_tokens"] / training_seconds if training_seconds > 0 else 0.0


def eta_seconds(metrics: dict) -> int:
    """Time left at the pace so far (validation passes included)."""
    step, total = metrics["step"], metrics["total_steps"]
    return round(metrics["seconds"] / step * (total - step)) if step else 0


def format_line(metrics: dict) -> str:
    val = f" | validation loss {metrics['val_loss']:.4f}" if metrics.get("val_loss") is not None else ""
    return (f"{PREFIX} step {metrics['step']}/{metrics['total_steps']} | train loss {metrics['train_loss']:.4f}{val}"
            f" | {tokens_per_second(metrics):.1f} tokens/s | {eta_seconds(metrics)} s left")


def parse_line(text: str) -> dict | None:
    """The numbers of a progress line, or None for any other log line."""
    match = _LINE.search(text or "")
    if match is None:
        return None
    out = {k: float(v) for k, v in match.groupdict().items() if v is not None}
    for key in ("step", "total_steps", "eta_seconds"):
        out[key] = int(out[key])
    return out


class Progress:
    """An `on_metrics` callback: logs a progress line every `every` steps (and at evaluations and the
    last step) and records the curve; `on_step` callbacks (experiment tracking) see every step."""

    def __init__(self, log: Callable[[str], None], every: int | None = None,
                 on_step: list[Callable[[dict], None]] | None = None):
        self.log, self.every, self.on_step = log, every, list(on_step or [])
        self.curve: list[dict] = []

    def __call__(self, metrics: dict) -> None:
        every = self.every or max(1, metrics["total_steps"] // LINES_PER_RUN)
        point = {"step": metrics["step"], "train_loss": round(metrics["train_loss"], 6), "lr": metrics.get("lr"),
                 "tokens_per_second": round(tokens_per_second(metrics), 1)}
        if metrics.get("val_loss") is not None:
            point["val_loss"] = round(metrics["val_loss"], 6)
        last = metrics["step"] == metrics["total_steps"]
        if metrics["step"] % every == 0 or "val_loss" in point or last:
            self.curve.append(point)
            self.log(format_line(metrics))
        for callback in self.on_step:
            callback(metrics)
