import json

from sft_dagster.registry import latest_version, promote, promotion_decision


def report(base: float, tuned: float) -> dict:
    return {"task": "sentiment", "n_test": 10, "primary_metric": "accuracy",
            "base": {"accuracy": base, "loss": 2.0}, "tuned": {"accuracy": tuned, "loss": 1.0}}


def test_promotion_decision_margin_and_direction():
    assert promotion_decision(report(0.5, 0.6), "accuracy", 0.05)[0]
    assert not promotion_decision(report(0.5, 0.52), "accuracy", 0.05)[0]
    assert promotion_decision(report(0.5, 0.5), "loss", 0.5)[0]  # lower loss is better
    ok, why = promotion_decision(report(0.5, 0.6), "bleu", 0.0)
    assert not ok and "not in the evaluation report" in why


def test_promote_versions_and_is_idempotent(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    registry = tmp_path / "registry" / "demo"
    v1 = promote(adapter, registry, report(0.4, 0.8), {"training_data_hash": "a"}, "ok")
    assert v1.name == "v1" and latest_version(registry) == v1
    assert (v1 / "adapter_model.safetensors").read_bytes() == b"weights"
    assert "accuracy: base 0.4000, fine-tuned 0.8000" in (v1 / "MODEL_CARD.md").read_text()
    assert json.loads((v1 / "lineage.json").read_text()) == {"training_data_hash": "a"}
    assert promote(adapter, registry, report(0.4, 0.8), {"training_data_hash": "a"}, "ok") == v1
    v2 = promote(adapter, registry, report(0.4, 0.9), {"training_data_hash": "b"}, "ok")
    assert v2.name == "v2" and latest_version(registry) == v2
    assert not list(registry.glob(".*tmp*"))
