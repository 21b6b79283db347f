"""Training progress lines: what the run log shows while training, and the curve kept for the UI."""

from __future__ import annotations

import pytest

from sft_dagster.progress import Progress, format_line, parse_line


def metrics(step: int, total: int = 40, val: float | None = None) -> dict:
    return {"step": step, "total_steps": total, "train_loss": 2.0 / step, "lr": 1e-4, "val_loss": val,
            "trained_tokens": 100 * step, "seconds": 2.0 * step + (1.0 if val else 0.0), "validation_seconds": 1.0 if val else 0.0}


def test_a_progress_line_round_trips_with_speed_and_time_left():
    line = format_line(metrics(10, val=1.25))
    parsed = parse_line("2026-11-25 - dagster - INFO - " + line)
    assert parsed["step"] == 10 and parsed["total_steps"] == 40
    assert parsed["train_loss"] == pytest.approx(0.2) and parsed["val_loss"] == pytest.approx(1.25)
    assert parsed["tokens_per_second"] == pytest.approx(50.0)  # 1000 tokens in 20 training seconds
    assert parsed["eta_seconds"] == round(21.0 / 10 * 30)
    assert parse_line("some other log line") is None


def test_progress_logs_every_n_steps_and_every_evaluation():
    lines, seen = [], []
    progress = Progress(lines.append, on_step=[seen.append])
    for step in range(1, 41):
        progress(metrics(step, val=1.0 if step in (5, 40) else None))
    logged = [parse_line(line)["step"] for line in lines]
    # 40 steps -> a line every 2 steps, plus the evaluation at step 5
    assert logged == sorted({*range(2, 41, 2), 5})
    assert [p["step"] for p in progress.curve] == logged
    assert progress.curve[2]["val_loss"] == 1.0 and len(seen) == 40
