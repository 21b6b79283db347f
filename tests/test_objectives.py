"""The objective registry (`training/objectives.py`) against what it names: the spec's settings, the
method classes, the entry points, the saved folders (`artefacts.py`), and the spec's policy lists."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from sft_dagster import artefacts, training
from sft_dagster.spec import PipelineSpec, load_spec
from sft_dagster.training.objectives import OBJECTIVES, objective, policies

ROOT = Path(__file__).resolve().parents[1]


def _field_type(model: type, dotted: str) -> type:
    """The model of the spec section at `dotted` (an optional section's model, not `X | None`)."""
    for key in dotted.split("."):
        annotation = typing.get_type_hints(model)[key]
        options = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
        model = options[0]
    return model


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_each_objective_names_the_spec_model_that_holds_its_settings(name):
    entry = objective(name)
    assert entry.name == name
    assert _field_type(PipelineSpec, entry.spec_key) is entry.config


@pytest.mark.parametrize("name", [n for n, o in OBJECTIVES.items() if o.method is not None])
def test_each_method_class_is_its_objectives_and_saves_its_artefacts_folder(name):
    entry = objective(name)
    assert entry.method.objective == name
    spec = load_spec(ROOT / "assets" / "demo_preference.yaml")
    settings = () if entry.spec_key == "training" else (entry.config(),)  # SFT reads spec.training itself
    method = entry.method(spec, *settings)
    assert method.output_name == artefacts.FOLDERS[entry.artefact_for(spec)]


@pytest.mark.parametrize("adapter, folder", [("lora", "adapter"), ("qlora", "adapter"), ("full", "model")])
def test_sft_saves_what_training_adapter_names(adapter, folder):
    spec = load_spec(ROOT / "assets" / "demo_sentiment.yaml")
    spec = spec.model_copy(update={"training": spec.training.model_copy(update={"adapter": adapter})})
    assert objective("sft").artefact_for(spec) == artefacts.kind_of(adapter)
    assert objective("sft").method(spec).output_name == folder == artefacts.folder_for(adapter)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_each_entry_point_is_the_training_packages(name):
    entry = objective(name)
    assert getattr(training, entry.train.__name__) is entry.train


def test_the_spec_lists_exactly_the_registered_policies():
    """`preference.train` and `preference.promotion.candidate` accept the registered policies, no other."""
    from sft_dagster.spec import PreferencePromotionSpec, PreferenceSpec

    (train_item,) = typing.get_args(typing.get_type_hints(PreferenceSpec)["train"])
    assert sorted(typing.get_args(train_item)) == sorted(policies())
    candidate = typing.get_type_hints(PreferencePromotionSpec)["candidate"]
    assert sorted(a for t in typing.get_args(candidate) for a in typing.get_args(t)) == sorted(policies())


def test_an_unknown_objective_names_the_known_ones():
    with pytest.raises(KeyError, match="known: sft, reward_model, dpo, ppo"):
        objective("ipo")  # "kto" was the example of an unknown objective until KTO was registered


@pytest.mark.parametrize("name", [n for n, o in OBJECTIVES.items() if o.artefact is not None])
def test_a_record_named_by_its_objective_loads_as_the_artefact_it_saved(name):
    """Preference runs record `method` = the objective (`dpo`, `ppo`, `reward_model`): `artefacts` must read
    it as the artefact the registry says the objective saves."""
    assert artefacts.kind_of(name) == objective(name).artefact


@pytest.mark.parametrize("method, kind, folder, whole", [
    ("lora", "adapter", "adapter", False), ("qlora", "adapter", "adapter", False), ("full", "model", "model", True),
    ("dpo", "adapter", "adapter", False), ("ppo", "adapter", "adapter", False),
    ("few_shot", "prompt", "prompt", False), ("reward_model", "reward_model", "reward_model", False)])
def test_artefacts_of_each_recorded_method(method, kind, folder, whole):
    assert (artefacts.kind_of(method), artefacts.folder_for(method), artefacts.is_whole_model(method)) == (
        kind, folder, whole)


def test_a_prompt_model_has_no_weights_to_load(tmp_path):
    from sft_dagster import prompt_model

    with pytest.raises(prompt_model.PromptModelError, match="no weights of its own"):
        artefacts.load_tuned_model(tmp_path, tmp_path / "prompt", prompt_model.METHOD, "cpu")
