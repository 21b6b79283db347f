"""The SFT vs DPO vs PPO report (preference/report.py) on the tiny model: sampled replies drawn with the
same random numbers for every policy, the rule's style and correctness parts apart, and the paired
change from SFT with its bootstrap interval."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from preference_fixtures import one_torch_thread  # noqa: F401
from test_preference_dagster import write_preference_spec
from test_preference_training import sft_adapter

from sft_dagster import ingest
from sft_dagster.preference.columns import prompt_id_of
from sft_dagster.spec.preference import RewardModelConfig
from sft_dagster.preference.demo_data import rule_parts
from sft_dagster.preference.pairs import assign_pair_splits, pairs_from_rankings
from sft_dagster.preference.rankings import read_candidates, read_rankings
from sft_dagster.preference.report import compare_policies, paired_difference, render_markdown
from sft_dagster.spec import load_spec
from sft_dagster.training import train_reward_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_paired_difference_is_the_mean_change_over_prompts_with_a_bootstrap_interval():
    same = paired_difference([0.25, 0.5, 1.0], [0.25, 0.5, 1.0])
    assert same == {"difference": 0.0, "ci95_low": 0.0, "ci95_high": 0.0, "prompts": 3}
    policy = [1.0, 0.75, 1.0, 0.5, 1.0, 0.875, 1.0, 0.625]
    sft = [0.5, 0.75, 0.25, 0.5, 0.5, 0.375, 1.0, 0.25]
    change = paired_difference(policy, sft, seed=0)
    assert change["difference"] == pytest.approx(sum(p - s for p, s in zip(policy, sft)) / 8)
    assert 0 < change["ci95_low"] < change["difference"] < change["ci95_high"] <= 0.75
    assert paired_difference(policy, sft, seed=0) == change  # seeded
    lone = paired_difference([1.0], [0.0])
    assert lone["difference"] == 1.0 and math.isnan(lone["ci95_low"])  # one prompt: no interval


def test_rule_parts_separate_style_from_correctness():
    assert rule_parts("Maybe 12? I could be wrong.", "12", [3, 4]) == {
        "satisfied": False, "style": False, "correct": True, "no_hedging": False, "concise": True}
    assert rule_parts("It is 13.", "12", [3, 4])["style"] is True
    assert rule_parts("It is 13.", "12", [3, 4])["satisfied"] is False
    long = "12. You can check this by working it out step by step on paper, one part at a time."
    assert rule_parts(long, "12", [3, 4]) == {"satisfied": False, "style": False, "correct": True,
                                                    "no_hedging": True, "concise": False}


def test_report_draws_the_same_samples_for_every_policy(tmp_path, tiny_model_dir):
    """The same adapter under two names gets identical sampled replies (every difference from SFT 0,
    win rate 0.5); another adapter gets other replies and scores. Rule rates are measured on
    samples_per_prompt replies of each rated prompt."""
    spec = load_spec(write_preference_spec(tmp_path, tiny_model_dir, **{"preference.report.samples_per_prompt": 3}))
    data = tmp_path / "data" / "demo_preference"
    candidates = read_candidates(data / "candidates.jsonl")
    ranked, _, _ = pairs_from_rankings(read_rankings(data / "rankings.jsonl"), candidates)
    pairs = assign_pair_splits(ranked, spec.splits)
    prompts, _, _ = ingest.read_prompts(spec, spec.preference.prompts)
    prompts["prompt_id"] = [prompt_id_of(t, s) for t, s in zip(prompts["prompt"], prompts["system"])]
    test_prompts = set(pairs.loc[pairs["split"] == "test", "prompt_id"])
    sft_test = (candidates[candidates["prompt_id"].isin(test_prompts)]
                .assign(example_id=lambda f: f["candidate_id"], system=None)[["example_id", "prompt", "response", "system"]])
    rm = train_reward_model(spec, RewardModelConfig(), tiny_model_dir, pairs[pairs["split"] == "train"],
                            pairs[pairs["split"] == "validation"], tmp_path / "rm", device="cpu", log=lambda _: None)
    a, b = sft_adapter(tiny_model_dir, tmp_path / "a"), sft_adapter(tiny_model_dir, tmp_path / "b", seed=11)
    models = {"sft": {"model_dir": str(a), "method": "lora", "lineage_hash": "A"},
              "dpo": {"model_dir": str(a), "method": "lora", "lineage_hash": "A"},
              "ppo": {"model_dir": str(b), "method": "lora", "lineage_hash": "B"}}
    report = compare_policies(spec, tiny_model_dir, models, str(rm.adapter_dir), pairs, prompts, sft_test)

    sft, same, other = (report["policies"][n] for n in ("sft", "dpo", "ppo"))
    assert sft["rule_prompts"] > 0 and sft["rule_replies"] == 3 * sft["rule_prompts"]
    assert report["sampling"]["replies_per_policy"] == 3 * report["held_out_prompts"]
    assert sft["unfinished_replies"] > 0.5  # a random tiny model rarely ends its reply within 8 tokens
    assert same["win_rate_vs_sft"] == 0.5 and same["reward_score"] == sft["reward_score"]
    for change in report["vs_sft"]["dpo"].values():
        assert change["difference"] == 0.0 and change["ci95_low"] == change["ci95_high"] == 0.0
    assert report["vs_sft"]["ppo"]["reward_score"]["difference"] != 0.0
    assert other["win_rate_vs_sft"] != 0.5
    shown = pd.DataFrame(report["samples"])
    assert set(shown["kind"]) == {"greedy", "sample 0"}
    assert {"sft", "dpo", "ppo"} == set(report["timings"]) - {"setup"}
    markdown = render_markdown(report)
    assert "## Change from SFT" in markdown and "3 sampled replies per prompt" in markdown

