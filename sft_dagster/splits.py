"""Deterministic train / validation / test splits.

Each example's split is a pure function of its normalised prompt text and the spec's seed: a hash
mapped to [0, 1) and cut at fixed thresholds. Adding data therefore never moves an existing example
to another split (the test set stays the test set), and examples with the same prompt (duplicates,
conflicting labels) always share a split, so none leaks across. Label proportions per split match
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


def assign_splits(df: pd.DataFrame, cfg: SplitSpec) -> pd.DataFrame:
    """`df` with a `split` column added (no rows removed)."""
    u = np.fromiter((unit_hash(split_key(p), cfg.seed) for p in df["prompt"]), dtype=float, count=len(df))
    split = np.where(u < cfg.test, "test", np.where(u < cfg.test + cfg.validation, "validation", "train"))
    return df.assign(split=pd.Series(split, index=df.index, dtype="string"))


def split_summary(df: pd.DataFrame, label_column: str | None = "response") -> dict:
    """Row counts per split, and label counts per split for label tasks."""
    summary: dict = {"rows": {s: int((df["split"] == s).sum()) for s in SPLITS}}
    if label_column:
        summary["labels"] = {
            s: {str(k): int(v) for k, v in df.loc[df["split"] == s, label_column].value_counts().sort_index().items()}
            for s in SPLITS
        }
    return summary
