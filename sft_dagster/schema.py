"""Column contracts shared by the stages.

Every stage passes pandas DataFrames with these columns; the quarantine collects every row a stage
removes, with its reason, so that rows in = rows kept + rows quarantined holds at each stage.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pandas as pd

# Canonical examples (output of ingest). For label tasks `response` holds the label.
EXAMPLE_COLUMNS = [
    "example_id",  # content hash, with "~N" appended for the N-th repeat of identical content
    "content_hash",  # hash of (system, prompt, response[, history]): equal for exact duplicates
    "prompt",
    "response",
    "system",  # may be null
    "history",  # a multi-turn chat's earlier turns: JSON list of {role, content}; null for one exchange
    "source_file",
    "source_line",  # 1-based line (JSONL/CSV data line) or row number (Parquet)
    "metadata",  # JSON object of the source's other columns
]

# Added by the labels stage.
LABEL_COLUMNS = [
    "original_response",  # the response as ingested
    "label_source",  # "source" or "correction"
    "correction_note",
    "reviewed",  # a data engineer marked this row checked-correct ("keep")
]

QUARANTINE_COLUMNS = ["example_id", "stage", "reason", "source_file", "source_line", "record"]


def column_or_none(df: pd.DataFrame, column: str) -> list:
    """A column's values, or None for every row of a frame written before the column existed."""
    return list(df[column]) if column in df.columns else [None] * len(df)


def content_hash(*parts: Any) -> str:
    blob = json.dumps([("" if p is None or (isinstance(p, float) and pd.isna(p)) else str(p)) for p in parts])
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def frame_hash(df: pd.DataFrame) -> str:
    """A content hash of a frame (row order included): the data version of a dataset asset."""
    hashed = pd.util.hash_pandas_object(df.astype("string").fillna("<NA>"), index=False)
    h = hashlib.sha256(hashed.to_numpy().tobytes())
    h.update(",".join(map(str, df.columns)).encode())
    return h.hexdigest()[:16]


def lineage_hash_of(lineage: dict) -> str:
    """The hash that names a trained model: of everything that shaped it (data, base model, spec, code,
    library versions, device kind)."""
    return hashlib.sha256(json.dumps(lineage, sort_keys=True, default=str).encode()).hexdigest()[:16]


def quarantine_rows(df: pd.DataFrame, stage: str, reasons: pd.Series | str) -> pd.DataFrame:
    """Quarantine records for `df`'s rows, keeping each row's whole content in `record`."""
    if df.empty:
        return empty_quarantine()
    content_cols = [c for c in df.columns if c not in ("source_file", "source_line")]
    records = df[content_cols].astype(object).where(df[content_cols].notna(), None).to_dict("records")
    return pd.DataFrame(
        {
            "example_id": df["example_id"].astype("string").to_numpy() if "example_id" in df else None,
            "stage": stage,
            "reason": reasons.to_numpy() if isinstance(reasons, pd.Series) else reasons,
            "source_file": df["source_file"].to_numpy() if "source_file" in df else None,
            "source_line": df["source_line"].to_numpy() if "source_line" in df else None,
            "record": [json.dumps(r, default=str, ensure_ascii=False) for r in records],
        }
    )[QUARANTINE_COLUMNS]


def empty_quarantine() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="object") for c in QUARANTINE_COLUMNS})
