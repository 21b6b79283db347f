"""Experiment tracking: a pipeline run's training and evaluation in MLflow, and the nightly history."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from sft_dagster import registry
from sft_dagster.defs import build_definitions
from sft_dagster.evaluation import render_markdown
from sft_dagster.spec import load_spec
from sft_dagster.tracking import StepLogger, TrackedRun, flatten, start_run

from test_pipeline_dagster import ROOT, data_version, metadata, run, write_spec


@pytest.fixture()
def instance():
    import dagster as dg

    with dg.instance_for_test() as inst:
        yield inst


def test_training_and_evaluation_are_tracked_in_mlflow(tmp_path, tiny_model_dir, instance, mlflow_store):
    spec = load_spec(write_spec(tmp_path, tiny_model_dir, **{"training.epochs": 1, "training.eval_every_steps": 3}))
    storage = tmp_path / "store"
    defs = build_definitions([spec], checks=ROOT / "data_checks", storage_root=storage, device="cpu")
    result = run(defs, spec, instance)
    assert result.success, [e.message for e in result.all_events if e.is_failure]

    adapter = metadata(instance, spec, "fine_tuned_adapter")
    client = MlflowClient(mlflow_store)
    mlrun = client.get_run(adapter["mlflow_run_id"])
    assert adapter["mlflow_run"] == f"http://127.0.0.1:5000/#/experiments/{mlrun.info.experiment_id}/runs/{mlrun.info.run_id}"
    assert client.get_experiment(mlrun.info.experiment_id).name == spec.name
    assert mlrun.info.status == "FINISHED"
    params = mlrun.data.params
    assert params["training.learning_rate"] == str(spec.training.learning_rate)
    assert params["training.lora.r"] == "8"
    assert params["lineage_hash"] == adapter["lineage_hash"] == mlrun.data.tags["lineage_hash"]
    assert params["lineage.training_data_hash"] == adapter["lineage"]["training_data_hash"]
    assert params["lineage.libraries.torch"] == adapter["lineage"]["libraries"]["torch"]
    assert params["data_versions.dataset_splits"] == data_version(instance, spec, "dataset_splits")
    assert mlrun.data.tags["dagster_run_id"] == result.run_id

    # One point per optimizer step, validation loss at every evaluation, the same numbers as the trainer's.
    steps = adapter["metrics"]["steps"]
    loss = client.get_metric_history(mlrun.info.run_id, "train_loss")
    assert [m.step for m in loss] == list(range(1, steps + 1))
    assert loss[-1].value == pytest.approx(adapter["metrics"]["train_loss"], rel=1e-6)
    val = client.get_metric_history(mlrun.info.run_id, "val_loss")
    assert [m.step for m in val] == [h["step"] for h in adapter["metrics"]["val_loss_history"]]
    assert [m.value for m in val] == pytest.approx([h["val_loss"] for h in adapter["metrics"]["val_loss_history"]])
    assert len(client.get_metric_history(mlrun.info.run_id, "lr")) == steps
    assert all(m.value > 0 for m in client.get_metric_history(mlrun.info.run_id, "tokens_per_second"))

    # The evaluation lands in the same MLflow run: its metrics and the report as artifacts.
    report = json.loads((storage / spec.name / "reports" / "evaluation.json").read_text())
    evaluated = client.get_run(mlrun.info.run_id).data.metrics
    assert evaluated["eval.tuned.loss"] == pytest.approx(report["tuned"]["loss"])
    assert evaluated["eval.base.accuracy"] == pytest.approx(report["base"]["accuracy"])
    assert evaluated["eval.promote"] == (1.0 if report["promotion"]["promote"] else 0.0)
    artifacts = {Path(a.path).name for a in client.list_artifacts(mlrun.info.run_id, "evaluation")}
    assert artifacts == {"evaluation.json", "evaluation.md"}
    assert metadata(instance, spec, "evaluation_report")["mlflow_run_id"] == mlrun.info.run_id


def test_step_logger_batches_and_flushes(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tracked = start_run(uri, "exp", "r", {"training": {"lr": 0.1, "lora": {"r": 4}}, "tags": [1, 2]}, {"pipeline": "p"},
                        artifact_root=tmp_path / "artifacts", ui_url="http://ui:5000")
    logger = StepLogger(tracked, flush_seconds=3600)
    base = {"total_steps": 5, "lr": 0.1, "trained_tokens": 100, "seconds": 2.0, "validation_seconds": 1.0}
    logger({**base, "step": 1, "train_loss": 2.0})
    logger({**base, "step": 2, "train_loss": 1.5})
    assert len(logger.pending) == 6  # held back: no evaluation, not the last step, flush interval not reached
    assert tracked.client.get_metric_history(tracked.run_id, "train_loss") == []
    logger({**base, "step": 3, "train_loss": 1.2, "val_loss": 1.4})  # an evaluation sends everything
    assert [m.value for m in tracked.client.get_metric_history(tracked.run_id, "train_loss")] == [2.0, 1.5, 1.2]
    assert tracked.client.get_metric_history(tracked.run_id, "tokens_per_second")[0].value == pytest.approx(100.0)
    params = tracked.client.get_run(tracked.run_id).data.params
    assert params == {"training.lr": "0.1", "training.lora.r": "4", "tags": "[1, 2]"}
    assert TrackedRun.from_record(tracked.to_record()).url == f"http://ui:5000/#/experiments/{tracked.experiment_id}/runs/{tracked.run_id}"
    assert flatten({"a": {"b": "x" * 7000}})["a.b"] == "x" * 6000


def _promote(tmp_path: Path, registry_dir: Path, accuracy: float, seed: int) -> Path:
    adapter = tmp_path / f"adapter{seed}"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    report = {"task": "sentiment", "primary_metric": "accuracy", "n_test": 40, "base": {"accuracy": 0.3},
              "tuned": {"accuracy": accuracy, "loss": 1.0 - accuracy}}
    return registry.promote(adapter, registry_dir, report, {"seed": seed}, {"reason": "test"})


def test_report_lists_the_last_promoted_versions(tmp_path):
    registry_dir = tmp_path / "registry" / "p"
    for seed, accuracy in enumerate([0.70, 0.80, 0.75]):
        _promote(tmp_path, registry_dir, accuracy, seed)
    history = registry.history(registry_dir, 2)
    assert [v["version"] for v in history] == ["v3", "v2"]
    assert [v["metrics"]["accuracy"] for v in history] == [0.75, 0.80]
    assert [v["champion"] for v in history] == [True, False]
    assert history[0]["promoted_at"] == json.loads((registry_dir / "v3" / "promotion.json").read_text())["promoted_at"]
    assert registry.history(registry_dir, 0) == []

    report = {"pipeline": "p", "task": "sentiment", "n_test": 40, "primary_metric": "accuracy",
              "base": {"accuracy": 0.3}, "tuned": {"accuracy": 0.9}, "improvement": {}, "slices": {}, "samples": [],
              "history": history}
    md = render_markdown(report)
    assert "## Promoted versions (last 2, newest first)" in md
    assert "| version | promoted at | test rows | accuracy | loss |" in md
    assert f"| v3 (champion) | {history[0]['promoted_at']} | 40 | 0.7500 | 0.2500 |" in md


def test_evaluation_intervals_are_logged_beside_the_metrics():
    from test_promotion import translation_report

    from sft_dagster.tracking import log_evaluation

    class Run:
        logged: dict = {}

        def log_metrics(self, metrics):
            self.logged.update(metrics)

        def log_artifact(self, path, artifact_path=None):
            pass

    report = translation_report(range(32), champion=True)
    logged = log_evaluation(Run(), report, [])
    low, high = report["intervals"]["models"]["tuned"]["chrf"]
    assert (logged["eval.tuned.chrf.low"], logged["eval.tuned.chrf.high"]) == (low, high)
    difference = report["intervals"]["differences"]["tuned_minus_champion"]["bleu"]
    assert logged["eval.tuned_minus_champion.bleu"] == difference["value"]
    assert logged["eval.tuned_minus_champion.bleu.low"] == difference["interval"][0]
    assert "eval.tuned_minus_base.ter.high" in logged and logged["eval.champion.chrf"] == report["champion"]["chrf"]
