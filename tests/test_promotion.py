"""Nightly trust: champion / challenger promotion, a report tied to its adapter, lineage that retrains."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from sft_dagster.defs import build_definitions
from sft_dagster.spec import load_spec

from test_pipeline_dagster import ROOT, check_results, materialized, metadata, run, write_spec


@pytest.fixture()
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def pipeline(tmp_path, tiny_model_dir, **training):
    """The tiny pipeline with promotion on validation loss (it moves reliably on a tiny model)."""
    overrides = {f"training.{k}": v for k, v in training.items()}
    spec = load_spec(write_spec(tmp_path, tiny_model_dir, **overrides))
    return spec, build_definitions([spec], checks=ROOT / "data_checks", storage_root=tmp_path / "store", device="cpu")


def registry_versions(tmp_path, spec) -> list[str]:
    return sorted(p.name for p in (tmp_path / "store" / "registry" / spec.name).glob("v*"))


def latest(tmp_path, spec) -> str:
    return (tmp_path / "store" / "registry" / spec.name / "LATEST").read_text().strip()


def test_champion_challenger_promotion(tmp_path, tiny_model_dir, instance):
    # v1: barely trained (one step at a tiny learning rate): close to the base model.
    spec, defs = pipeline(tmp_path, tiny_model_dir, max_steps=1, learning_rate=1e-7)
    first = run(defs, spec, instance)
    assert first.success and "promoted_model" in materialized(first)
    report = metadata(instance, spec, "evaluation_report")
    assert report["champion_version"] is None  # the first promotion compares with the base model
    assert "base model" in report["decision"]
    assert registry_versions(tmp_path, spec) == ["v1"]

    # A properly trained candidate: scored against champion v1 on the same rows, and promoted as v2.
    spec, defs = pipeline(tmp_path, tiny_model_dir)
    second = run(defs, spec, instance)
    assert check_results(second)["evaluation_report:beats_champion"] is True
    report = json.loads((tmp_path / "store" / spec.name / "reports" / "evaluation.json").read_text())
    assert report["champion_version"] == "v1" and report["champion"]["loss"] > report["tuned"]["loss"]
    assert report["promotion"]["compared_with"] == "champion v1"
    assert report["n_test"] > 0 and set(report["samples"][0]) >= {"base", "champion", "tuned"}
    assert registry_versions(tmp_path, spec) == ["v1", "v2"] and latest(tmp_path, spec) == "v2"
    card = (tmp_path / "store" / "registry" / spec.name / "v2" / "MODEL_CARD.md").read_text()
    assert "champion v1" in card and "torch" in card

    # A nightly regression: it beats the base model but not champion v2, so it is not promoted.
    spec, defs = pipeline(tmp_path, tiny_model_dir, max_steps=1, learning_rate=1e-7, seed=3)
    third = run(defs, spec, instance)
    assert check_results(third)["evaluation_report:beats_champion"] is False
    assert "promoted_model" not in materialized(third)
    report = metadata(instance, spec, "evaluation_report")
    assert report["champion_version"] == "v2" and "does not beat champion v2" in report["decision"]
    assert registry_versions(tmp_path, spec) == ["v1", "v2"] and latest(tmp_path, spec) == "v2"

    # Unchanged inputs the next night: the champion is the candidate; nothing is retrained or promoted again.
    spec, defs = pipeline(tmp_path, tiny_model_dir)
    fourth = run(defs, spec, instance)
    assert fourth.success
    assert metadata(instance, spec, "fine_tuned_adapter")["skipped_training"] is True
    assert registry_versions(tmp_path, spec) == ["v1", "v2"]


def test_promotion_refuses_an_adapter_the_report_was_not_made_for_and_upgrades_retrain(
        tmp_path, tiny_model_dir, instance, monkeypatch):
    from sft_dagster.defs import training as training_defs

    spec, defs = pipeline(tmp_path, tiny_model_dir, epochs=1)
    assert run(defs, spec, instance).success
    assert registry_versions(tmp_path, spec) == ["v1"]
    # The adapter is retrained (other settings) after the last evaluation; then promotion alone is asked for.
    spec, defs = pipeline(tmp_path, tiny_model_dir, epochs=1, seed=7)
    assert run(defs, spec, instance, ["fine_tuned_adapter"]).success
    refused = run(defs, spec, instance, ["promoted_model"])
    assert not refused.success
    failure = "\n".join(str(e.event_specific_data.error) for e in refused.all_events if e.event_type_value == "STEP_FAILURE")
    assert "the evaluation report is for adapter" in failure
    assert registry_versions(tmp_path, spec) == ["v1"]

    # Unchanged inputs keep the adapter; a library upgrade is a new lineage and retrains.
    before = metadata(instance, spec, "fine_tuned_adapter")
    assert run(defs, spec, instance, ["fine_tuned_adapter"]).success
    assert metadata(instance, spec, "fine_tuned_adapter")["skipped_training"] is True
    upgraded = training_defs.library_versions() | {"transformers": "99.0.0"}
    monkeypatch.setattr(training_defs, "library_versions", lambda: upgraded)
    assert run(defs, spec, instance, ["fine_tuned_adapter"]).success
    after = metadata(instance, spec, "fine_tuned_adapter")
    assert after["skipped_training"] is False and after["lineage_hash"] != before["lineage_hash"]
    assert after["lineage"]["libraries"]["transformers"] == "99.0.0"


def translation_report(tuned_right: range, champion: bool = False, rows: int = 40) -> dict:
    """A translation report on `rows` rows: the reference model (the base model, or champion v1) translates
    rows 0-19 and leaves the others untranslated; the candidate translates the rows `tuned_right`."""
    import pandas as pd

    from sft_dagster import metrics
    from sft_dagster.evaluation import ModelScores, build_report, references
    from sft_dagster.spec import PipelineSpec

    spec = PipelineSpec.model_validate({"name": "t", "task": {"type": "translation"}, "sources": [{"path": "x"}]})
    sources = [f"the {a} {b} is on the {c}" for a in ("red", "small", "old", "big") for b in ("cat", "dog")
               for c in ("mat", "roof", "bed", "car", "road")][:rows]
    targets = [s.replace("the", "le").replace("is on", "est sur") for s in sources]
    test = pd.DataFrame({"example_id": [f"r{i:02d}" for i in range(rows)], "prompt": sources, "response": targets,
                         "system": [None] * rows})

    def scored(right: range) -> ModelScores:
        outputs = [targets[i] if i in right else sources[i] for i in range(rows)]
        return ModelScores(predictions=outputs, raw_outputs=outputs, loss=1.0,
                           metrics=metrics.score(metrics.Rows("translation", outputs, references(test))))

    reference = scored(range(20))
    if champion:
        return build_report(test, scored(range(0)), scored(tuned_right), spec, reference, "v1")
    return build_report(test, reference, scored(tuned_right), spec)


@pytest.mark.parametrize("champion", [False, True])
def test_require_significant_refuses_a_gain_whose_interval_does_not_clear_the_margin(champion):
    from sft_dagster.registry import promotion_decision

    barely = translation_report(range(2, 23), champion)  # 3 rows better than the reference model, 2 worse
    plain = promotion_decision(barely, "chrf", 0.0)
    assert plain["promote"] and plain["gain"] > 0  # the point estimate alone would promote
    decision = promotion_decision(barely, "chrf", 0.0, require_significant=True)
    assert not decision["promote"]
    low, high = decision["gain_interval"]
    assert low <= 0 < high and f"[{low:+.4f}, {high:+.4f}] does not clear +0.0000" in decision["reason"]
    assert decision["compared_with"] == ("champion v1" if champion else "base model")

    clear = promotion_decision(translation_report(range(32), champion), "chrf", 0.0, require_significant=True)
    assert clear["promote"] and clear["gain_interval"][0] > 0 and "clears +0.0000" in clear["reason"]
    # TER is lower-is-better: the same candidate's gain interval is positive too
    assert promotion_decision(translation_report(range(32), champion), "ter", 0.0, require_significant=True)["promote"]
    # a margin above the interval's lower end refuses again
    margin = clear["gain_interval"][0] + 1.0
    assert not promotion_decision(translation_report(range(32), champion), "chrf", margin, require_significant=True)["promote"]


def test_require_significant_refuses_a_report_without_intervals():
    from sft_dagster.registry import promotion_decision

    report = {"tuned": {"chrf": 40.0}, "base": {"chrf": 20.0}, "primary_metric": "chrf"}
    assert promotion_decision(report, "chrf", 0.0)["promote"]
    refused = promotion_decision(report, "chrf", 0.0, require_significant=True)
    assert not refused["promote"] and "no interval" in refused["reason"]
