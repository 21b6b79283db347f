"""Preference pairs: expansion of rankings, imported data sets, the pair checks and pair curation."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from preference_fixtures import make_candidates, record

from sft_dagster.ingest import IngestError
from sft_dagster.preference.columns import prompt_id_of
from sft_dagster.spec.preference import AgreementGate, InconsistencyGate, LengthBiasGate, PairGatesConfig, RowGate
from sft_dagster.preference.pairs import (
    assign_pair_splits,
    check_duplicate_pairs,
    check_empty_sides,
    check_identical_sides,
    check_inconsistent_rankings,
    check_over_length,
    check_split_leakage,
    check_ties,
    curate_pairs,
    length_bias,
    pairs_from_rankings,
    ranker_agreement,
    read_preference_file,
    run_pair_checks,
)
from sft_dagster.spec import SplitSpec, TaskSpec

TASK = TaskSpec(type="qa")


def pair_frame(rows: list[tuple]) -> pd.DataFrame:
    """(prompt, chosen, rejected, author[, tie]) tuples -> a pair frame as pairs.py builds it."""
    out = []
    for i, row in enumerate(rows):
        prompt, chosen, rejected, author = row[:4]
        out.append({"pair_id": f"p{i}", "prompt_id": prompt_id_of(prompt), "prompt": prompt, "system": None,
                    "history": None, "chosen": chosen, "rejected": rejected, "chosen_id": None, "rejected_id": None,
                    "tie": row[4] if len(row) > 4 else False, "author": author, "origin": "test", "split": None,
                    "source_file": "t", "source_line": i + 1})
    return pd.DataFrame(out)


def test_full_ranking_gives_k_choose_2_pairs_and_best_worst_one():
    c = make_candidates({"q1": ["a", "b", "c", "d"], "q2": ["x", "y", "z"]})
    ids = c[c["prompt"] == "q1"]["candidate_id"].tolist()
    rankings = pd.DataFrame([
        record(c, "q1", [2, 0, 3, 1]),
        {**record(c, "q1", [0, 1]), "ranking": [[ids[0]], [ids[1], ids[2]], [ids[3]]], "author": "bo"},  # one tie
        record(c, "q2", [1, 0], kind="best_worst"),
    ]).assign(source_file="r.jsonl", source_line=[1, 2, 3])
    pairs, quarantine, stats = pairs_from_rankings(rankings, c)
    assert stats["pairs"] == 6 + 6 + 1 and quarantine.empty
    ana = pairs[(pairs["author"] == "ana") & (pairs["prompt"] == "q1")]
    # c > a > d > b: every ordered pair, chosen above rejected
    assert set(zip(ana["chosen"], ana["rejected"])) == {("c", "a"), ("c", "d"), ("c", "b"), ("a", "d"), ("a", "b"), ("d", "b")}
    bo = pairs[pairs["author"] == "bo"]
    assert bo["tie"].sum() == 1 and set(bo.loc[bo["tie"], ["chosen", "rejected"]].iloc[0]) == {"b", "c"}
    q2 = pairs[pairs["prompt"] == "q2"]
    assert list(zip(q2["chosen"], q2["rejected"])) == [("y", "x")]
    assert pairs["pair_id"].is_unique


def test_rankings_of_unknown_candidates_are_quarantined_with_the_reason():
    c = make_candidates({"q1": ["a", "b"], "q2": ["x", "y"]})
    rankings = pd.DataFrame([record(c, "q1", [0, 1]), record(c, "q2", [1, 0])]).assign(source_file="r.jsonl",
                                                                                       source_line=[1, 2])
    regenerated = c[c["response"] != "y"]  # candidate y is gone
    pairs, quarantine, stats = pairs_from_rankings(rankings, regenerated)
    assert stats["rankings_in"] == stats["rankings_expanded"] + stats["rankings_quarantined"] == 2
    assert len(pairs) == 1 and quarantine["source_line"].tolist() == [2]
    assert "are not candidates of prompt" in quarantine["reason"].iloc[0]


def test_imported_preference_file_all_shapes_and_quarantine(tmp_path):
    path = tmp_path / "prefs.jsonl"
    convo = lambda reply: [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                           {"role": "assistant", "content": reply}]
    lines = [
        json.dumps({"prompt": "What is 2 + 2?", "chosen": "4.", "rejected": "5.", "labeler": "vendor"}),
        json.dumps({"chosen": convo("Hello."), "rejected": convo("Go away.")}),
        json.dumps({"prompt": [{"role": "user", "content": "Name a colour."}],
                    "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": [{"role": "assistant", "content": "No."}]}),
        json.dumps({"prompt": "Q?", "chosen": "A.", "rejected": "B.", "score_chosen": 7, "score_rejected": 7}),
        json.dumps({"prompt": "Q?", "chosen": "A."}),
        json.dumps({"chosen": convo("Hello."), "rejected": [{"role": "user", "content": "Other?"},
                                                            {"role": "assistant", "content": "Hm."}]}),
        json.dumps({"prompt": "Q?", "chosen": "A.", "rejected": "B.", "split": "holdout"}),
        "",
        '{"prompt": "Q?",',
    ]
    path.write_text("\n".join(lines) + "\n")
    pairs, quarantine, stats = read_preference_file(path, columns={"author": "labeler"})
    assert stats["rows_read"] == 8 == stats["rows_kept"] + stats["rows_quarantined"]
    assert len(pairs) == 4
    chat = pairs.iloc[1]
    assert (chat["system"], chat["prompt"], chat["chosen"], chat["rejected"]) == ("Be brief.", "Hi?", "Hello.", "Go away.")
    assert (pairs.iloc[2]["prompt"], pairs.iloc[2]["chosen"]) == ("Name a colour.", "Blue.")
    assert pairs["tie"].tolist() == [False, False, False, True]  # equal scores are a tie
    assert pairs.iloc[0]["author"] == "vendor" and pairs.iloc[1]["author"] is None
    reasons = dict(zip(quarantine["source_line"], quarantine["reason"]))
    assert reasons[5] == "rejected is missing"
    assert reasons[6] == "chosen and rejected differ before the last reply (system)"
    assert reasons[7] == "split is 'holdout', not train, validation or test"
    assert reasons[9].startswith("invalid JSON")
    with pytest.raises(IngestError, match=r"prefs.jsonl:1: better: column not found \(needed for chosen\)"):
        read_preference_file(path, columns={"chosen": "better"})


def test_row_checks_find_exactly_the_planted_pairs():
    pairs = pair_frame([
        ("q1", "4.", "5.", "ana"),
        ("q2", "Same.", " Same. ", "ana"),  # identical after trimming
        ("q3", "", "x", "ana"),  # empty side
        ("q4", "a", "b", "ana", True),  # tie
        ("q1", "4.", "5.", "bo"),  # duplicate of p0 (by someone else)
    ])
    gate = RowGate(max_rate=0.0)
    assert check_identical_sides(pairs, gate).failing_ids == ["p1"]
    assert check_empty_sides(pairs, gate).failing_ids == ["p2"]
    assert check_ties(pairs, gate).failing_ids == ["p3"]
    duplicates = check_duplicate_pairs(pairs, gate)
    assert duplicates.failing_ids == ["p4"] and not duplicates.passed
    assert check_duplicate_pairs(pairs, RowGate(max_rate=0.2, blocking=False)).passed  # 1 of 5 is within 20%
    clean = pair_frame([("q1", "4.", "5.", "ana")])
    assert all(check(clean, gate).passed for check in (check_identical_sides, check_empty_sides, check_ties,
                                                       check_duplicate_pairs))


def test_over_length_uses_the_training_template(tiny_model_dir):
    from transformers import AutoTokenizer

    from sft_dagster.formatting import build_messages, encode_example

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = pair_frame([("short question", "ok", "no", "ana"), ("short question", "ok", "very long reply " * 40, "ana")])
    exact = len(encode_example(tokenizer, build_messages("short question", "ok", None, TASK), 10_000).input_ids)
    at_limit = check_over_length(pairs, RowGate(), tokenizer, TASK, max_length=exact + 1)
    assert at_limit.failing_ids == ["p1"] and at_limit.metadata["longest"] > exact + 1
    # One token short of the shorter conversation: both pairs fail; exactly its length: the first fits.
    assert check_over_length(pairs, RowGate(), tokenizer, TASK, max_length=exact - 1).failing_ids == ["p0", "p1"]
    assert "p0" not in check_over_length(pairs, RowGate(), tokenizer, TASK, max_length=exact).failing_ids


def test_splits_by_prompt_and_leakage():
    pairs = pair_frame([(f"question {i}", "a", "b", "ana") for i in range(40)] + [("question 0", "c", "d", "bo")])
    split = assign_pair_splits(pairs, SplitSpec(validation=0.2, test=0.2))
    assert split.groupby("prompt")["split"].nunique().max() == 1  # all pairs of a prompt share a split
    assert check_split_leakage(split, RowGate(), TASK).passed
    # An imported split that puts the same prompt (up to case and punctuation) in train and test leaks.
    leaky = split.copy()
    test_row = leaky.index[leaky["split"] == "test"][0]
    leaky.loc[len(leaky)] = leaky.loc[test_row].to_dict() | {
        "pair_id": "leak", "prompt": leaky.loc[test_row, "prompt"].upper() + "!", "split": "train"}
    outcome = check_split_leakage(leaky, RowGate(), TASK)
    assert not outcome.passed and outcome.failing_ids == [leaky.loc[test_row, "pair_id"]]
    assert not check_split_leakage(pairs, RowGate(), TASK).passed  # no splits: fails, never skipped silently


def test_inconsistency_rate_against_a_threshold():
    pairs = pair_frame([
        ("q1", "A", "B", "ana"), ("q1", "B", "A", "ana"),  # ana contradicts herself
        ("q2", "C", "D", "ana"), ("q2", "C", "D", "ana"),  # consistent repeat
        ("q3", "E", "F", "bo"), ("q3", "F", "E", "cy"),  # two people disagreeing is not inconsistency
    ])
    outcome = check_inconsistent_rankings(pairs, InconsistencyGate(max_rate=0.4))
    assert outcome.metadata["repeated_judgements"] == 2 and outcome.metadata["inconsistency_rate"] == 0.5
    assert not outcome.passed and sorted(outcome.failing_ids) == ["p0", "p1"]
    assert check_inconsistent_rankings(pairs, InconsistencyGate(max_rate=0.5)).passed


def test_length_bias_counts_how_often_the_longer_reply_wins():
    rows = [("q", "a much longer reply", "short", "ana")] * 3 + [("q", "tiny", "a longer one", "ana"),
                                                                 ("q", "same", "size", "ana")]
    outcome = length_bias(pair_frame(rows), LengthBiasGate(max_longer_win_rate=0.7, min_pairs=4))
    assert outcome.metadata["comparable_pairs"] == 4 and outcome.metadata["longer_win_rate"] == 0.75
    assert not outcome.passed and outcome.failing_ids == []  # a report: it names no pair
    assert length_bias(pair_frame(rows), LengthBiasGate(max_longer_win_rate=0.7, min_pairs=5)).passed  # too few pairs


def test_ranker_agreement_is_the_pairwise_agreement_rate():
    pairs = pair_frame([
        ("q1", "A", "B", "ana"), ("q1", "A", "B", "bo"), ("q1", "B", "A", "cy"),  # ana=bo, ana!=cy, bo!=cy
        ("q2", "C", "D", "ana"), ("q2", "C", "D", "bo"),  # agree
        ("q3", "E", "F", "ana"),  # judged once: not compared
    ])
    outcome = ranker_agreement(pairs, AgreementGate(min_agreement=0.5))
    assert outcome.metadata["compared"] == 4 and outcome.metadata["agreement"] == 0.5
    assert outcome.metadata["by_ranker_pair"]["ana|cy"] == {"compared": 1, "agreement": 0.0}
    assert outcome.passed and sorted(outcome.failing_ids) == ["p0", "p1", "p2"]
    assert not ranker_agreement(pairs, AgreementGate(min_agreement=0.6)).passed


def test_run_and_curate_account_for_every_pair(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = assign_pair_splits(pair_frame([
        ("q1", "4.", "5.", "ana"), ("q2", "x", "x", "ana"), ("q3", "a", "b", "ana", True), ("q1", "4.", "5.", "bo"),
        ("q4", "fine", "long " * 300, "ana"),
    ]), SplitSpec())
    outcomes = run_pair_checks(pairs, PairGatesConfig(), task=TASK, tokenizer=tokenizer, max_length=128)
    by_name = {o.name: o for o in outcomes}
    assert not by_name["identical_sides"].passed and by_name["identical_sides"].blocking
    assert by_name["ties"].passed and not by_name["ties"].blocking  # default: reported, not blocking
    kept, quarantine, stats = curate_pairs(pairs, outcomes)
    assert stats["pairs_in"] == len(kept) + len(quarantine) == 5
    assert kept["pair_id"].tolist() == ["p0"]
    assert dict(zip(quarantine["example_id"], quarantine["reason"])) == {
        "p1": "failed pair check identical_sides", "p2": "failed pair check ties",
        "p3": "failed pair check duplicates", "p4": "failed pair check over_length"}
    no_tokenizer = {o.name: o for o in run_pair_checks(pairs, PairGatesConfig(), task=TASK)}
    assert not no_tokenizer["over_length"].passed and "no tokenizer" in no_tokenizer["over_length"].metadata["error"]


def test_imported_csv_with_mapped_columns(tmp_path):
    path = tmp_path / "prefs.csv"
    pd.DataFrame({"question": ["What is 2 + 2?", "Q?"], "good": ["4.", "A."], "bad": ["5.", ""],
                  "who": ["vendor", "vendor"], "same": ["false", "yes"]}).to_csv(path, index=False)
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad", "author": "who", "tie": "same"}
    pairs, quarantine, stats = read_preference_file(path, columns=columns)
    assert stats == {"rows_read": 2, "rows_kept": 2, "rows_quarantined": 0}
    assert pairs["tie"].tolist() == [False, True] and pairs["rejected"].tolist() == ["5.", ""]
    header_only = tmp_path / "empty.csv"
    header_only.write_text("question,good,bad\n")
    empty, _, stats = read_preference_file(header_only, columns=columns)
    assert empty.empty and stats["rows_read"] == 0
