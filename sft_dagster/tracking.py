"""Experiment tracking with MLflow: one MLflow run per training run, followed by its evaluation.

A training run (whatever its method) opens an MLflow run in the pipeline's experiment and logs:

- parameters: the spec's `training` section (flattened, `training.lora.r`, ...), the lineage (data,
  base model and tokenizer hashes, spec fingerprint, code version, library versions, device), the
  lineage hash and the Dagster data versions of the inputs;
- per optimizer step: `train_loss`, `lr`, `tokens_per_second`, and `val_loss` at each evaluation,
  through the `Progress(on_step=[...])` hook of `progress.py` (in the Dagster process, or in
  the Pipes / torchrun worker, which gets the run id in `SFT_DAGSTER_MLFLOW_RUN_ID`);
- at the end, the trainer's summary numbers (`summary.*`);
- later, the evaluation report's metrics (`eval.<model>.<metric>`, `eval.retention.<model>.<field>`)
  and the report itself as artifacts.

The tracking store defaults to SQLite under the storage root (`sqlite:///<root>/mlflow/mlflow.db`,
artifacts in `<root>/mlflow/artifacts/`): no server. `MLFLOW_TRACKING_URI` or the `mlflow` resource
point at a tracking server instead. Only `mlflow-skinny` is needed to log; the UI (`make mlflow`)
runs from full `mlflow` in its own environment.

Metrics are sent in batches: one `log_batch` call cost about 20 ms against the SQLite store on the
2-core development machine (50 calls, `MlflowClient.log_batch`), so a call per step would add about
2 s to the demo's 103 steps; steps are buffered and sent every `flush_seconds` (and at every evaluation
and the last step), which keeps the curve live in the UI within seconds.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RUN_ID_ENV = "SFT_DAGSTER_MLFLOW_RUN_ID"  # set for the training worker: log its steps to this run
URI_ENV = "MLFLOW_TRACKING_URI"  # MLflow's own variable
DEFAULT_UI_URL = "http://127.0.0.1:5000"  # `make mlflow`
STEP_METRICS = ("train_loss", "lr", "tokens_per_second", "val_loss")
MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value


def default_tracking_uri(storage_root: str | Path) -> str:
    return f"sqlite:///{(Path(storage_root) / 'mlflow' / 'mlflow.db').resolve()}"


def default_artifact_root(storage_root: str | Path) -> Path:
    return (Path(storage_root) / "mlflow" / "artifacts").resolve()


def flatten(data: dict, prefix: str = "") -> dict[str, str]:
    """Nested mappings as dotted keys; lists as JSON; every value a string MLflow accepts."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flatten(value, name + ".")
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            out[name] = text[:MAX_PARAM_CHARS]
    return out


def _client(uri: str):
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


@dataclass
class TrackedRun:
    """Where one training run's MLflow run is: enough to log to it from any process, and to link to it."""

    tracking_uri: str
    experiment_id: str
    run_id: str
    ui_url: str | None = None
    _client: Any = field(default=None, repr=False, compare=False)

    @property
    def client(self):
        if self._client is None:
            self._client = _client(self.tracking_uri)
        return self._client

    @property
    def url(self) -> str | None:
        if not self.ui_url:
            return None
        return f"{self.ui_url.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def to_record(self) -> dict:
        return {"tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id, "run_id": self.run_id,
                "url": self.url, "ui_url": self.ui_url}

    @classmethod
    def from_record(cls, record: dict | None) -> "TrackedRun | None":
        if not record:
            return None
        return cls(record["tracking_uri"], record["experiment_id"], record["run_id"], record.get("ui_url"))

    def env(self) -> dict[str, str]:
        """What a training worker needs to log its steps to this run."""
        return {URI_ENV: self.tracking_uri, RUN_ID_ENV: self.run_id}

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


def start_run(tracking_uri: str, experiment: str, run_name: str, params: dict, tags: dict,
              artifact_root: Path | None = None, ui_url: str | None = None) -> TrackedRun:
    """A new MLflow run in `experiment` (created on first use, with its artifacts under `artifact_root`
    when the store is local), with `params` flattened and logged."""
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    existing = client.get_experiment_by_name(experiment)
    if existing is not None:
        experiment_id = existing.experiment_id
    else:
        location = (artifact_root / experiment).as_uri() if artifact_root is not None else None
        try:
            experiment_id = client.create_experiment(experiment, artifact_location=location)
        except MlflowException:  # created meanwhile by another process
            experiment_id = client.get_experiment_by_name(experiment).experiment_id
    run = client.create_run(experiment_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()})
    flat = [Param(k, v) for k, v in flatten(params).items()]
    for i in range(0, len(flat), 100):
        client.log_batch(run.info.run_id, params=flat[i:i + 100])
    return TrackedRun(tracking_uri, experiment_id, run.info.run_id, ui_url, client)


