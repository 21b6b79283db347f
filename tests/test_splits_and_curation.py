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


def test_prompts_the_leakage_check_calls_equal_share_a_split_whatever_their_punctuation():
    """Every punctuation variant of a prompt lands in one split (the leakage check folds punctuation), so
    `no_split_leakage` passes on the splits; prompts without such a twin keep the split of their own key."""
    from sft_dagster.quality.checks import run_sft_check
    from sft_dagster.quality.suite import CheckEntry
    from sft_dagster.spec import TaskSpec
    from sft_dagster.splits import split_key, unit_hash

    df = frame(600)
    variants = ["My card is lost!", "my card, is lost", "My card is lost?", "MY-CARD IS LOST", "my_card is lost."]
    for i, text in enumerate(variants):
        df.loc[i, "prompt"] = text
    cfg = SplitSpec(validation=0.1, test=0.2, seed=0)
    split = assign_splits(df, cfg)["split"]
    assert split[: len(variants)].nunique() == 1
    # Without the grouping these variants fall into different splits: the test would mean nothing otherwise.
    own = [unit_hash(split_key(t), cfg.seed) for t in variants]
    assert len({"test" if u < 0.2 else "validation" if u < 0.3 else "train" for u in own}) > 1
    alone = assign_splits(frame(600).iloc[len(variants):], cfg)["split"]
    assert (split[len(variants):] == alone).all()
    entry = CheckEntry(name="no_split_leakage", sft_check="split_leakage", kwargs={"column": "prompt"}, blocking=True)
    leak = run_sft_check(entry, split.to_frame().join(df), TaskSpec(type="instruction"), None, None)
    assert leak.passed and not leak.failing_ids


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


def _train_prompt(stem: str, cfg: SplitSpec = SplitSpec()) -> str:
    """A prompt (from `stem`) whose copies land in the train split, whatever their case and spacing."""
    for i in range(200):
        prompt = f"{stem} {i}"
        if assign_splits(pd.DataFrame({"prompt": [prompt]}), cfg)["split"].iloc[0] == "train":
            return prompt
    raise AssertionError("no train prompt found")


def with_copies(copies: list[tuple[str, str]], reviewed: set[int] = frozenset()) -> pd.DataFrame:
    """frame(40) plus `copies` (prompt, label) appended as ids c0, c1, ... in source order."""
    df = frame(40)
    extra = pd.DataFrame({
        "example_id": [f"c{i}" for i in range(len(copies))],
        "content_hash": [f"h-{p}-{lab}" for p, lab in copies],
        "prompt": [p for p, _ in copies], "response": [lab for _, lab in copies], "system": [None] * len(copies),
        "source_file": ["g"] * len(copies), "source_line": range(1, len(copies) + 1),
        "reviewed": [i in reviewed for i in range(len(copies))],
    })
    return pd.concat([df, extra], ignore_index=True)


def test_near_duplicates_keep_one_representative_per_cluster():
    base = _train_prompt("Battery life is great, really")
    copies = [(base, "positive"), (base.upper(), "positive"), ("  " + base.replace(" ", "  ") + "!", "positive")]
    df = with_copies(copies)
    curated, quarantined, stats = curate(df, {}, None, CurationPolicy(near_duplicates="drop"), SplitSpec())
    assert "c0" in set(curated["example_id"])  # the first by source order stays: the text is not lost
    reasons = dict(zip(quarantined["example_id"], quarantined["reason"]))
    assert reasons == {"c1": "near duplicate of c0", "c2": "near duplicate of c0"}
    assert len(curated) + len(quarantined) == len(df)
    # A reviewed row is the representative, wherever it is in the file.
    curated, quarantined, _ = curate(with_copies(copies, reviewed={2}), {}, None, CurationPolicy(near_duplicates="drop"),
                                     SplitSpec())
    assert dict(zip(quarantined["example_id"], quarantined["reason"])) == {"c0": "near duplicate of c2",
                                                                           "c1": "near duplicate of c2"}
    # `keep` keeps near duplicates; cleanlab's near-duplicate sets join the clusters.
    assert len(curate(with_copies(copies), {}, None, CurationPolicy(near_duplicates="keep"), SplitSpec())[1]) == 0
    other = _train_prompt("Charger died after a week")
    df = with_copies([(base, "positive"), (other, "positive")])
    flags = pd.DataFrame({"example_id": df["example_id"], "is_label_issue": False, "is_outlier": False,
                          "is_near_duplicate": df["example_id"].isin(["c0", "c1"]), "suggested_label": None,
                          "label_score": 1.0, "near_duplicate_of": df["example_id"].map({"c0": "c1", "c1": "c0"}).fillna("")})
    quarantined = curate(df, {}, flags, CurationPolicy(near_duplicates="drop"), SplitSpec())[1]
    assert dict(zip(quarantined["example_id"], quarantined["reason"])) == {"c1": "near duplicate of c0"}


