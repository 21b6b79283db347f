"""Decide what training may use: the curated examples, and the quarantine for the rest.

Rows are first grouped into duplicate clusters (`quality/duplicates.py`: exact duplicates, the same
text up to case, punctuation and spacing, cleanlab's near-duplicate sets). Each cluster has one
representative: a reviewed row first, else the first by source order (a row failing a blocking check
only when no other row is left). `near_duplicates: drop` (step 4) keeps each cluster's representative
and quarantines the other rows of train and validation, naming the id kept.

Order of decisions, each recorded with its reason:
1. exact duplicates: one row of identical content stays (the representative when it is one of
   them), the repeats go, in every split, naming the id kept;
2. rows failing a blocking row-level quality check (invalid label, empty text, longer than
   max_length, control tokens ...) go, in every split: they cannot be trained on or scored;
3. label conflicts (label tasks): a cluster whose rows carry different labels is held out of train
   and validation whole, until the rows a data engineer reviewed (`keep`) agree on one label; then
   the rows with another label go. The review queue lists every unresolved conflict with its labels;
4. cleanlab findings follow the spec's policy, in train and validation only. The test split is
   never cleaned silently (that would inflate the reported metrics): flagged test rows stay as
   labelled, with their flags, so the report can show the as-labelled and the corrected view.
   `label_issues: relabel` trains a flagged row on cleanlab's suggested label when its calibrated
   confidence reaches `relabel_min_confidence` (the old label kept in `relabelled_from`); the other
   flagged rows are quarantined until a person decides in the review queue. Generation tasks' response
   findings (misaligned, wrong language, copy ...; warnings such as boilerplate never) follow
   `response_issues: drop | keep` the same way, train and validation only, reviewed rows never;
5. `leaking_train_rows: drop` (default) quarantines every train row still in that nearly repeats a
   validation or test row (`quality/leakage.py`: cleanlab's near-duplicate sets, or TF-IDF cosine
   >= 0.9 with the same numbers), naming that row; the evaluation row stays. With `keep`, the
   blocking `no_leakage_across_splits` check on the splits fails on them.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from .quality.duplicates import conflicting_clusters, describe_labels, duplicate_clusters, representatives
from .quality.leakage import leaking_pairs
from .schema import quarantine_rows
from .spec import CurationPolicy, SplitSpec
from .splits import assign_splits

FLAG_COLUMNS = ["is_label_issue", "is_outlier", "is_near_duplicate", "suggested_label", "label_score",
                "suggested_confidence"]
# Generation tasks' response findings (quality/response_issues.py), carried when the flags have them.
RESPONSE_FLAG_COLUMNS = ["is_response_issue", "is_response_warning", "response_issue_types", "response_issue_score",
                         "response_issue_reason"]


def curate(
    labelled: pd.DataFrame,
    failing_ids: dict[str, Iterable[str]],
    flags: pd.DataFrame | None,
    policy: CurationPolicy,
    splits: SplitSpec,
    label_task: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Returns (curated with `split` and flag columns, quarantined rows, stats).

    failing_ids: blocking check name -> example_ids that failed it (row-level checks only).
    flags: cleanlab flags per example_id (FLAG_COLUMNS, and `near_duplicate_of`), or None when cleanlab is off.
    label_task: whether `response` is a label (label conflicts are looked for only then).
    """
    df = _with_flags(assign_splits(labelled, splits), flags)
    reason = pd.Series(pd.NA, index=df.index, dtype="string")
    failing = df["example_id"].isin({i for ids in failing_ids.values() for i in ids})
    clusters = duplicate_clusters(df, label_task, flags)
    # Within a cluster the same rule picks the same row, so an exact group holding the representative keeps it.
    exact_kept = representatives(df, df["content_hash"].astype("string"), ~failing)
    repeat = df["example_id"] != exact_kept
    reason[repeat] = "exact duplicate of " + exact_kept[repeat]
    for check, ids in failing_ids.items():
        hit = df["example_id"].isin(set(ids)) & reason.isna()
        reason[hit] = f"failed blocking check {check}"
    conflicts = _label_conflicts(df, clusters, reason) if label_task else {"clusters": 0, "rows_held_out": 0,
                                                                            "resolved_by_review": 0}
    _findings_policy(df, reason, policy)
    if policy.near_duplicates == "drop":
        _drop_near_duplicates(df, clusters, reason)
    if policy.leaking_train_rows == "drop":
        _drop_leaking_train_rows(df, reason, flags)
    if policy.outliers == "drop":
        hit = (df["split"] != "test") & df["is_outlier"] & reason.isna()
        reason[hit] = "outlier (cleanlab)"

    removed = reason.notna()
    # An exact repeat names the row of its content that stayed; when that row went too (a near duplicate
    # of another), the id the cluster kept is named as well.
    is_removed = dict(zip(df["example_id"], removed))
    final_kept = representatives(df, clusters, ~removed)
    via = (repeat & exact_kept.map(is_removed).fillna(False).astype(bool) & ~final_kept.map(is_removed).fillna(True).astype(bool)
           & reason.str.startswith("exact duplicate of").fillna(False))
    reason[via] = reason[via] + " (kept: " + final_kept[via] + ")"
    quarantined = quarantine_rows(df[removed], "curation", reason[removed])
    curated = df[~removed].reset_index(drop=True)
    return curated, quarantined, _stats(df, curated, reason, clusters, conflicts)


