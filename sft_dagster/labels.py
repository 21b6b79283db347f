"""The corrections file data engineers maintain, and applying it to ingested examples.

A corrections file is a CSV with one decision per row:

    example_id,action,new_value,note,author,timestamp,old_value
    3f2a...,relabel,negative,"sarcasm, not praise",ana,2026-11-24T10:00:00Z,positive
    9c1b...,drop,,"not a review",ana,...
    77de...,keep,,"checked: label is right",ana,...

`relabel` sets a new response/label, `drop` sends the row to the quarantine, `keep` marks the row as
checked-correct so quality gates stop flagging it. The last decision for an example wins, so the
file doubles as an append-only audit log. Edits are atomic (write a temp file, then rename).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pandas as pd

from . import atomic
from .schema import quarantine_rows

CORRECTION_COLUMNS = ["example_id", "action", "new_value", "note", "author", "timestamp", "old_value"]
ACTIONS = ("relabel", "drop", "keep")
REQUIRED_COLUMNS = ("example_id", "action")


class CorrectionsError(ValueError):
    """A corrections file that cannot be used; the message names file, line and field."""


def empty_corrections() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="string") for c in CORRECTION_COLUMNS})


def read_corrections(path: str | Path) -> pd.DataFrame:
    """Parse and validate a corrections file; a missing file means no corrections."""
    path = Path(path)
    if not path.exists():
        return empty_corrections()
    try:
        # utf-8-sig: a byte-order mark (a file saved from Excel) is not part of the first column's name.
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            if not header:
                return empty_corrections()
            check_header(path, header)
            rows = []
            for row in reader:
                line = reader.line_num
                if None in row:
                    raise CorrectionsError(f"{path}:{line}: row has more fields than the header")
                example_id = (row.get("example_id") or "").strip()
                action = (row.get("action") or "").strip().lower()
                new_value = row.get("new_value")
                if not example_id:
                    raise CorrectionsError(f"{path}:{line}: example_id: must not be empty")
                if action not in ACTIONS:
                    raise CorrectionsError(f"{path}:{line}: action: {action!r} is not one of {list(ACTIONS)}")
                if action == "relabel" and not (new_value or "").strip():
                    raise CorrectionsError(f"{path}:{line}: new_value: a relabel needs the new value")
                rows.append({c: (row.get(c) or None) for c in CORRECTION_COLUMNS} | {"example_id": example_id, "action": action})
    except UnicodeDecodeError as exc:
        raise CorrectionsError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise CorrectionsError(f"{path}: not valid CSV: {exc}") from None
    if not rows:
        return empty_corrections()
    return pd.DataFrame(rows, columns=CORRECTION_COLUMNS).astype("string")


def check_header(path: Path, header: list[str]) -> None:
    """The header names only known columns and has the required ones; before any row is read, so a
    misnamed column is reported as such (not as an empty value on line 2)."""
    unknown = [c for c in header if c not in CORRECTION_COLUMNS]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if unknown or missing:
        problems = ([f"unknown column(s) {unknown}"] if unknown else []) + ([f"missing {missing}"] if missing else [])
        raise CorrectionsError(f"{path}:1: header: {'; '.join(problems)}; expected columns {CORRECTION_COLUMNS} "
                               f"({', '.join(REQUIRED_COLUMNS)} required, in any order)")


def append_corrections(path: str | Path, rows: list[dict]) -> None:
    """Append decisions: concurrent writers never lose each other's decisions, readers never see half a file.

    The read-modify-replace runs under an exclusive lock on `<file>.lock` beside the corrections file
    (two `sft-dagster accept` at once: the second waits for the first's rename, then appends to it).
    The new content is validated before it replaces the old, so a bad edit never lands.
    """
    path = Path(path)
    for row in rows:
        if row.get("action") not in ACTIONS:
            raise CorrectionsError(f"{path}: action: {row.get('action')!r} is not one of {list(ACTIONS)}")
    def validate(tmp: Path) -> None:
        try:
            read_corrections(tmp)
        except CorrectionsError as exc:
            raise CorrectionsError(str(exc).replace(str(tmp), str(path)) + " (the file was left unchanged)") from None

    with atomic.file_lock(path):
        existing = path.read_text(encoding="utf-8-sig") if path.exists() else ""
        header = next(csv.reader([existing.split("\n", 1)[0]]), []) if existing.strip() else []
        if header:
            check_header(path, header)
        with atomic.atomic_file(path, "w", validate=validate, newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=CORRECTION_COLUMNS, extrasaction="raise")
            if set(header) == set(CORRECTION_COLUMNS) and header:  # append to the text as it is
                fh.write(existing if existing.endswith("\n") else existing + "\n")
                writer = csv.DictWriter(fh, fieldnames=header, extrasaction="raise")
            else:  # new, or a header with fewer columns: rewritten with every column, no value lost
                writer.writeheader()
                if header:
                    writer.writerows({c: r.get(c) or "" for c in CORRECTION_COLUMNS}
                                     for r in csv.DictReader(io.StringIO(existing, newline="")))
            for row in rows:
                writer.writerow({c: row.get(c, "") for c in writer.fieldnames})


def latest_decisions(corrections: pd.DataFrame) -> pd.DataFrame:
    """The last decision per example_id (the file is an append-only log)."""
    return corrections.drop_duplicates("example_id", keep="last").set_index("example_id")


def apply_corrections(
    examples: pd.DataFrame, corrections: pd.DataFrame, allowed_labels: list[str] | None = None, source: str = "corrections"
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Apply decisions to ingested examples.

    Returns (labelled, quarantined, stats). `labelled` keeps every column of `examples` plus
    original_response, label_source, correction_note and reviewed; `quarantined` holds the rows a
    `drop` decision removed. Decisions for unknown example_ids are reported in stats, not applied.
    """
    decisions = latest_decisions(corrections)
    if allowed_labels is not None:
        bad = decisions[(decisions["action"] == "relabel") & ~decisions["new_value"].isin(allowed_labels)]
        if not bad.empty:
            first = bad.index[0]
            raise CorrectionsError(
                f"{source}: new_value: {bad.loc[first, 'new_value']!r} for example {first} is not an allowed label {allowed_labels}"
            )
    out = examples.copy()
    out["original_response"] = out["response"]
    out["label_source"] = "source"
    out["correction_note"] = pd.Series(pd.NA, index=out.index, dtype="string")
    out["reviewed"] = False

    action = out["example_id"].map(decisions["action"]) if len(decisions) else pd.Series(pd.NA, index=out.index)
    new_value = out["example_id"].map(decisions["new_value"]) if len(decisions) else action
    note = out["example_id"].map(decisions["note"]) if len(decisions) else action

    relabel = (action == "relabel").fillna(False).astype(bool)
    out.loc[relabel, "response"] = new_value[relabel]
    out.loc[relabel, "label_source"] = "correction"
    out.loc[relabel | action.notna(), "correction_note"] = note[relabel | action.notna()]
    out.loc[(action == "keep").fillna(False).astype(bool), "reviewed"] = True

    drop = (action == "drop").fillna(False).astype(bool)
    reasons = "dropped by corrections file: " + note[drop].fillna("no note").astype(str)
    quarantined = quarantine_rows(out[drop], "labels", reasons)
    labelled = out[~drop].reset_index(drop=True)

    unknown = sorted(set(decisions.index) - set(examples["example_id"]))
    stats = {
        "relabelled": int(relabel.sum()),
        "dropped": int(drop.sum()),
        "kept_as_reviewed": int((action == "keep").fillna(False).sum()),
        "unknown_example_ids": len(unknown),
        "unknown_example_ids_sample": unknown[:10],
    }
    return labelled, quarantined, stats


def label_issue_detection_scores(labelled: pd.DataFrame, flags: pd.DataFrame, audit: pd.DataFrame) -> dict:
    """Precision and recall of cleanlab's label-issue flags against known label errors.

    `audit` lists every known error by its text (`text` or `prompt` column) and `true_label`; rows not
    listed are taken as correctly labelled.
    """
    text_col = "text" if "text" in audit.columns else "prompt"
    known_bad = set(audit[text_col].astype(str))
    frame = labelled[["example_id", "prompt"]].merge(flags[["example_id", "is_label_issue"]], on="example_id", how="left")
    flagged = frame["is_label_issue"].fillna(False).astype(bool)
    truly_bad = frame["prompt"].astype(str).isin(known_bad)
    tp = int((flagged & truly_bad).sum())
    precision = tp / int(flagged.sum()) if flagged.any() else 0.0
    recall = tp / int(truly_bad.sum()) if truly_bad.any() else 0.0
    return {
        "known_errors": int(truly_bad.sum()),
        "flagged": int(flagged.sum()),
        "true_positives": tp,
        "precision": round(precision, 4),
        "recall": round(recall, 4),
    }
