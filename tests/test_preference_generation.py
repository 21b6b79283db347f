"""Candidate generation on the tiny model: seeded and reproducible, batch-independent, refusing long prompts."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from preference_fixtures import one_torch_thread  # noqa: F401

from sft_dagster.preference.columns import CANDIDATE_COLUMNS, candidate_id_of, prompt_id_of
from sft_dagster.spec.preference import CandidateGenerationConfig
from sft_dagster.preference.generation import generate_candidates
from sft_dagster.spec import TaskSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TASK = TaskSpec(type="instruction")
PROMPTS = pd.DataFrame({"prompt": ["great product", "awful quality, broke", "okay average", "the screen is bright",
                                   "great product"],  # a repeat: sampled once
                        "example_id": ["e1", "e2", "e3", "e4", "e5"]})


def run(model_dir, prompts=PROMPTS, **cfg):
    config = CandidateGenerationConfig(**({"k": 3, "max_new_tokens": 6, "batch_size": 4, "temperature": 1.0, "top_p": 0.9} | cfg))
    return generate_candidates(prompts, model_dir, task=TASK, config=config, max_length=64, device="cpu")


def test_same_seed_same_candidates_whatever_the_batching(tiny_model_dir):
    candidates, quarantine, stats = run(tiny_model_dir)
    assert list(candidates.columns) == CANDIDATE_COLUMNS and quarantine.empty
    assert stats["prompts_in"] == 5 and stats["duplicate_prompts"] == 1 and stats["prompts_sampled"] == 4
    assert len(candidates) + stats["duplicate_samples"] == 4 * 3
    again, _, _ = run(tiny_model_dir)
    pd.testing.assert_frame_equal(candidates, again)
    # One prompt per batch, prompts in reverse order: each reply draws from its own generator.
    other, _, _ = run(tiny_model_dir, prompts=PROMPTS.iloc[::-1], batch_size=1)
    key = ["prompt_id", "sample_index"]
    pd.testing.assert_frame_equal(candidates.sort_values(key).reset_index(drop=True),
                                  other.sort_values(key).reset_index(drop=True))
    different, _, _ = run(tiny_model_dir, seed=1)
    assert set(different["candidate_id"]) != set(candidates["candidate_id"])
    row = candidates.iloc[0]
    assert row["prompt_id"] == prompt_id_of(row["prompt"])
    assert row["candidate_id"] == candidate_id_of(row["prompt_id"], row["response"])  # a content hash


def test_a_prompt_that_would_not_fit_is_refused_not_truncated(tiny_model_dir):
    prompts = pd.concat([PROMPTS.head(2), pd.DataFrame({"prompt": ["very long " * 40], "example_id": ["long"],
                                                        "source_file": ["p.jsonl"], "source_line": [9]})],
                        ignore_index=True)
    candidates, quarantine, stats = run(tiny_model_dir, prompts=prompts)
    assert stats["prompts_in"] == stats["prompts_sampled"] + stats["prompts_refused"] + stats["duplicate_prompts"] == 3
    assert quarantine["example_id"].tolist() == ["long"] and quarantine["source_line"].tolist() == [9]
    assert "does not fit model.max_length 64 (refused, not truncated)" in quarantine["reason"].iloc[0]
    assert "very long" not in set(candidates["prompt"].str.slice(0, 9))


def test_a_tiny_top_p_is_greedy_and_repeated_samples_are_kept_once(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_dagster.evaluation import generate

    candidates, _, stats = run(tiny_model_dir, top_p=1e-6)
    assert stats["duplicate_samples"] == 4 * 2 and len(candidates) == 4  # 3 identical samples per prompt -> 1
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    distinct = PROMPTS.drop_duplicates("prompt").assign(system=None)
    greedy = generate(model, AutoTokenizer.from_pretrained(tiny_model_dir), distinct, TASK, 6, 4, "cpu")
    assert candidates.set_index("prompt").loc[distinct["prompt"], "response"].tolist() == greedy


def test_an_adapter_changes_the_candidates(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                LoraConfig(r=4, lora_alpha=64, target_modules="all-linear", init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    config = CandidateGenerationConfig(k=2, max_new_tokens=6, temperature=1.0, top_p=1.0)
    base, _, _ = generate_candidates(PROMPTS, tiny_model_dir, task=TASK, config=config, max_length=64, device="cpu")
    tuned, _, _ = generate_candidates(PROMPTS, tiny_model_dir, task=TASK, config=config, max_length=64, device="cpu",
                                      adapter_dir=tmp_path / "adapter")
    assert set(tuned["candidate_id"]) != set(base["candidate_id"])
    assert tuned["model"].iloc[0].endswith(str(tmp_path / "adapter"))


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_temperature_must_be_positive(temperature):
    with pytest.raises(ValueError, match="temperature"):
        CandidateGenerationConfig(temperature=temperature)