def _with_flags(df: pd.DataFrame, flags: pd.DataFrame | None) -> pd.DataFrame:
    """The split rows with cleanlab's flags (and a generation task's response findings) joined, every
    flag column present, and `relabelled_from` empty."""
    if flags is not None and not flags.empty:
        df = df.merge(flags[["example_id", *[c for c in FLAG_COLUMNS + RESPONSE_FLAG_COLUMNS if c in flags]]],
                      on="example_id", how="left")
    if "is_response_issue" in df:
        df["is_response_issue"] = df["is_response_issue"].fillna(False).astype(bool)
    for col in ("is_label_issue", "is_outlier", "is_near_duplicate"):
        df[col] = df[col].fillna(False).astype(bool) if col in df else False
    if "suggested_label" not in df:
        df["suggested_label"] = pd.Series(pd.NA, index=df.index, dtype="string")
    for col in ("label_score", "suggested_confidence"):
        if col not in df:
            df[col] = float("nan")
    df["relabelled_from"] = pd.Series(pd.NA, index=df.index, dtype="string")
    return df


def _label_conflicts(df: pd.DataFrame, clusters: pd.Series, reason: pd.Series) -> dict:
    """Step 3: clusters whose rows carry different labels, held out of train and validation until the
    reviewed rows agree; `reason` is set in place. Returns the conflict counts."""
    in_training = df["split"] != "test"  # train and validation
    considered = reason.isna()
    conflict = conflicting_clusters(df, clusters, considered) & considered
    reviewed = df["reviewed"].fillna(False).astype(bool)
    reviewed_labels = df["response"].where(reviewed & considered).groupby(clusters).transform("nunique")
    resolved = conflict & reviewed_labels.eq(1)
    decided = df["response"].where(reviewed & considered).groupby(clusters).transform("first")
    decided_by = df["example_id"].where(reviewed & considered).groupby(clusters).transform("first")
    hit = resolved & (df["response"] != decided) & in_training
    reason[hit] = ("label conflict resolved by review: " + decided_by[hit].astype(str) + " is labelled "
                   + decided[hit].astype(str))
    open_conflict = conflict & ~resolved
    detail = {c: describe_labels(g) for c, g in df[open_conflict].groupby(clusters[open_conflict])}
    hit = open_conflict & in_training
    reason[hit] = "label conflict: duplicates labelled " + clusters[hit].map(detail).astype("string") + "; decide in the review queue"
    return {"clusters": int(clusters[open_conflict].nunique()), "rows_held_out": int(hit.sum()),
            "resolved_by_review": int(clusters[resolved].nunique())}


