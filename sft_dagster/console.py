"""What `sft-dagster run` shows while a run runs: one line per stage, and a progress bar while training.

The run's events are read back from the Dagster instance (the same record the UI shows) by a thread
that follows the event log; Dagster's own per-event console lines are off unless `--verbose`.

    raw_examples              1,224 rows     0.9 s   (ingest_quarantine 6)
    label_issues              1,224 rows     6.1 s
    ...
    training [##########----------] step 52/103 | loss 0.4127 | 243 tokens/s | 3m 31s left

Before training, the pre-flight's plan (steps, tokens, time estimated from one timed step); then the
trainer's progress lines (`progress.py`, `parse_line`) drive the bar.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from typing import TextIO

from .progress import parse_line

POLL_SECONDS = 0.5
PREFLIGHT = "pre-flight: "  # defs/training.py logs the trainer's plan as `pre-flight: <json>`
LABEL_PREFLIGHT = "label-issue pre-flight: "  # defs/quality.py logs the label views' estimate the same way
BAR_WIDTH = 24


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def progress_bar(p: dict, width: int = BAR_WIDTH) -> str:
    """`training [####----] step 52/103 | loss 0.4127 | 243 tokens/s | 3m 31s left` from `parse_line`'s numbers."""
    done = int(width * p["step"] / max(1, p["total_steps"]))
    loss = f"loss {p['train_loss']:.4f}" + (f" (validation {p['val_loss']:.4f})" if "val_loss" in p else "")
    return (f"training [{'#' * done}{'-' * (width - done)}] step {p['step']}/{p['total_steps']} | {loss} | "
            f"{p['tokens_per_second']:.0f} tokens/s | {duration(p['eta_seconds'])} left")


def preflight_line(plan: dict) -> str:
    """`training: 103 steps, 63,665 tokens, about 4m 22s (pre-flight: 243 tokens/s on cpu)`."""
    estimate = f", about {duration(plan['estimated_seconds'])}" if plan.get("estimated_seconds") is not None else ""
    speed = (f" (pre-flight: {plan['measured_tokens_per_second']:.0f} tokens/s on {plan.get('device')})"
             if plan.get("measured_tokens_per_second") else "")
    return f"training: {plan['optimizer_steps']} steps, {plan['n_tokens']:,} tokens{estimate}{speed}"


def label_preflight_line(plan: dict) -> str:
    """`label issues: 248 rows, about 3s (tfidf 0.4s, embeddings 2.6s)`: each view timed on a sample."""
    views = plan.get("views", {})
    total = sum(v.get("estimated_seconds", 0) for v in views.values())
    each = ", ".join(f"{name} {duration(v.get('estimated_seconds', 0))}" for name, v in views.items())
    return f"label issues: {plan.get('rows', 0):,} rows, about {duration(total)}" + (f" ({each})" if each else "")


class StageConsole:
    """Turns a run's event-log entries into the console lines above."""

    def __init__(self, stage_names: dict[str, list[str]], out: TextIO | None = None, tty: bool | None = None):
        self.stage_names = stage_names  # step key -> the asset names it materializes (main asset first)
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self.rows: dict[str, dict[str, int]] = {}
        self._bar_open = False

    def _print(self, line: str) -> None:
        if self._bar_open:
            self.out.write("\n")
            self._bar_open = False
        self.out.write(line + "\n")
        self.out.flush()

    def handle(self, entry) -> None:
        event = entry.dagster_event
        if event is None:  # a log message: training progress, or a warning worth seeing
            message = entry.user_message or ""
            progress = parse_line(message)
            if progress is not None:
                bar = progress_bar(progress)
                if self.tty:
                    self.out.write("\r" + bar)
                    self.out.flush()
                    self._bar_open = True
                else:
                    self._print(bar)
            elif LABEL_PREFLIGHT in message:  # the label views' estimate (tested before training's: it contains it)
                self._print(label_preflight_line(json.loads(message[message.index(LABEL_PREFLIGHT) + len(LABEL_PREFLIGHT):])))
            elif PREFLIGHT in message:  # the trainer's plan, timed on one step: the first time-left estimate
                self._print(preflight_line(json.loads(message[message.index(PREFLIGHT) + len(PREFLIGHT):])))
            elif message.startswith("Dependencies for step"):  # Dagster skipping what a failure left unfed
                self._print(f"{self.stage(entry.step_key):<26} {'skipped':>12}")
            elif entry.level >= 30:  # logging.WARNING
                self._print(f"warning: {message}")
            return
        kind = event.event_type_value
        step = event.step_key
        if kind == "ASSET_MATERIALIZATION" and step:
            metadata = event.event_specific_data.materialization.metadata
            count = metadata.get("dagster/row_count")
            self.rows.setdefault(step, {})[event.asset_key.path[-1]] = None if count is None else count.value
        elif kind == "STEP_SUCCESS":
            self._print(self.stage_line(step, event.event_specific_data.duration_ms / 1000))
        elif kind == "STEP_FAILURE":
            self._print(f"{self.stage(step):<26} FAILED (reason below)")
        elif kind == "ASSET_CHECK_EVALUATION" and not event.event_specific_data.passed:
            data = event.event_specific_data
            level = "blocking" if data.severity.value == "ERROR" else "warning"
            self._print(f"  check failed ({level}): {data.asset_key.path[-1]}:{data.check_name}")

    def stage(self, step: str | None) -> str:
        names = self.stage_names.get(step or "", [])
        return names[0] if names else str(step)

    def stage_line(self, step: str, seconds: float) -> str:
        rows = self.rows.get(step, {})
        main = self.stage(step)
        count = rows.get(main)
        shown = f"{count:,} rows" if isinstance(count, int) else ""
        others = ", ".join(f"{name} {n:,}" for name, n in rows.items() if name != main and isinstance(n, int))
        return f"{main:<26} {shown:>12} {seconds:8.1f} s" + (f"   ({others})" if others else "")


class EventFollower:
    """Follows a run's event log in a thread and hands every new entry to `handle`, in order."""

    def __init__(self, instance, run_id: str, handle: Callable):
        self.instance, self.run_id, self.handle = instance, run_id, handle
        self.cursor = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "EventFollower":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()  # whatever arrived after the last poll

    def _drain(self) -> None:
        with self._lock:
            while True:
                conn = self.instance.get_records_for_run(self.run_id, cursor=self.cursor, limit=500)
                for record in conn.records:
                    self.handle(record.event_log_entry)
                self.cursor = conn.cursor
                if not conn.has_more:
                    return

    def _loop(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            self._drain()