class StepLogger:
    """A `Progress(on_step=[...])` callback: every step's train loss, learning rate, tokens/s and (at
    evaluations) validation loss, sent in batches; `flush()` sends what is left."""

    def __init__(self, run: TrackedRun, flush_seconds: float = 5.0):
        self.run, self.flush_seconds = run, flush_seconds
        self.pending: list = []
        self.last_flush = time.monotonic()
        self.steps_logged = 0

    def __call__(self, metrics: dict) -> None:
        from mlflow.entities import Metric

        from .progress import tokens_per_second

        now, step = int(time.time() * 1000), int(metrics["step"])
        values = {"train_loss": metrics["train_loss"], "lr": metrics.get("lr"),
                  "tokens_per_second": tokens_per_second(metrics), "val_loss": metrics.get("val_loss")}
        self.pending += [Metric(k, float(v), now, step) for k, v in values.items() if v is not None]
        self.steps_logged += 1
        if (metrics.get("val_loss") is not None or step >= metrics["total_steps"]
                or time.monotonic() - self.last_flush >= self.flush_seconds):
            self.flush()

    def flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:1000], self.pending[1000:]
            self.run.client.log_batch(self.run.run_id, metrics=batch)
        self.last_flush = time.monotonic()


def step_logger_from_env() -> StepLogger | None:
    """The step logger a training worker uses when its launcher passed an MLflow run (rank 0 only)."""
    run_id = os.environ.get(RUN_ID_ENV)
    if not run_id or int(os.environ.get("RANK", "0")) != 0:
        return None
    return StepLogger(TrackedRun(os.environ[URI_ENV], "", run_id))


def log_evaluation(run: TrackedRun, report: dict, files: list[Path], artifact_path: str = "evaluation") -> dict:
    """The evaluation report's metrics (`eval.<model>.<metric>`, `eval.promote`), their 95% intervals
    (`eval.<model>.<metric>.low` / `.high`), the candidate's differences with theirs
    (`eval.tuned_minus_base.<metric>`, `eval.tuned_minus_champion.<metric>`, each with `.low` / `.high`), the
    judged win rates (`eval.win_rate.tuned_vs_base`, `eval.win_rate.tuned_vs_champion`, with `.low` / `.high`)
    and the files, into the training run's MLflow run; returns the metrics logged."""
    metrics = {}
    intervals = report.get("intervals") or {}
    for model in ("base", "base_few_shot", "champion", "tuned"):
        for name, value in (report.get(model) or {}).items():
            metrics[f"eval.{model}.{name}"] = value
        for name, interval in ((intervals.get("models") or {}).get(model) or {}).items():
            if interval:
                metrics[f"eval.{model}.{name}.low"], metrics[f"eval.{model}.{name}.high"] = interval
    for difference, found in (intervals.get("differences") or {}).items():
        for name, d in found.items():
            metrics[f"eval.{difference}.{name}"] = d["value"]
            if d["interval"]:
                metrics[f"eval.{difference}.{name}.low"], metrics[f"eval.{difference}.{name}.high"] = d["interval"]
    for versus, found in ((report.get("win_rate") or {}).get("versus") or {}).items():
        metrics[f"eval.win_rate.tuned_vs_{versus}"] = found["value"]
        if found.get("interval"):
            metrics[f"eval.win_rate.tuned_vs_{versus}.low"], metrics[f"eval.win_rate.tuned_vs_{versus}.high"] = found["interval"]
    for model, values in ((report.get("retention") or {}).get("models") or {}).items():
        for name, value in (values or {}).items():
            metrics[f"eval.retention.{model}.{name}"] = value
    if decision := report.get("promotion"):
        metrics["eval.promote"] = 1.0 if decision.get("promote") else 0.0
    run.log_metrics(metrics)
    for path in files:
        run.log_artifact(path, artifact_path)
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