def test_exact_duplicates_keep_the_reviewed_row():
    base = _train_prompt("Arrived broken")
    df = with_copies([(base, "negative"), (base, "negative")], reviewed={1})
    df.loc[df["example_id"] == "c1", "content_hash"] = df.loc[df["example_id"] == "c0", "content_hash"].iloc[0]
    quarantined = curate(df, {}, None, CurationPolicy(near_duplicates="keep"), SplitSpec())[1]
    assert dict(zip(quarantined["example_id"], quarantined["reason"])) == {"c0": "exact duplicate of c1"}


def test_duplicates_with_different_labels_are_a_label_conflict_until_reviewed():
    base = _train_prompt("It does the job")
    copies = [(base, "positive"), ("  " + base.upper(), "negative"), (base, "positive")]
    for policy in ("drop", "keep"):
        curated, quarantined, stats = curate(with_copies(copies), {}, None, CurationPolicy(near_duplicates=policy),
                                             SplitSpec())
        reasons = dict(zip(quarantined["example_id"], quarantined["reason"]))
        assert set(reasons) == {"c0", "c1", "c2"}, policy  # neither label is trained on
        assert reasons["c1"] == "label conflict: duplicates labelled negative (c1) vs positive (c0); decide in the review queue"
        assert reasons["c2"] == "exact duplicate of c0"
        assert stats["label_conflicts"]["clusters"] == 1 and stats["label_conflicts"]["rows_held_out"] == 2
    # A data engineer keeps the negative row: the conflict is resolved in its favour.
    curated, quarantined, stats = curate(with_copies(copies, reviewed={1}), {}, None, CurationPolicy(), SplitSpec())
    assert "c1" in set(curated["example_id"])
    reasons = dict(zip(quarantined["example_id"], quarantined["reason"]))
    assert reasons == {"c0": "label conflict resolved by review: c1 is labelled negative",
                       "c2": "exact duplicate of c0 (kept: c1)"}
    assert stats["label_conflicts"] == {"clusters": 0, "rows_held_out": 0, "resolved_by_review": 1}
    # Generation tasks have no labels to conflict: different answers to one prompt stay.
    generation = curate(with_copies(copies), {}, None, CurationPolicy(near_duplicates="keep"), SplitSpec(),
                        label_task=False)[1]
    assert generation["example_id"].tolist() == ["c2"]  # the exact repeat only


def test_label_conflicts_join_the_review_queue_with_both_labels():
    from sft_dagster.quality.duplicates import with_label_conflicts

    base = _train_prompt("It does the job")
    df = with_copies([(base, "positive"), (base.lower() + ".", "negative")])
    queue = pd.DataFrame({"example_id": ["c0", "id3"], "prompt": [base, "x"], "given_label": ["positive", "negative"],
                          "suggested_label": ["negative", "positive"], "is_label_issue": [True, True],
                          "is_outlier": [False, False], "is_near_duplicate": [False, False],
                          "issue_types": ["label", "label"], "severity": [0.7, 0.9]})
    out = with_label_conflicts(queue, df, None).set_index("example_id")
    assert list(out.index[:2]) == ["c0", "c1"] and out.loc["id3", "severity"] == 0.9
    assert out.loc["c0", "issue_types"] == "label,label_conflict" and out.loc["c1", "issue_types"] == "label_conflict"
    assert out.loc["c1", "given_label"] == "negative" and out.loc["c1", "conflict_labels"] == "negative|positive"
    assert out.loc["c0", "conflict_detail"] == "negative (c1) vs positive (c0)"
    # Resolved (one side reviewed): no longer queued as a conflict.
    resolved = with_copies([(base, "positive"), (base.lower() + ".", "negative")], reviewed={0})
    assert "label_conflict" not in "".join(with_label_conflicts(queue, resolved, None)["issue_types"])


def test_clusters_ignore_rows_without_text():
    from sft_dagster.quality.duplicates import duplicate_clusters

    df = with_copies([("", "positive"), ("Same words here", "negative"), ("same words HERE", "positive")])
    clusters = duplicate_clusters(df, True).tolist()
    n = len(df)
    assert clusters[n - 3] == n - 3  # the empty prompt joins nothing
    assert clusters[n - 2] == clusters[n - 1] == n - 2  # positions, not positions among the non-empty rows
    assert clusters[:n - 3] == list(range(n - 3))
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