def _findings_policy(df: pd.DataFrame, reason: pd.Series, policy: CurationPolicy) -> None:
    """Step 4 for label issues and response findings, train and validation only; `reason` and the
    relabelled rows' `response` are set in place."""
    trainable = df["split"] != "test"
    if policy.label_issues in ("drop", "relabel"):
        hit = trainable & df["is_label_issue"] & ~df["reviewed"].astype(bool) & reason.isna()
        if policy.label_issues == "relabel":
            sure = hit & df["suggested_label"].notna() & (df["suggested_label"] != df["response"]) & (
                df["suggested_confidence"].astype(float) >= policy.relabel_min_confidence)
            df.loc[sure, "relabelled_from"] = df.loc[sure, "response"].astype(str)
            df.loc[sure, "response"] = df.loc[sure, "suggested_label"].astype(str)
            hit &= ~sure
        reason[hit] = (
            ("label issue awaiting review: given " if policy.label_issues == "relabel" else "label issue: given ")
            + df.loc[hit, "response"].astype(str)
            + ", suggested " + df.loc[hit, "suggested_label"].astype(str).fillna("none")
            # "{:.3f}": under pandas 3 a NaN cast to str stays missing and would blank the whole reason;
            # .astype(str): an empty selection maps to float64, which str + cannot take
            + " (label score " + df.loc[hit, "label_score"].astype(float).map("{:.3f}".format).astype(str)
            + ", confidence " + df.loc[hit, "suggested_confidence"].astype(float).map("{:.3f}".format).astype(str) + ")"
        )
    if "is_response_issue" in df and policy.response_issues == "drop":
        hit = trainable & df["is_response_issue"] & ~df["reviewed"].astype(bool) & reason.isna()
        reason[hit] = ("response issue (" + df.loc[hit, "response_issue_types"].astype(str) + "): "
                       + df.loc[hit, "response_issue_reason"].astype(str))


def _drop_near_duplicates(df: pd.DataFrame, clusters: pd.Series, reason: pd.Series) -> None:
    """Step 4 for near duplicates: each cluster keeps its representative in train and validation;
    `reason` is set in place."""
    kept_of = representatives(df, clusters, reason.isna())  # among the rows still in
    hit = (df["split"] != "test") & (df["example_id"] != kept_of) & reason.isna()
    reason[hit] = "near duplicate of " + kept_of[hit]


def _drop_leaking_train_rows(df: pd.DataFrame, reason: pd.Series, flags: pd.DataFrame | None) -> None:
    """Step 5: a train row that nearly repeats a validation/test row still in goes (the evaluation row
    stays: test is never cleaned); `reason` is set in place."""
    leaks = leaking_pairs(df[reason.isna()], flags).drop_duplicates("train_id").set_index("train_id")["evaluation_id"]
    hit = df["example_id"].isin(set(leaks.index)) & reason.isna()
    reason[hit] = "near copy of evaluation row " + df.loc[hit, "example_id"].map(leaks).astype(str)


def _stats(df: pd.DataFrame, curated: pd.DataFrame, reason: pd.Series, clusters: pd.Series, conflicts: dict) -> dict:
    removed, trainable = reason.notna(), df["split"] != "test"
    stats = {
        "rows_in": len(df),
        "rows_kept": len(curated),
        "rows_quarantined": int(removed.sum()),
        "duplicate_clusters": int(clusters[clusters.duplicated(keep=False)].nunique()),
        "label_conflicts": conflicts,
        "quarantine_reasons": {
            str(k): int(v) for k, v in reason[removed].str.replace(r"(:| of | \().*$", "", regex=True).value_counts().items()
        },
        "flagged_test_rows_kept": int((~trainable & df["is_label_issue"] & ~removed).sum()),
        "relabelled": int(curated["relabelled_from"].notna().sum()),
    }
    if "is_response_issue" in df:
        stats["response_issues_quarantined"] = int(reason[removed].str.startswith("response issue").sum())
        stats["flagged_test_response_rows_kept"] = int((~trainable & df["is_response_issue"] & ~removed).sum())
    return stats
