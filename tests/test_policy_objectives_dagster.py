"""The registered pair-trained policies (`training/objectives.py`: DPO, ORPO, KTO) as Dagster assets: each
`<name>_adapter` on the pairs, the SFT adapter and the base model, feeding the preference report and
promotion; ORPO and KTO trained and reported beside SFT through Dagster on the tiny model."""

from __future__ import annotations

import json

import pytest
from preference_fixtures import one_torch_thread  # noqa: F401
from test_pipeline_dagster import ROOT, check_results, instance, materialized, run  # noqa: F401 (instance: fixture)
from test_preference_dagster import write_preference_spec

from sft_dagster.defs import build_definitions
from sft_dagster.spec import load_spec
from sft_dagster.training.objectives import OBJECTIVES

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PAIR_POLICIES = [n for n, o in OBJECTIVES.items() if o.policy and o.method is not None]


def test_every_pair_trained_policy_is_an_asset_the_report_and_promotion_take(tmp_path, tiny_model_dir):
    assert {"dpo", "orpo", "kto"} <= set(PAIR_POLICIES)
    for candidate in PAIR_POLICIES:
        spec = load_spec(write_preference_spec(tmp_path, tiny_model_dir, **{
            "preference.train": [*PAIR_POLICIES, "ppo"], "preference.promotion.candidate": candidate}))
        graph = build_definitions([spec], checks=ROOT / "data_checks",
                                  storage_root=tmp_path / "store").resolve_asset_graph()
        deps = {key.path[-1]: {k.path[-1] for k in graph.get(key).parent_keys} for key in graph.get_all_asset_keys()}
        for name in PAIR_POLICIES:
            assert deps[f"{name}_adapter"] == {"preference_pairs", "base_model", "fine_tuned_adapter"}
        assert {f"{n}_adapter" for n in PAIR_POLICIES} | {"ppo_policy"} <= deps["preference_report"]
        assert f"{candidate}_adapter" in deps["preference_promoted_model"]


def test_orpo_and_kto_train_and_are_reported_beside_sft(tmp_path, tiny_model_dir, instance):
    """The report and what it needs only (not SFT's evaluation and promotion, which the other end-to-end
    tests run): the report's promotion decision for KTO is computed, as the promotion asset reads it."""
    spec = load_spec(write_preference_spec(tmp_path, tiny_model_dir, **{
        "preference.train": ["orpo", "kto"], "preference.orpo": {"beta": 0.2, "batch_size": 2},
        "preference.kto": {"beta": 0.1, "batch_size": 2, "learning_rate": 0.0003},
        "preference.promotion.candidate": "kto", "preference.min_reward_accuracy": 0.0,
        "preference.promotion.max_task_metric_drop": 1.0}))
    storage = tmp_path / "store"
    defs = build_definitions([spec], checks=ROOT / "data_checks", storage_root=storage, device="cpu")
    result = run(defs, spec, instance, ["preference_report"], upstream=True)
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    assert {"orpo_adapter", "kto_adapter", "preference_report"} <= materialized(result)
    assert not {"dpo_adapter", "ppo_policy", "evaluation_report"} & materialized(result)
    report = json.loads((storage / spec.name / "preference" / "report" / "preference_report.json").read_text())
    assert set(report["policies"]) == {"sft", "orpo", "kto"}
    for name in ("orpo", "kto"):
        record = json.loads(next((storage / spec.name / "preference" / name).glob("*/record.json")).read_text())
        assert record["method"] == name and record["metrics"]["steps"] > 0
        assert report["policies"][name]["lineage_hash"] == record["lineage_hash"]
    assert check_results(result)["preference_report:keeps_task_metric"] is True
    assert report["promotion"]["candidate_policy"] == "kto" and report["promotion"]["promote"]
