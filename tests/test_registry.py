import json

import pytest

from sft_dagster.registry import champion, latest_version, promote, promotion_decision


def report(base: float, tuned: float) -> dict:
    return {"task": "sentiment", "n_test": 10, "primary_metric": "accuracy",
            "base": {"accuracy": base, "loss": 2.0}, "tuned": {"accuracy": tuned, "loss": 1.0}}


def test_promotion_decision_margin_and_direction():
    assert promotion_decision(report(0.5, 0.6), "accuracy", 0.05)["promote"]
    assert not promotion_decision(report(0.5, 0.52), "accuracy", 0.05)["promote"]
    assert promotion_decision(report(0.5, 0.5), "loss", 0.5)["promote"]  # lower loss is better
    decision = promotion_decision(report(0.5, 0.6), "bleu", 0.0)
    assert not decision["promote"] and "not in the evaluation report" in decision["reason"]


def test_promote_versions_and_is_idempotent(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    registry = tmp_path / "registry" / "demo"
    ok = {"promote": True, "reason": "ok"}
    v1 = promote(adapter, registry, report(0.4, 0.8), {"training_data_hash": "a"}, ok)
    assert v1.name == "v1" and latest_version(registry) == v1
    assert (v1 / "adapter_model.safetensors").read_bytes() == b"weights"
    assert "accuracy: base 0.4000, candidate 0.8000 (first promotion" in (v1 / "MODEL_CARD.md").read_text()
    assert json.loads((v1 / "lineage.json").read_text()) == {"training_data_hash": "a"}
    assert promote(adapter, registry, report(0.4, 0.8), {"training_data_hash": "a"}, ok) == v1
    v2 = promote(adapter, registry, report(0.4, 0.9), {"training_data_hash": "b"}, ok)
    assert v2.name == "v2" and latest_version(registry) == v2
    assert not list(registry.glob(".*tmp*"))
    assert champion(registry)["version"] == "v2" and champion(registry)["lineage"] == {"training_data_hash": "b"}


def champion_report(tuned: dict, champion: dict | None, primary: str = "accuracy") -> dict:
    return {"task": "sentiment", "n_test": 10, "primary_metric": primary, "base": {"accuracy": 0.3, "loss": 2.0},
            "tuned": tuned, "champion": champion, "champion_version": "v3" if champion else None}


def test_promotion_decision_against_the_champion():
    champion = {"accuracy": 0.80, "loss": 1.0}
    # Beats the base model easily, but not the champion by the margin: not promoted.
    decision = promotion_decision(champion_report({"accuracy": 0.81, "loss": 0.9}, champion), "accuracy", 0.05)
    assert decision["promote"] is False and decision["compared_with"] == "champion v3"
    assert decision["gain"] == pytest.approx(0.01)
    assert promotion_decision(champion_report({"accuracy": 0.86, "loss": 0.9}, champion), "accuracy", 0.05)["promote"]
    # Better loss (the promotion metric) but worse on the primary metric: never promoted.
    worse = promotion_decision(champion_report({"accuracy": 0.79, "loss": 0.5}, champion), "loss", 0.1)
    assert worse["promote"] is False and "worse on the primary metric accuracy" in worse["reason"]
    # No champion yet: the base model is the reference.
    first = promotion_decision(champion_report({"accuracy": 0.36, "loss": 1.9}, None), "accuracy", 0.05)
    assert first["promote"] and first["compared_with"] == "base model"
    # The candidate is the champion (unchanged inputs): nothing to do, and no alert.
    same = promotion_decision(champion_report({"accuracy": 0.8, "loss": 1.0}, None) | {"candidate_is_champion": True,
                                                                                      "champion_version": "v3"}, "accuracy", 0.05)
    assert same["promote"] and "current champion v3" in same["reason"]
    # A champion that could not be scored blocks promotion instead of being skipped.
    unknown = promotion_decision(champion_report({"accuracy": 0.9, "loss": 0.5}, None) | {"champion_error": "other base"},
                                 "accuracy", 0.0)
    assert unknown["promote"] is False and "could not be scored" in unknown["reason"]


def test_promotion_blocks_on_forgetting_when_asked():
    report = champion_report({"accuracy": 0.9, "loss": 0.5}, None) | {
        "retention": {"models": {"tuned": {"forgetting": 0.25}}}}
    assert promotion_decision(report, "accuracy", 0.05)["promote"]  # reported, not blocking by default
    blocked = promotion_decision(report, "accuracy", 0.05, max_forgetting=0.1)
    assert blocked["promote"] is False and "forgets 25.0%" in blocked["reason"]
    assert promotion_decision(report, "accuracy", 0.05, max_forgetting=0.3)["promote"]


def test_a_negative_required_gain_is_worded_as_an_allowed_drop():
    """The preference promotion passes -max_task_metric_drop: its reason must read as a tolerance,
    never as "beats ... by the required -0.0500"."""
    within = promotion_decision(report(0.5, 0.47), "accuracy", -0.05)
    assert within["promote"]
    assert within["reason"] == ("candidate accuracy 0.4700 is within the allowed drop of 0.0500 from base model "
                                "0.5000 (change -0.0300)")
    outside = promotion_decision(report(0.5, 0.44), "accuracy", -0.05)
    assert not outside["promote"] and "falls outside the allowed drop of 0.0500" in outside["reason"]
    assert "required" not in within["reason"] + outside["reason"]
    # a required gain keeps its wording
    assert "by the required +0.0500" in promotion_decision(report(0.5, 0.6), "accuracy", 0.05)["reason"]


def test_a_policy_tuned_from_the_adapter_stays_champion(tmp_path):
    """SFT v1, then the DPO policy tuned from it v2: promoting the same SFT adapter again (a later run, or
    the same run in the other order) leaves the registry on the policy instead of flipping back to SFT."""
    from sft_dagster.schema import lineage_hash_of

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    registry = tmp_path / "registry" / "demo"
    ok = {"promote": True, "reason": "ok"}
    sft = {"training_data_hash": "a"}
    assert promote(adapter, registry, report(0.4, 0.8), sft, ok).name == "v1"
    dpo = {"training_data_hash": "a", "preference_method": "dpo", "sft_adapter": lineage_hash_of(sft)}
    assert promote(adapter, registry, report(0.4, 0.8), dpo, ok).name == "v2"
    assert promote(adapter, registry, report(0.4, 0.8), sft, ok).name == "v2"
    assert latest_version(registry).name == "v2" and not (registry / "v3").exists()
    # A policy tuned from another adapter does not shield this one: a new SFT adapter is a new version.
    assert promote(adapter, registry, report(0.4, 0.9), {"training_data_hash": "b"}, ok).name == "v3"
    decision = promotion_decision(champion_report({"accuracy": 0.8, "loss": 1.0}, None) | {
        "candidate_is_champion": True, "champion_version": "v2", "champion_tuned_from_candidate": "dpo"}, "accuracy", 0.05)
    assert decision["promote"] and "v2 is the dpo policy tuned from this candidate" in decision["reason"]
