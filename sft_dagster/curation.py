"""Decide what training may use: the curated examples, and the quarantine for the rest.

Order of decisions, each recorded with its reason:
1. exact duplicates: the first occurrence stays, later repeats go;
2. rows failing a blocking row-level quality check (invalid label, empty text, longer than
   max_length, control tokens ...) go, in every split: they cannot be trained on or scored;
3. cleanlab findings follow the spec's policy, in train and validation only. The test split is
   never cleaned silently (that would inflate the reported metrics): flagged test rows stay as
   labelled, with their flags, so the report can show the as-labelled and the corrected view.
   `label_issues: relabel` trains a flagged row on cleanlab's suggested label when its calibrated
   confidence reaches `relabel_min_confidence` (the old label kept in `relabelled_from`); the other
   flagged rows are quarantined until a person decides in the review queue.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from .schema import quarantine_rows
from .spec import CurationPolicy, SplitSpec
from .splits import assign_splits

FLAG_COLUMNS = ["is_label_issue", "is_outlier", "is_near_duplicate", "suggested_label", "label_score",
                "suggested_confidence"]


def curate(
    labelled: pd.DataFrame,
    failing_ids: dict[str, Iterable[str]],
    flags: pd.DataFrame | None,
    policy: CurationPolicy,
    splits: SplitSpec,
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Returns (curated with `split` and flag columns, quarantined rows, stats).

    failing_ids: blocking check name -> example_ids that failed it (row-level checks only).
    flags: cleanlab flags per example_id (FLAG_COLUMNS), or None when cleanlab is off.
    """
    df = assign_splits(labelled, splits)
    if flags is not None and not flags.empty:
        df = df.merge(flags[["example_id", *[c for c in FLAG_COLUMNS if c in flags]]], on="example_id", how="left")
    for col in ("is_label_issue", "is_outlier", "is_near_duplicate"):
        df[col] = df[col].fillna(False).astype(bool) if col in df else False
    if "suggested_label" not in df:
        df["suggested_label"] = pd.Series(pd.NA, index=df.index, dtype="string")
    for col in ("label_score", "suggested_confidence"):
        if col not in df:
            df[col] = float("nan")
    df["relabelled_from"] = pd.Series(pd.NA, index=df.index, dtype="string")

    reason = pd.Series(pd.NA, index=df.index, dtype="string")

    first_of = df.groupby("content_hash")["example_id"].transform("first")
    repeat = df["example_id"] != first_of
    reason[repeat] = "exact duplicate of " + first_of[repeat]

    for check, ids in failing_ids.items():
        hit = df["example_id"].isin(set(ids)) & reason.isna()
        reason[hit] = f"failed blocking check {check}"

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
    if policy.near_duplicates == "drop":
        hit = trainable & df["is_near_duplicate"] & reason.isna()
        reason[hit] = "near duplicate (cleanlab)"
    if policy.outliers == "drop":
        hit = trainable & df["is_outlier"] & reason.isna()
        reason[hit] = "outlier (cleanlab)"

    removed = reason.notna()
    quarantined = quarantine_rows(df[removed], "curation", reason[removed])
    curated = df[~removed].reset_index(drop=True)
    stats = {
        "rows_in": len(df),
        "rows_kept": len(curated),
        "rows_quarantined": int(removed.sum()),
        "quarantine_reasons": {
            str(k): int(v) for k, v in reason[removed].str.replace(r"(:| of | \().*$", "", regex=True).value_counts().items()
        },
        "flagged_test_rows_kept": int((~trainable & df["is_label_issue"] & ~removed).sum()),
        "relabelled": int(curated["relabelled_from"].notna().sum()),
    }
    return curated, quarantined, stats
