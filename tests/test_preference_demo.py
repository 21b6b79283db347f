"""The preference demo data: deterministic, the annotator follows its stated rule and noise, the files
go through the rankings reader, pair expansion and the pair gates."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from sft_dagster.cli import main
from sft_dagster.spec.preference import PairGatesConfig
from sft_dagster.preference.demo_data import (
    annotator_key,
    generate_preference_demo,
    rule_checks,
    rule_parts,
    rule_satisfaction,
)
from sft_dagster.preference.pairs import (
    assign_pair_splits,
    curate_pairs,
    pairs_from_rankings,
    read_preference_file,
    run_pair_checks,
)
from sft_dagster.preference.rankings import read_candidates, read_rankings
from sft_dagster.spec import SplitSpec, TaskSpec


@pytest.mark.parametrize(("reply", "answer", "allowed", "expected"), [
    ("12.", "12", [7, 5], (True, True, True)),
    ("7 + 5 = 12.", "12", [7, 5], (True, True, True)),  # the question's numbers may be repeated
    ("It is probably 12.", "12", [7, 5], (True, False, True)),
    ("13.", "12", [7, 5], (False, True, True)),
    ("12, or maybe 13.", "12", [7, 5], (False, False, True)),
    ("12. " + "Adding seven and five gives twelve, as you can verify by counting on your fingers.", "12", [7, 5],
     (True, True, False)),
    ("Paris.", "Paris", [], (True, True, True)),
    ("Paris or Rome.", "Paris", [], (False, True, True)),
    ("I think it is grey", "grey", [], (True, False, True)),
])
def test_rule_checks(reply, answer, allowed, expected):
    checks = rule_checks(reply, answer, allowed)
    assert (checks["correct"], checks["no_hedging"], checks["concise"]) == expected


def test_demo_is_deterministic_and_the_annotator_follows_the_rule(tmp_path):
    a = generate_preference_demo(tmp_path / "a", n_prompts=40, seed=3, noise=0.0)
    b = generate_preference_demo(tmp_path / "b", n_prompts=40, seed=3, noise=0.0)
    for name in ("prompts.jsonl", "sft.jsonl", "candidates.jsonl", "rankings.jsonl", "preferences.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a["noisy_rankings"] == b["noisy_rankings"] == 0
    prompts = pd.read_json(tmp_path / "a" / "prompts.jsonl", lines=True).set_index("prompt_id")
    candidates = read_candidates(tmp_path / "a" / "candidates.jsonl").set_index("candidate_id")
    for r in read_rankings(tmp_path / "a" / "rankings.jsonl").itertuples():
        q = prompts.loc[r.prompt_id]
        keys = [annotator_key(candidates.loc[t[0], "response"], str(q["answer"]), q["allowed_numbers"]) for t in r.ranking]
        assert keys == sorted(keys)  # without noise, every ranking is in the rule's order
    assert {"sim-a", "sim-b"} <= set(a["annotators"])


def test_the_sft_writer_mostly_hedges_or_explains_at_length(tmp_path):
    """sft.jsonl (what SFT imitates) leans to hedged and long-winded replies, unlike the ranked candidates;
    each reply's style is what the rule as code says; the writer has its own random stream."""
    manifest = generate_preference_demo(tmp_path / "a", n_prompts=60, seed=0)
    sft = pd.read_json(tmp_path / "a" / "sft.jsonl", lines=True)
    prompts = pd.read_json(tmp_path / "a" / "prompts.jsonl", lines=True).set_index("prompt_id")
    assert len(sft) == manifest["sft_replies"] == 3 * 60
    assert (sft.groupby("prompt_id")["style"].nunique() == 3).all()
    assert "concise_wrong" not in set(sft["style"])  # weight 0

    def parts(frame: pd.DataFrame) -> list[dict]:
        return [rule_parts(r.response, str(prompts.loc[r.prompt_id, "answer"]), prompts.loc[r.prompt_id, "allowed_numbers"])
                for r in frame.itertuples()]

    for r, p in zip(sft.itertuples(), parts(sft)):
        assert p["correct"] == r.style.endswith("_correct")
        assert p["no_hedging"] != r.style.startswith("hedged")
        assert p["concise"] if r.style.startswith("concise") else not p["style"]
    candidates = read_candidates(tmp_path / "a" / "candidates.jsonl")
    sft_style = sum(p["style"] for p in parts(sft)) / len(sft)
    candidate_style = sum(p["style"] for p in parts(candidates)) / len(candidates)
    assert sft_style < 0.2 and candidate_style > 0.3
    other = generate_preference_demo(tmp_path / "b", n_prompts=60, seed=0, sft_per_prompt=1,
                                     sft_style_weights={"concise_correct": 1.0})
    assert set(pd.read_json(tmp_path / "b" / "sft.jsonl", lines=True)["style"]) == {"concise_correct"}
    for name in ("prompts.jsonl", "candidates.jsonl", "rankings.jsonl", "preferences.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with pytest.raises(ValueError, match="unknown styles"):
        generate_preference_demo(tmp_path / "c", sft_style_weights={"rude": 1.0})
    assert not (tmp_path / "c").exists()  # refused before anything is written


def test_noise_rate_is_as_stated(tmp_path):
    manifest = generate_preference_demo(tmp_path, n_prompts=300, seed=0, noise=0.2)
    assert manifest["noisy_rankings"] / manifest["rankings"] == pytest.approx(0.2, abs=0.05)
    prompts = pd.read_json(tmp_path / "prompts.jsonl", lines=True).set_index("prompt_id")
    candidates = read_candidates(tmp_path / "candidates.jsonl").set_index("candidate_id")
    out_of_order = []
    for r in read_rankings(tmp_path / "rankings.jsonl").itertuples():
        q = prompts.loc[r.prompt_id]
        keys = [annotator_key(candidates.loc[t[0], "response"], str(q["answer"]), q["allowed_numbers"]) for t in r.ranking]
        out_of_order.append(r.Index + 1 if keys != sorted(keys) else None)
    # Every ranking out of the rule's order is a planted mistake (a swap of two equal keys is invisible).
    assert {line for line in out_of_order if line} <= set(manifest["noisy_ranking_lines"])


def test_demo_files_run_through_pairs_and_gates(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    assert main(["demo-preference-data", "--out", str(tmp_path), "--prompts", "30", "--seed", "1"]) == 0
    manifest = json.loads((tmp_path / "truth" / "manifest.json").read_text())
    candidates = read_candidates(tmp_path / "candidates.jsonl")
    ranked, quarantined, stats = pairs_from_rankings(read_rankings(tmp_path / "rankings.jsonl"), candidates)
    assert quarantined.empty and stats["pairs"] == manifest["rankings"] * 6  # K=4: 6 pairs per full ranking
    imported, bad, istats = read_preference_file(tmp_path / "preferences.jsonl")
    assert istats["rows_read"] == manifest["imported_pairs"] + manifest["imported_broken_rows"]
    assert len(bad) == 2  # a missing side and broken JSON; the identical and empty sides are left to the gates
    pairs = assign_pair_splits(pd.concat([ranked, imported], ignore_index=True), SplitSpec())
    outcomes = {o.name: o for o in run_pair_checks(pairs, PairGatesConfig(), task=TaskSpec(type="qa"),
                                                   tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir), max_length=256)}
    assert len(outcomes["identical_sides"].failing_ids) == 1 and len(outcomes["empty_sides"].failing_ids) == 1
    assert outcomes["length_bias"].metadata["longer_win_rate"] < 0.5  # this annotator prefers concise replies
    assert outcomes["ranker_agreement"].metadata["evaluated"]
    kept, quarantine, cstats = curate_pairs(pairs, list(outcomes.values()))
    assert cstats["pairs_in"] == len(kept) + len(quarantine)
    prompts = pd.read_json(tmp_path / "prompts.jsonl", lines=True)
    best = candidates.merge(prompts[["prompt_id", "answer", "allowed_numbers"]], on="prompt_id")
    rates = rule_satisfaction(best, best["response"].tolist())
    assert 0 < rates["satisfied"] < rates["correct"] < 1  # the candidates mix good and bad replies
