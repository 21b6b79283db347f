import pandas as pd

from sft_dagster.curation import curate
from sft_dagster.spec import CurationPolicy, SplitSpec
from sft_dagster.splits import assign_splits, split_summary


def frame(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "example_id": [f"id{i}" for i in range(n)],
            "content_hash": [f"id{i}" for i in range(n)],
            "prompt": [f"review number {i}" for i in range(n)],
            "response": ["positive", "negative"] * (n // 2),
            "system": [None] * n,
            "source_file": ["f"] * n,
            "source_line": range(1, n + 1),
            "reviewed": [False] * n,
        }
    )


def test_splits_are_stable_when_data_is_added():
    cfg = SplitSpec(validation=0.1, test=0.2, seed=0)
    small = assign_splits(frame(200), cfg)
    large = assign_splits(frame(2000), cfg)
    merged = small.merge(large, on="example_id", suffixes=("_small", "_large"))
    assert (merged["split_small"] == merged["split_large"]).all()
    counts = large["split"].value_counts(normalize=True)
    assert abs(counts["test"] - 0.2) < 0.04 and abs(counts["validation"] - 0.1) < 0.03


def test_same_prompt_shares_a_split_and_seed_changes_split():
    df = frame(400)
    df.loc[1, "prompt"] = "  Review NUMBER 0 "  # same normalised prompt as row 0
    a = assign_splits(df, SplitSpec(seed=0))
    assert a.loc[0, "split"] == a.loc[1, "split"]
    b = assign_splits(df, SplitSpec(seed=1))
    assert (a["split"] != b["split"]).any()
    summary = split_summary(a)
    assert sum(summary["rows"].values()) == 400


def test_curation_accounts_for_every_row_and_never_cleans_test():
    df = frame(300)
    df.loc[5, ["content_hash"]] = df.loc[4, "content_hash"]  # exact duplicate of row 4
    splits = assign_splits(df, SplitSpec())
    test_ids = set(splits.loc[splits["split"] == "test", "example_id"])
    train_ids = set(splits.loc[splits["split"] == "train", "example_id"]) - {"id4", "id5"}
    flagged_test, flagged_train = sorted(test_ids)[0], sorted(train_ids)[0]
    flags = pd.DataFrame({
        "example_id": [flagged_test, flagged_train],
        "is_label_issue": [True, True], "is_outlier": [False, False], "is_near_duplicate": [False, False],
        "suggested_label": ["negative", "negative"], "label_score": [0.01, 0.02],
    })
    bad = sorted(train_ids)[1]
    curated, quarantined, stats = curate(df, {"label_in_set": [bad]}, flags, CurationPolicy(), SplitSpec())
    assert len(curated) + len(quarantined) == len(df) == stats["rows_in"]
    reasons = dict(zip(quarantined["example_id"], quarantined["reason"]))
    assert reasons["id5"] == "exact duplicate of id4"
    assert reasons[bad] == "failed blocking check label_in_set"
    assert reasons[flagged_train].startswith("label issue: given")
    assert flagged_test in set(curated["example_id"])  # the test split is scored as labelled
    assert stats["flagged_test_rows_kept"] == 1
    kept = curate(df, {}, flags, CurationPolicy(label_issues="keep"), SplitSpec())[0]
    assert flagged_train in set(kept["example_id"])


def test_relabel_applies_confident_suggestions_and_holds_the_rest_for_review():
    df = frame(300)
    splits = assign_splits(df, SplitSpec())
    positive = splits["response"] == "positive"
    train_ids = sorted(splits.loc[(splits["split"] == "train") & positive, "example_id"])
    test_id = sorted(splits.loc[(splits["split"] == "test") & positive, "example_id"])[0]
    sure, unsure, reviewed = train_ids[:3]
    df.loc[df["example_id"] == reviewed, "reviewed"] = True
    flags = pd.DataFrame({
        "example_id": [sure, unsure, reviewed, test_id],
        "is_label_issue": True, "is_outlier": False, "is_near_duplicate": False,
        "suggested_label": "negative", "label_score": 0.01, "suggested_confidence": [0.95, 0.5, 0.99, 0.99],
    })
    given = dict(zip(df["example_id"], df["response"]))
    curated, quarantined, stats = curate(df, {}, flags, CurationPolicy(label_issues="relabel", relabel_min_confidence=0.9),
                                         SplitSpec())
    assert len(curated) + len(quarantined) == len(df)
    row = curated.set_index("example_id")
    assert row.loc[sure, "response"] == "negative" and row.loc[sure, "relabelled_from"] == given[sure]
    assert dict(zip(quarantined["example_id"], quarantined["reason"]))[unsure].startswith("label issue awaiting review")
    assert row.loc[reviewed, "response"] == given[reviewed]  # a person's keep decision stands
    assert row.loc[test_id, "response"] == given[test_id]  # the test split is never relabelled
    assert stats["relabelled"] == 1
    assert stats["quarantine_reasons"] == {"label issue awaiting review": 1}


def test_every_policy_runs_when_nothing_is_flagged():
    df = frame(40)
    flags = pd.DataFrame({"example_id": ["id0"], "is_label_issue": [False], "is_outlier": [False],
                          "is_near_duplicate": [False], "suggested_label": ["negative"], "label_score": [0.9],
                          "suggested_confidence": [0.9]})
    for policy in ("drop", "keep", "relabel"):
        curated, quarantined, _ = curate(df, {}, flags, CurationPolicy(label_issues=policy), SplitSpec())
        assert len(curated) == len(df) and quarantined.empty
