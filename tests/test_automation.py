"""Schedule and sensors: nightly cron from the spec, data-change runs, failed-gate alerts."""

from __future__ import annotations

import json

import dagster as dg

from sft_dagster.defs import build_definitions
from sft_dagster.defs.resources import SFTStorage
from sft_dagster.spec import load_spec

from test_pipeline_dagster import ROOT, check_results, run, write_spec


def test_schedule_takes_cron_from_spec(tmp_path, tiny_model_dir):
    spec = load_spec(write_spec(tmp_path, tiny_model_dir, **{"schedule.cron": "30 3 * * 1"}))
    defs = build_definitions([spec], checks=ROOT / "data_checks", storage_root=tmp_path / "store")
    schedule = defs.resolve_schedule_def(f"{spec.name}_nightly")
    assert schedule.cron_schedule == "30 3 * * 1"
    assert schedule.job_name == f"{spec.name}_job"


def test_data_change_sensor_runs_on_new_or_changed_files(tmp_path, tiny_model_dir):
    spec = load_spec(write_spec(tmp_path, tiny_model_dir))
    defs = build_definitions([spec], checks=ROOT / "data_checks", storage_root=tmp_path / "store")
    sensor = defs.resolve_sensor_def(f"{spec.name}_data_change_sensor")
    storage = SFTStorage(root=str(tmp_path / "store"))
    with dg.instance_for_test() as instance:
        ctx = dg.build_sensor_context(instance=instance, resources={"storage": storage})
        first = sensor(ctx)
        assert isinstance(first, dg.SkipReason) and "watching 2 files" in first.skip_message
        ctx = dg.build_sensor_context(instance=instance, cursor=ctx.cursor, resources={"storage": storage})
        assert isinstance(sensor(ctx), dg.SkipReason)  # nothing changed
        (tmp_path / "data" / "extra.jsonl").write_text(json.dumps({"text": "new", "label": "neutral"}) + "\n")
        ctx = dg.build_sensor_context(instance=instance, cursor=ctx.cursor, resources={"storage": storage})
        request = sensor(ctx)
        assert isinstance(request, dg.RunRequest)
        assert "extra.jsonl" in request.tags["sft_dagster/changed_files"]


def test_failed_gate_sensor_alerts_once(tmp_path, tiny_model_dir):
    spec = load_spec(write_spec(tmp_path, tiny_model_dir, **{"quality.cleanlab.max_label_issue_rate": 0.0}))
    store = tmp_path / "store"
    defs = build_definitions([spec], checks=ROOT / "data_checks", storage_root=store)
    sensor = defs.resolve_sensor_def(f"{spec.name}_failed_quality_gate_sensor")
    storage = SFTStorage(root=str(store))
    with dg.instance_for_test() as instance:
        result = run(defs, spec, instance, ["raw_examples", "label_corrections", "labelled_examples", "label_issues"])
        assert check_results(result)["label_issues:label_issue_rate"] is False
        ctx = dg.build_sensor_context(instance=instance, resources={"storage": storage})
        sensor(ctx)
        alerts = [json.loads(line) for line in (store / "alerts.jsonl").read_text().splitlines()]
        assert f"{spec.name}/label_issues:label_issue_rate" in [a["check"] for a in alerts]
        ctx = dg.build_sensor_context(instance=instance, cursor=ctx.cursor, resources={"storage": storage})
        sensor(ctx)  # the same failure is not reported twice
        assert len((store / "alerts.jsonl").read_text().splitlines()) == len(alerts)
