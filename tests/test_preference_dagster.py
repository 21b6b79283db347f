"""The preference graph through Dagster on a real instance with the tiny random model: the demo spec's
wiring (assets/demo_preference.yaml) on generated demo data, its gates as checks, the cross-run guard
of the training assets, the rankings sensor, and the spec section's errors."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml
from preference_fixtures import one_torch_thread  # noqa: F401
from test_pipeline_dagster import ROOT, check_results, instance, materialized, metadata, run  # noqa: F401 (instance: fixture)

from sft_dagster.cli import run_summary, stage_names
from sft_dagster.defs import build_definitions
from sft_dagster.defs.automation import preference_job_name
from sft_dagster.preference.demo_data import generate_preference_demo
from sft_dagster.preference.rankings import append_rankings, read_rankings
from sft_dagster.spec import SpecError, load_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DATA_STAGES = ["candidate_generations", "ranking_queue", "preference_pairs"]


def write_preference_spec(tmp_path: Path, model_dir: Path, **overrides) -> Path:
    """assets/demo_preference.yaml on the tiny model and small demo data, with `overrides` (dotted keys)."""
    data = tmp_path / "data" / "demo_preference"
    if not data.exists():
        generate_preference_demo(data, n_prompts=24, seed=3)
        # Three prompts without written candidates: the model samples theirs.
        (tmp_path / "data" / "new_prompts.jsonl").write_text("".join(
            json.dumps({"question": q, "answer": a, "allowed_numbers": []}) + "\n"
            for q, a in [("Name a colour.", "red"), ("What is 9 + 1?", "10"), ("Say hello.", "hello")]))
    spec = yaml.safe_load((ROOT / "assets" / "demo_preference.yaml").read_text())
    spec["model"] = {"base": str(model_dir), "max_length": 256}
    spec["training"] |= {"epochs": 1, "batch_size": 16, "learning_rate": 0.005, "lora": {"r": 4, "alpha": 8}}
    spec["evaluation"] |= {"max_new_tokens": 4}
    spec["splits"] = {"validation": 0.2, "test": 0.25, "seed": 0}  # every split holds pairs of the 24 prompts
    pref = spec["preference"]
    pref["prompts"].append({"path": "../data/new_prompts.jsonl", "columns": {"prompt": "question"}})
    pref["generation"] = {"k": 2, "max_new_tokens": 8, "batch_size": 4}
    pref["ppo"] |= {"steps": 2, "batch_size": 4, "mini_batch_size": 2, "max_new_tokens": 8}
    pref["report"] |= {"max_prompts": 6, "max_new_tokens": 8}
    for dotted, value in overrides.items():
        node = spec
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path = tmp_path / "assets" / "spec.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(spec))
    return path


def test_candidates_queue_and_pairs_with_their_gates(tmp_path, tiny_model_dir, instance):
    spec = load_spec(write_preference_spec(tmp_path, tiny_model_dir))
    storage = tmp_path / "store"
    defs = build_definitions([spec], checks=ROOT / "data_checks", storage_root=storage, device="cpu")
    result = run(defs, spec, instance, DATA_STAGES, upstream=True)
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    assert {"candidate_generations", "preference_prompts", "candidates_quarantine", "ranking_queue", "preference_pairs",
            "preference_quarantine", "fine_tuned_adapter"} <= materialized(result)

    # Candidates: the demo writer's replies as written, plus K=2 seeded samples for each of the three new
    # prompts from the SFT adapter (no promoted model yet), written where `sft-dagster rank` reads them.
    written = pd.read_json(tmp_path / "data" / "demo_preference" / "candidates.jsonl", lines=True)
    candidates = pd.read_parquet(storage / spec.name / "preference" / "candidates.parquet")
    sampled = candidates[~candidates["candidate_id"].isin(written["candidate_id"])]
    assert sampled["prompt"].nunique() == 3 and len(sampled) <= 6
    assert sampled["model"].str.startswith("SFT adapter").all()
    meta = metadata(instance, spec, "candidate_generations")
    assert meta["prompts_with_written_candidates"] == 24 and meta["prompts_sampled"] == 3
    assert meta["written_candidates"] == len(written)

    # A later run keeps the sampled candidates (rankings point at them) and samples nothing.
    again = run(defs, spec, instance, ["candidate_generations"])
    assert again.success
    assert metadata(instance, spec, "candidate_generations")["prompts_sampled"] == 0
    assert metadata(instance, spec, "candidate_generations")["prompts_with_earlier_candidates"] == 3
    assert pd.read_parquet(storage / spec.name / "preference" / "candidates.parquet").equals(candidates)

    # The queue: every demo prompt was ranked, so only the three sampled prompts wait.
    queue = metadata(instance, spec, "ranking_queue")
    assert queue["prompts_to_rank"] == 3 and queue["rankings"] == len(read_rankings(spec.resolve("../data/demo_preference/rankings.jsonl")))
    assert "sft-dagster rank demo_preference" in queue["rank_command"] and "--rankings" in queue["rank_command"]

    # Pairs: the planted broken import rows are quarantined, identical and empty pairs are caught by their
    # (blocking, rate-tolerant) gates and quarantined too; everything is accounted for.
    checks = check_results(result)
    assert checks["preference_pairs:pairs_accounted_for"]
    assert checks["preference_pairs:identical_sides"] and checks["preference_pairs:empty_sides"]
    quarantine = pd.read_parquet(storage / spec.name / "tables" / "preference_quarantine.parquet")
    assert set(quarantine["reason"]) >= {"failed pair check identical_sides", "failed pair check empty_sides"}
    assert (quarantine["stage"] == "preference_ingest").sum() == 2  # missing side, broken JSON
    pairs = pd.read_parquet(storage / spec.name / "tables" / "preference_pairs.parquet")
    pair_meta = metadata(instance, spec, "preference_pairs")
    assert pair_meta["pairs_in"] == len(pairs) + pair_meta["pairs_quarantined"]
    assert set(pairs["split"]) == {"train", "validation", "test"}
    evaluated = {k.split(":")[1] for k in checks if k.startswith("preference_pairs:")}
    assert evaluated == {"identical_sides", "empty_sides", "ties", "over_length", "duplicates", "split_leakage",
                         "inconsistent_rankings", "length_bias", "ranker_agreement", "pairs_accounted_for"}


def test_a_failed_blocking_pair_gate_stops_preference_training_across_runs(tmp_path, tiny_model_dir, instance):
    # Zero tolerance for identical sides: the demo's planted identical pair fails the blocking gate.
    spec = load_spec(write_preference_spec(tmp_path, tiny_model_dir,
                                           **{"preference.gates.identical_sides": {"blocking": True, "max_rate": 0.0}}))
    defs = build_definitions([spec], checks=ROOT / "data_checks", storage_root=tmp_path / "store", device="cpu")
    first = run(defs, spec, instance, ["reward_model", "dpo_adapter"], upstream=True)
    assert check_results(first)["preference_pairs:identical_sides"] is False
    assert not materialized(first) & {"reward_model", "dpo_adapter", "ppo_policy"}

    # A later run of a training asset alone finds the pairs on disk but is refused by the cross-run guard.
    for stage in ("reward_model", "dpo_adapter"):
        second = run(defs, spec, instance, [stage])
        assert not second.success
        failure = "\n".join(str(e.event_specific_data.error) for e in second.all_events
                            if e.event_type_value == "STEP_FAILURE")
        assert "demo_preference/preference_pairs:identical_sides is FAILED" in failure, failure
        assert instance.get_latest_materialization_event(dg.AssetKey([spec.name, stage])) is None


def test_rankings_sensor_requests_pairs_and_downstream(tmp_path, tiny_model_dir, instance):
    spec = load_spec(write_preference_spec(tmp_path, tiny_model_dir))
    defs = build_definitions([spec], checks=ROOT / "data_checks", storage_root=tmp_path / "store", device="cpu")
    sensor = defs.resolve_sensor_def(f"{spec.name}_rankings_sensor")
    job = defs.resolve_job_def(preference_job_name(spec))
    assert sensor.job_name == job.name
    assert {k.path[-1] for k in job.asset_layer.selected_asset_keys} == {
        "preference_pairs", "preference_quarantine", "reward_model", "dpo_adapter", "ppo_policy", "preference_report",
        "preference_promoted_model"}
    resources = {"storage": defs.resources["storage"]}

    def tick(cursor):
        context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
        return sensor.evaluate_tick(context)

    first = tick(None)
    assert not first.run_requests and first.cursor is not None
    assert not tick(first.cursor).run_requests  # nothing changed
    rankings = spec.resolve("../data/demo_preference/rankings.jsonl")
    record = json.loads(rankings.read_text().splitlines()[0]) | {"author": "ana", "timestamp": "2026-11-25T10:00:00+00:00"}
    append_rankings(rankings, [record])
    changed = tick(first.cursor)
    assert len(changed.run_requests) == 1 and changed.run_requests[0].tags["sft_dagster/changed_files"] == "rankings.jsonl"
    assert not tick(changed.cursor).run_requests


def test_spec_section_errors_name_file_line_and_key(tmp_path, tiny_model_dir):
    path = write_preference_spec(tmp_path, tiny_model_dir)
    good = yaml.safe_load(path.read_text())

    def error(**changes) -> str:
        data = json.loads(json.dumps(good))
        for dotted, value in changes.items():
            node = data
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(SpecError) as exc:
            load_spec(path)
        return str(exc.value)

    text = error(**{"preference.dpo.beta": 0})
    line = next(i for i, l in enumerate(path.read_text().splitlines(), 1) if l.strip().startswith("beta:"))
    assert f"{path}:{line}: preference.dpo.beta: Input should be greater than 0" in text
    assert "preference.gates.ties.blocking" in error(**{"preference.gates.ties.blocking": "sometimes"})
    assert "preference.ppo: Value error, ppo.batch_size must be a multiple" in error(**{"preference.ppo.batch_size": 5})
    assert "preference.train.0" in error(**{"preference.train": ["sft"]})
    assert "not trained" in error(**{"preference.train": ["ppo"]})  # promotion.candidate dpo is not trained
    assert "preference.extra_key: Extra inputs are not permitted" in error(**{"preference.extra_key": 1})
    # Without the section the spec is an SFT pipeline: no preference assets at all.
    data = json.loads(json.dumps(good))
    del data["preference"]
    path.write_text(yaml.safe_dump(data))
    spec = load_spec(path)
    assert spec.preference is None
    keys = {k.path[-1] for k in build_definitions([spec], checks=ROOT / "data_checks",
                                                  storage_root=tmp_path / "s").resolve_asset_graph().get_all_asset_keys()}
    assert not keys & {"candidate_generations", "preference_pairs", "reward_model", "preference_report"}


def test_preference_graph_end_to_end_trains_reports_and_promotes(tmp_path, tiny_model_dir, instance):
    """The whole demo graph on the tiny model: reward model, DPO, PPO, the report and promotion through the
    SFT registry; a second run keeps every trained model (same lineage)."""
    spec = load_spec(write_preference_spec(tmp_path, tiny_model_dir, **{
        "preference.min_reward_accuracy": 0.0,  # a tiny random model after a few steps: the gate's wiring is tested
        "preference.promotion.max_task_metric_drop": 1.0}))
    storage = tmp_path / "store"
    defs = build_definitions([spec], checks=ROOT / "data_checks", storage_root=storage, device="cpu")
    result = run(defs, spec, instance)
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    assert {"reward_model", "dpo_adapter", "ppo_policy", "preference_report", "preference_promoted_model",
            "promoted_model"} <= materialized(result)
    checks = check_results(result)
    assert checks["reward_model:min_pairwise_accuracy"] and checks["preference_report:keeps_task_metric"]

    reward = metadata(instance, spec, "reward_model")
    assert reward["train_pairs"] > reward["validation_pairs"] > 0
    assert reward["pairwise_accuracy"] == metadata(instance, spec, "reward_model")["metrics"]["pairwise_accuracy"]
    ppo = metadata(instance, spec, "ppo_policy")
    assert len(ppo["metrics"]["history"]) == 2 and ppo["train_prompts"] > 0

    report = json.loads((storage / spec.name / "preference" / "report" / "preference_report.json").read_text())
    assert set(report["policies"]) == {"sft", "dpo", "ppo"}
    assert report["policies"]["sft"]["win_rate_vs_sft"] == 0.5  # SFT against itself: every prompt a tie
    for row in report["policies"].values():
        assert set(row) >= {"reward_score", "win_rate_vs_sft", "logprob_pairwise_accuracy", "task_exact_match",
                            "rule_satisfaction", "rule_correct"}
    assert report["held_out_prompts"] > 0 and report["held_out_pairs"] > 0
    assert len(report["samples"]) == 3 * 2 * min(5, report["held_out_prompts"])  # greedy and sample 0 of each
    # Rule rates of the sampled replies (8 per prompt by default), style and correctness apart, and each
    # trained policy's change from SFT with its bootstrap interval over the rated prompts.
    assert report["sampling"]["samples_per_prompt"] == 8 and report["sampling"]["temperature"] == 0.8
    for row in report["policies"].values():
        assert row["rule_replies"] == 8 * row["rule_prompts"] > 0
    assert set(report["vs_sft"]) == {"dpo", "ppo"}
    for measures in report["vs_sft"].values():
        assert {"reward_score", "rule_satisfaction", "rule_style", "rule_correct"} <= set(measures)
        change = measures["rule_style"]
        assert change["prompts"] == report["policies"]["sft"]["rule_prompts"]
        assert change["ci95_low"] <= change["difference"] <= change["ci95_high"]
    assert metadata(instance, spec, "preference_report")["skipped_report"] is False
    decision = report["promotion"]
    assert decision["candidate_policy"] == "dpo" and decision["promote"] and decision["required_gain"] == -1.0

    # The DPO adapter became the pipeline's champion, after SFT's own v1 (preference_promoted_model runs
    # after promoted_model: the asset graph's snapshot holds that dependency).
    promoted = metadata(instance, spec, "preference_promoted_model")
    lineage = json.loads((Path(promoted["path"]) / "lineage.json").read_text())
    assert lineage["preference_method"] == "dpo" and lineage["sft_adapter"]
    assert metadata(instance, spec, "promoted_model")["version"] == "v1" and promoted["version"] == "v2"
    assert (storage / "registry" / spec.name / "LATEST").read_text().strip() == promoted["version"]

    # The CLI's run summary shows the preference outcome beside SFT's.
    summary = run_summary(instance, spec, result.run_id, defs.resolve_asset_graph(),
                          stage_names(defs.resolve_job_def(f"{spec.name}_job")))
    pref = summary["preference"]
    assert pref["pairs_kept"] == len(pd.read_parquet(storage / spec.name / "tables" / "preference_pairs.parquet"))
    quarantine = pd.read_parquet(storage / spec.name / "tables" / "preference_quarantine.parquet")
    # The demo data plants an unreadable rankings line and a pair with a side missing: they are counted too.
    assert pref["records_quarantined"] == len(quarantine) > pref["pairs_quarantined"] > 0
    assert pref["reward_model_pairwise_accuracy"] == reward["pairwise_accuracy"]
    assert pref["policies"] == report["policies"] and pref["registry"] == promoted["path"]
    assert pref["vs_sft"] == report["vs_sft"]

    report_file = storage / spec.name / "preference" / "report" / "preference_report.json"
    first_bytes = report_file.read_bytes()
    again = run(defs, spec, instance, ["reward_model", "dpo_adapter", "ppo_policy", "preference_report",
                                       "evaluation_report", "promoted_model", "preference_promoted_model"])
    assert again.success
    # The SFT adapter does not challenge the policy tuned from it, nor take LATEST back: no new version.
    assert check_results(again)["evaluation_report:beats_champion"]
    assert metadata(instance, spec, "promoted_model")["version"] == promoted["version"] == "v2"
    assert metadata(instance, spec, "preference_promoted_model")["version"] == "v2"
    assert sorted(p.name for p in (storage / "registry" / spec.name).glob("v*")) == ["v1", "v2"]
    for stage in ("reward_model", "dpo_adapter", "ppo_policy"):
        assert metadata(instance, spec, stage)["skipped_training"] is True
    # Unchanged inputs: the report is read back, not recomputed; a changed report setting recomputes it.
    kept = metadata(instance, spec, "preference_report")
    assert kept["skipped_report"] is True and kept["seconds"] is None
    assert report_file.read_bytes() == first_bytes
    changed = load_spec(write_preference_spec(tmp_path, tiny_model_dir, **{
        "preference.min_reward_accuracy": 0.0, "preference.promotion.max_task_metric_drop": 1.0,
        "preference.report.samples_per_prompt": 2}))
    defs = build_definitions([changed], checks=ROOT / "data_checks", storage_root=storage, device="cpu")
    assert run(defs, changed, instance, ["preference_report"]).success
    recomputed = metadata(instance, changed, "preference_report")
    assert recomputed["skipped_report"] is False and recomputed["inputs_hash"] != kept["inputs_hash"]
    assert json.loads(report_file.read_text())["sampling"]["samples_per_prompt"] == 2


def test_a_policy_is_not_promoted_when_its_sft_adapter_lost_the_promotion_gate(tmp_path, tiny_model_dir, instance):
    """preference_promoted_model runs after promoted_model: when SFT's blocking `beats_champion` fails
    (here an impossible required gain), the DPO policy tuned from that adapter is trained and reported but
    not promoted, though its own `keeps_task_metric` check passes."""
    spec = load_spec(write_preference_spec(tmp_path, tiny_model_dir, **{
        "promotion.min_improvement": 2.0, "preference.train": ["dpo"], "preference.min_reward_accuracy": 0.0,
        "preference.promotion.max_task_metric_drop": 1.0}))
    storage = tmp_path / "store"
    defs = build_definitions([spec], checks=ROOT / "data_checks", storage_root=storage, device="cpu")
    result = run(defs, spec, instance)
    checks = check_results(result)
    assert checks["evaluation_report:beats_champion"] is False and checks["preference_report:keeps_task_metric"] is True
    assert {"dpo_adapter", "preference_report"} <= materialized(result)
    assert not {"promoted_model", "preference_promoted_model"} & materialized(result)
    assert not list((storage / "registry" / spec.name).glob("v*"))
