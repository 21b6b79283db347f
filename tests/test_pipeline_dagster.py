"""The whole asset graph in-process, on a real Dagster instance, with the tiny random model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml

from sft_dagster.demo_data import generate_demo_dataset
from sft_dagster.defs import build_definitions
from sft_dagster.defs.automation import job_name
from sft_dagster.labels import append_corrections
from sft_dagster.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def write_spec(tmp_path: Path, model_dir: Path, **overrides) -> Path:
    data = tmp_path / "data"
    if not data.exists():
        generate_demo_dataset(data, n_rows=240, seed=1, error_rate=0.05)
    spec = {
        "name": "tiny_sentiment",
        "task": {"type": "sentiment", "labels": ["negative", "neutral", "positive"],
                 "prompt_template": "Sentiment of: {prompt}"},
        "sources": [
            {"path": "data/*.jsonl", "columns": {"prompt": "text", "response": "label"}},
            {"path": "data/*.csv", "columns": {"prompt": "review_text", "response": "sentiment"}},
        ],
        "quality": {"suite": "sentiment", "cleanlab": {"folds": 3, "max_label_issue_rate": 0.2},
                    "audit_file": "data/truth/planted_label_errors.csv"},
        "model": {"base": str(model_dir), "max_length": 256},
        "training": {"method": "lora", "epochs": 2, "learning_rate": 0.005, "batch_size": 16,
                     "lora": {"r": 8, "alpha": 16}, "checkpoint_every_steps": 10},
        "evaluation": {"max_new_tokens": 3, "num_samples": 3, "few_shot_k": 2, "retention_examples": 18},
        "promotion": {"metric": "loss", "min_improvement": 0.0},
    }
    for dotted, value in overrides.items():
        node = spec
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run(defs: dg.Definitions, spec, instance, stages: list[str] | None = None, upstream: bool = False):
    """A run of the pipeline's job: every asset, or `stages` (and, with `upstream`, everything they need)."""
    job = defs.resolve_job_def(job_name(spec))
    selection = None
    if stages:
        chosen = dg.AssetSelection.assets(*[dg.AssetKey([spec.name, s]) for s in stages])
        chosen = chosen.upstream() if upstream else chosen
        selection = list(chosen.required_multi_asset_neighbors().resolve(defs.resolve_asset_graph()))
    return job.execute_in_process(instance=instance, asset_selection=selection, raise_on_error=False)


def materialized(result) -> set[str]:
    return {e.asset_key.path[-1] for e in result.all_events if e.event_type_value == "ASSET_MATERIALIZATION"}


def check_results(result) -> dict[str, bool]:
    return {
        f"{e.event_specific_data.asset_key.path[-1]}:{e.event_specific_data.check_name}": e.event_specific_data.passed
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }


