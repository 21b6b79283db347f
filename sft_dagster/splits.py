"""Deterministic train / validation / test splits.

Each example's split is a pure function of its normalised prompt text and the spec's seed: a hash
mapped to [0, 1) and cut at fixed thresholds. Adding data therefore never moves an existing example
to another split (the test set stays the test set), and examples whose prompts the leakage check
counts as the same text (case, spacing and punctuation folded: duplicates, conflicting labels) always
share a split, so none leaks across. Label proportions per split match
the whole set in expectation; the stage reports them so a skew is visible.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pandas as pd

from .spec import SplitSpec

SPLITS = ("train", "validation", "test")


def split_key(prompt: str) -> str:
    return re.sub(r"\s+", " ", str(prompt)).strip().lower()


def unit_hash(key: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def normalized_text(values: pd.Series, ignore_digits: bool = False) -> pd.Series:
    """Case, punctuation and whitespace folded away: the key of the near-duplicate and leakage checks."""
    text = values.fillna("").astype(str).str.lower()
    if ignore_digits:
        text = text.str.replace(r"\d+", "0", regex=True)
    return text.str.replace(r"[\W_]+", " ", regex=True).str.strip()


def assign_splits(df: pd.DataFrame, cfg: SplitSpec) -> pd.DataFrame:
    """`df` with a `split` column added (no rows removed).

    Prompts that the leakage check counts as the same text (`normalized_text`: punctuation folded too)
    share a split: each takes the split of its group's smallest `split_key`, so a prompt with no such
    twin keeps the split of its own key. Keyed by `split_key` alone, "My card is lost." and "my card is
    lost" could land in train and test, and `no_split_leakage` would then block a run that curation
    cannot repair (found on Banking77)."""
    keys = df["prompt"].map(split_key)
    group = normalized_text(df["prompt"])
    keys = keys.groupby(group.where(group.str.len() > 0, keys), sort=False).transform("min")
    u = np.fromiter((unit_hash(k, cfg.seed) for k in keys), dtype=float, count=len(df))
    split = np.where(u < cfg.test, "test", np.where(u < cfg.test + cfg.validation, "validation", "train"))
    return df.assign(split=pd.Series(split, index=df.index, dtype="string"))


def in_split_order(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of train, then validation, then test, each in their own order (as the split files hold them)."""
    return pd.concat([df[df["split"] == s] for s in SPLITS], ignore_index=True)


def split_summary(df: pd.DataFrame, label_column: str | None = "response") -> dict:
    """Row counts per split, and label counts per split for label tasks."""
    summary: dict = {"rows": {s: int((df["split"] == s).sum()) for s in SPLITS}}
    if label_column:
        summary["labels"] = {
            s: {str(k): int(v) for k, v in df.loc[df["split"] == s, label_column].value_counts().sort_index().items()}
            for s in SPLITS
        }
    return summary