def checks_by_key(result) -> dict[str, bool]:
    """Check results by the whole asset key (`pipeline/asset:check`), for graphs with several pipelines."""
    return {f"{e.event_specific_data.asset_key.to_user_string()}:{e.event_specific_data.check_name}":
            e.event_specific_data.passed for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"}


def data_version(instance, spec, asset: str) -> str:
    record = instance.get_latest_data_version_record(dg.AssetKey([spec.name, asset]))
    return record.asset_materialization.tags["dagster/data_version"]


def metadata(instance, spec, asset: str) -> dict:
    event = instance.get_latest_materialization_event(dg.AssetKey([spec.name, asset]))
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


@pytest.fixture()
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def test_full_graph_trains_evaluates_and_promotes(tmp_path, tiny_model_dir, instance):
    spec = load_spec(write_spec(tmp_path, tiny_model_dir))
    storage = tmp_path / "store"
    defs = build_definitions([spec], checks=ROOT / "data_checks", storage_root=storage, device="cpu")
    result = run(defs, spec, instance)
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    assert materialized(result) == {
        "raw_examples", "ingest_quarantine", "label_corrections", "labelled_examples", "labels_quarantine",
        "label_issues", "curated_examples", "curation_quarantine", "quarantine", "dataset_splits", "base_model",
        "fine_tuned_adapter", "evaluation_report", "promoted_model",
    }
    checks = check_results(result)
    assert checks["quarantine:rows_accounted_for"] and checks["dataset_splits:no_leakage_across_splits"]
    assert checks["evaluation_report:beats_champion"]

    raw = metadata(instance, spec, "raw_examples")
    quarantine = pd.read_parquet(storage / spec.name / "tables" / "quarantine.parquet")
    curated = pd.read_parquet(storage / spec.name / "tables" / "curated_examples.parquet")
    assert raw["rows_read"] == len(curated) + len(quarantine)
    assert {"ingest", "curation"} <= set(quarantine["stage"])

    adapter = metadata(instance, spec, "fine_tuned_adapter")
    lineage = adapter["lineage"]
    assert set(lineage) >= {"training_data_hash", "base_model_hash", "tokenizer_hash", "spec_fingerprint", "code_version"}
    assert adapter["preflight"]["optimizer_steps"] > 0
    assert "step" in adapter["loss_curve"].splitlines()[0] and "val_loss" in adapter["loss_curve"].splitlines()[0]
    progress_lines = [e.user_message for e in instance.all_logs(result.run_id) if "training progress:" in (e.user_message or "")]
    assert progress_lines and progress_lines[-1].startswith(f"training progress: step {adapter['metrics']['steps']}/")
    assert (Path(adapter["adapter_dir"]) / "adapter_config.json").exists()

    report = json.loads((storage / spec.name / "reports" / "evaluation.json").read_text())
    assert report["tuned"]["loss"] < report["base"]["loss"]
    seconds = metadata(instance, spec, "evaluation_report")["seconds_by_part"]  # where the stage's time went
    assert {"load", "zero_shot"} <= set(seconds["base"]) and {"load", "zero_shot"} <= set(seconds["tuned"])
    assert seconds == report["seconds_by_part"] and "## Evaluation cost" in (storage / spec.name / "reports" / "evaluation.md").read_text()
    assert (storage / "registry" / spec.name / "v1" / "MODEL_CARD.md").exists()
    audit = metadata(instance, spec, "label_issues")["audit"]
    assert audit["known_errors"] > 0 and 0 <= audit["recall"] <= 1

    # A second run on unchanged data keeps the adapter: same lineage, no retraining.
    again = run(defs, spec, instance)
    assert again.success
    assert metadata(instance, spec, "fine_tuned_adapter")["skipped_training"] is True
    assert metadata(instance, spec, "fine_tuned_adapter")["lineage_hash"] == adapter["lineage_hash"]
    assert metadata(instance, spec, "evaluation_report")["skipped_evaluation"] is True
    assert sorted((storage / "registry" / spec.name).glob("v*")) == [storage / "registry" / spec.name / "v1"]


def test_failed_blocking_gate_stops_training_across_runs(tmp_path, tiny_model_dir, instance):
    gate_blocks_training_across_runs(tmp_path, tiny_model_dir, instance)


def gate_blocks_training_across_runs(tmp_path, tiny_model_dir, instance) -> None:
    """Data stages pass, a stricter gate then fails, and a later run of training alone is refused
    (also run against a PostgreSQL instance in test_postgres.py)."""
    data_stages = ["raw_examples", "label_corrections", "labelled_examples", "label_issues", "curated_examples",
                   "quarantine", "dataset_splits"]
    # Data that passed its gates once: splits exist on disk from that run.
    spec = load_spec(write_spec(tmp_path, tiny_model_dir))
    defs = build_definitions([spec], checks=ROOT / "data_checks", storage_root=tmp_path / "store", device="cpu")
    assert run(defs, spec, instance, data_stages).success

    # Zero tolerance for label issues: the planted errors now fail the blocking cleanlab gate, and the
    # stages below it are skipped inside the run.
    strict = load_spec(write_spec(tmp_path, tiny_model_dir, **{"quality.cleanlab.max_label_issue_rate": 0.0}))
    defs = build_definitions([strict], checks=ROOT / "data_checks", storage_root=tmp_path / "store", device="cpu")
    first = run(defs, strict, instance)
    assert check_results(first)["label_issues:label_issue_rate"] is False
    assert not materialized(first) & {"curated_examples", "fine_tuned_adapter", "evaluation_report"}

    # A later run that selects only the training stage finds the old splits but is refused by the cross-run guard.
    second = run(defs, strict, instance, stages=["fine_tuned_adapter"])
    assert not second.success
    failure = "\n".join(str(e.event_specific_data.error) for e in second.all_events if e.event_type_value == "STEP_FAILURE")
    assert "label_issues:label_issue_rate is FAILED" in failure
    assert instance.get_latest_materialization_event(dg.AssetKey([spec.name, "fine_tuned_adapter"])) is None


def test_a_stage_whose_inputs_were_never_materialized_says_so(tmp_path, tiny_model_dir, instance):
    spec = load_spec(write_spec(tmp_path, tiny_model_dir))
    defs = build_definitions([spec], checks=ROOT / "data_checks", storage_root=tmp_path / "store", device="cpu")
    result = run(defs, spec, instance, stages=["fine_tuned_adapter"])
    assert not result.success
    failure = "\n".join(str(e.event_specific_data.error) for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert re.search(r"tiny_sentiment/(dataset_splits|base_model) has never been materialized", failure), failure


def test_corrections_file_change_flows_through(tmp_path, tiny_model_dir, instance):
    corrections = tmp_path / "labels" / "corrections.csv"
    spec = load_spec(write_spec(tmp_path, tiny_model_dir, **{"labels.corrections_file": str(corrections)}))
    defs = build_definitions([spec], checks=ROOT / "data_checks", storage_root=tmp_path / "store", device="cpu")
    stages = ["raw_examples", "label_corrections", "labelled_examples"]
    assert run(defs, spec, instance, stages).success
    version_before = data_version(instance, spec, "label_corrections")
    labelled = pd.read_parquet(tmp_path / "store" / spec.name / "tables" / "labelled_examples.parquet")
    target = labelled.iloc[0]
    new_label = next(lab for lab in spec.task.labels if lab != target["response"])
    append_corrections(corrections, [
        {"example_id": target["example_id"], "action": "relabel", "new_value": new_label, "note": "test"},
        {"example_id": labelled.iloc[1]["example_id"], "action": "drop", "note": "not a review"},
    ])
    assert run(defs, spec, instance, stages).success
    assert data_version(instance, spec, "label_corrections") != version_before
    after = pd.read_parquet(tmp_path / "store" / spec.name / "tables" / "labelled_examples.parquet").set_index("example_id")
    assert after.loc[target["example_id"], "response"] == new_label
    assert after.loc[target["example_id"], "label_source"] == "correction"
    assert labelled.iloc[1]["example_id"] not in after.index
    assert len(after) == len(labelled) - 1


def test_cli_rejects_a_bad_spec_before_running(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntask:\n  type: sentiment\n  labels: [a]\nsources: []\n")
    out = subprocess.run([sys.executable, "-m", "sft_dagster.cli", "run", str(bad)], capture_output=True, text=True,
                         env={**os.environ, "DAGSTER_HOME": str(tmp_path / "home")})
    assert out.returncode == 2
    assert f"{bad}:5: sources" in out.stderr
    assert not (tmp_path / "home").exists()


def test_definitions_validate_on_workspace(tmp_path):
    out = subprocess.run([str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "DAGSTER_HOME": str(tmp_path)})
    assert out.returncode == 0, out.stdout + out.stderr


def test_training_through_pipes_and_torchrun(tmp_path, tiny_model_dir, instance):
    spec = load_spec(write_spec(tmp_path, tiny_model_dir, **{"training.launcher": "subprocess",
                                                             "training.num_processes": 2, "training.epochs": 1}))
    defs = build_definitions([spec], checks=ROOT / "data_checks", storage_root=tmp_path / "store", device="cpu")
    result = run(defs, spec, instance, ["raw_examples", "label_corrections", "labelled_examples", "label_issues",
                                        "curated_examples", "quarantine", "dataset_splits", "base_model",
                                        "fine_tuned_adapter"])
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    adapter = metadata(instance, spec, "fine_tuned_adapter")
    assert adapter["metrics"]["processes"] == 2
    assert (Path(adapter["adapter_dir"]) / "adapter_model.safetensors").exists()
    logs = instance.all_logs(result.run_id)
    assert any("launching:" in (e.user_message or "") and "torchrun" in e.user_message for e in logs)
    # The worker (rank 0) logged every optimizer step to the MLflow run the asset opened (MLFLOW_TRACKING_URI).
    from mlflow import MlflowClient

    history = MlflowClient().get_metric_history(adapter["mlflow_run_id"], "train_loss")
    assert [m.step for m in history] == list(range(1, adapter["metrics"]["steps"] + 1))


def test_cleanlab_disabled_in_the_spec_runs_no_cleanlab_and_says_so(tmp_path, tiny_model_dir, instance):
    spec = load_spec(write_spec(tmp_path, tiny_model_dir, **{"quality.cleanlab.enabled": False,
                                                             "quality.cleanlab.max_label_issue_rate": 0.0}))
    defs = build_definitions([spec], checks=ROOT / "data_checks", storage_root=tmp_path / "store", device="cpu")
    result = run(defs, spec, instance, ["raw_examples", "label_corrections", "labelled_examples", "label_issues",
                                        "curated_examples", "quarantine", "dataset_splits"])
    assert result.success
    checks = check_results(result)
    # zero tolerance would fail on the planted errors if cleanlab ran; disabled, its gates pass saying why
    assert checks["label_issues:label_issue_rate"] is True and checks["label_issues:issue_types_evaluated"] is True
    descriptions = {e.event_specific_data.check_name: e.event_specific_data.description for e in result.all_events
                    if e.event_type_value == "ASSET_CHECK_EVALUATION" and e.event_specific_data.asset_key.path[-1] == "label_issues"}
    assert all("disabled in the spec" in d for d in descriptions.values()), descriptions
    meta = metadata(instance, spec, "label_issues")
    assert "disabled" in meta["status"] and meta["review_queue_rows"] == 0
    curated = metadata(instance, spec, "curated_examples")
    assert "label issue" not in json.dumps(curated.get("quarantine_reasons", {}))


def test_multi_task_spec_gates_each_task_and_reports_each_task(tmp_path, tiny_model_dir, instance):
    """A second task with its own data, template and gates: its failing gate blocks the one adapter;
    once it passes, one adapter is trained on the mix and the report has a section per task."""
    generate_demo_dataset(tmp_path / "data2", n_rows=240, seed=2, error_rate=0.05)
    second = {"name": "reviews", "weight": 2.0,
              "task": {"type": "sentiment", "labels": ["negative", "neutral", "positive"],
                       "prompt_template": "Classify the review: {prompt}"},
              "sources": [{"path": "data2/*.jsonl", "columns": {"prompt": "text", "response": "label"}},
                          {"path": "data2/*.csv", "columns": {"prompt": "review_text", "response": "sentiment"}}],
              "quality": {"suite": "sentiment", "cleanlab": {"folds": 3, "max_label_issue_rate": 0.0}}}
    overrides = {"training.epochs": 1, "evaluation.few_shot_k": 0, "evaluation.retention_examples": 0, "evaluation.max_examples": 8,
                 "mixing": {"strategy": "temperature", "temperature": 2.0}}
    strict = load_spec(write_spec(tmp_path, tiny_model_dir, tasks=[second], **overrides))
    defs = build_definitions([strict], checks=ROOT / "data_checks", storage_root=tmp_path / "store", device="cpu")
    blocked = run(defs, strict, instance)
    checks = checks_by_key(blocked)
    assert checks[f"{strict.name}__reviews/label_issues:label_issue_rate"] is False  # the second task's own gate
    assert checks[f"{strict.name}/label_issues:label_issue_rate"] is True  # the main task's passed
    assert not materialized(blocked) & {"task_mix", "fine_tuned_adapter", "evaluation_report"}
    sub = dg.AssetKey([f"{strict.name}__reviews", "label_issues"])
    assert instance.get_latest_materialization_event(sub) is not None

    second["quality"]["cleanlab"]["max_label_issue_rate"] = 0.3
    spec = load_spec(write_spec(tmp_path, tiny_model_dir, tasks=[second], **overrides))
    defs = build_definitions([spec], checks=ROOT / "data_checks", storage_root=tmp_path / "store", device="cpu")
    result = run(defs, spec, instance)
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    assert {"task_mix", "fine_tuned_adapter", "evaluation_report"} <= materialized(result)
    # Every task keeps its own quarantine accounting.
    for name in (spec.name, f"{spec.name}__reviews"):
        assert instance.get_latest_materialization_event(dg.AssetKey([name, "quarantine"])) is not None
    checks = checks_by_key(result)
    assert checks[f"{spec.name}/quarantine:rows_accounted_for"] and checks[f"{spec.name}__reviews/quarantine:rows_accounted_for"]
    adapter = metadata(instance, spec, "fine_tuned_adapter")
    assert set(adapter["metrics"]["task_rows"]) == {"main", "reviews"}
    report = json.loads((tmp_path / "store" / spec.name / "reports" / "evaluation.json").read_text())
    assert set(report["tasks"]) == {"main", "reviews"} and set(report["mix"]["tasks"]) == {"main", "reviews"}
    splits = pd.read_parquet(tmp_path / "store" / f"{spec.name}__reviews" / "splits" / "test.parquet")
    assert report["tasks"]["reviews"]["n_test"] == 8 < len(splits)  # evaluation.max_examples of its own test split
    assert {s["example_id"] for s in report["tasks"]["reviews"]["samples"]} <= set(splits["example_id"])
    assert set(report["promotion"]["tasks"]) == {"main", "reviews"}
    assert "## Tasks (one adapter for all)" in metadata(instance, spec, "evaluation_report")["report"]
