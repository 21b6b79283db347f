"""Run a suite on a frame: one great-expectations validation for all GX checks, then our SFT checks.

Each check yields a `CheckOutcome` with the failing rows' example_ids (GX's COMPLETE result format
with `unexpected_index_column_names=["example_id"]`), so curation can quarantine exactly those rows
and the UI can show them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..spec import TaskSpec
from .suite import CheckEntry, Suite, build_expectation

FAILING_ROWS_SHOWN = 20
DEFAULT_CONTROL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "</s>", "<s>", "[INST]", "[/INST]", "<|eot_id|>"]
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")
_PHONE = re.compile(r"(?<![\w+])\+?\(?\d[\d\s().-]{7,}\d(?!\w)")
_CARD = re.compile(r"(?<!\d)(?:\d[ -]?){13,19}(?!\d)")


@dataclass
class CheckOutcome:
    name: str
    passed: bool
    blocking: bool
    description: str
    metadata: dict = field(default_factory=dict)
    failing_ids: list[str] = field(default_factory=list)
    failing_rows: pd.DataFrame | None = None


def luhn_valid(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = int(ch)
        if i % 2 == parity:
            d = d * 2 - 9 if d * 2 > 9 else d * 2
        total += d
    return total % 10 == 0


def contains_pii(text: str) -> str | None:
    if _EMAIL.search(text):
        return "email"
    for match in _CARD.finditer(text):
        digits = re.sub(r"\D", "", match.group())
        if 13 <= len(digits) <= 19 and luhn_valid(digits):
            return "card_number"
    for match in _PHONE.finditer(text):
        if 9 <= len(re.sub(r"\D", "", match.group())) <= 15:
            return "phone"
    return None


def _row_outcome(entry: CheckEntry, df: pd.DataFrame, failing: pd.Series, shown_column: str | None, extra: dict | None = None) -> CheckOutcome:
    """Outcome of a row-level check; `mostly` (share of rows that must pass) defaults to 1."""
    mostly = float(entry.kwargs.get("mostly", 1.0))
    n_fail = int(failing.sum())
    rate = n_fail / max(1, len(df))
    rows = df.loc[failing, [c for c in ("example_id", shown_column, "source_file", "source_line") if c and c in df.columns]]
    return CheckOutcome(
        name=entry.name,
        passed=rate <= 1 - mostly + 1e-12,
        blocking=entry.blocking,
        description=entry.describe(),
        metadata={"failing_rows": n_fail, "failing_rate": round(rate, 6), "mostly": mostly, **(extra or {})},
        failing_ids=df.loc[failing, "example_id"].astype(str).tolist(),
        failing_rows=rows.head(FAILING_ROWS_SHOWN),
    )


def _text_columns(entry: CheckEntry) -> list[str]:
    return list(entry.kwargs.get("columns", ["prompt", "response"]))


def run_sft_check(entry: CheckEntry, df: pd.DataFrame, task: TaskSpec, token_lengths: pd.DataFrame | None,
                  max_length: int | None) -> CheckOutcome:
    kind, kw = entry.sft_check, entry.kwargs
    if kind == "token_length":
        if token_lengths is None or max_length is None:
            return CheckOutcome(entry.name, False, entry.blocking, entry.describe(),
                                {"error": "token lengths were not computed (no tokenizer)"})
        lengths = df[["example_id"]].merge(token_lengths, on="example_id", how="left")["n_tokens"]
        failing = (lengths.isna() | (lengths > max_length)).to_numpy()
        shown = df.assign(n_tokens=lengths.to_numpy())
        return _row_outcome(entry, shown, pd.Series(failing, index=df.index), "n_tokens",
                            {"max_length": max_length, "longest": int(lengths.max()) if len(lengths) else 0,
                             "p95": float(lengths.quantile(0.95)) if len(lengths) else 0.0})
    if kind == "empty_text":
        failing = pd.Series(False, index=df.index)
        for col in _text_columns(entry):
            failing |= df[col].fillna("").astype(str).str.strip().eq("")
        return _row_outcome(entry, df, failing, _text_columns(entry)[0])
    if kind == "control_tokens":
        tokens = list(kw.get("tokens", DEFAULT_CONTROL_TOKENS))
        pattern = "|".join(re.escape(t) for t in tokens)
        failing = pd.Series(False, index=df.index)
        for col in _text_columns(entry):
            failing |= df[col].fillna("").astype(str).str.contains(pattern, regex=True)
        return _row_outcome(entry, df, failing, "prompt", {"tokens": tokens})
    if kind == "label_in_set":
        if not task.labels:
            return CheckOutcome(entry.name, True, entry.blocking, entry.describe(), {"skipped": "not a label task"})
        failing = ~df["response"].isin(task.labels)
        return _row_outcome(entry, df, failing, "response", {"labels": task.labels})
    if kind == "exact_duplicates":
        failing = df.duplicated("content_hash", keep="first")
        outcome = _row_outcome(entry, df, failing, "prompt")
        max_rate = float(kw.get("max_rate", 0.0))
        outcome.passed = outcome.metadata["failing_rate"] <= max_rate
        outcome.metadata["max_rate"] = max_rate
        return outcome
    if kind == "pii":
        found = df[_text_columns(entry)].fillna("").astype(str).agg(" ".join, axis=1).map(contains_pii)
        outcome = _row_outcome(entry, df, found.notna(), "prompt",
                               {"by_kind": {str(k): int(v) for k, v in found.value_counts().items()}})
        return outcome
    if kind == "class_balance":
        min_share = float(kw.get("min_share", 0.05))
        labels = df["response"][df["response"].isin(task.labels)] if task.labels else df["response"]
        shares = labels.value_counts(normalize=True)
        rarest = float(shares.min()) if len(shares) else 0.0
        return CheckOutcome(entry.name, rarest >= min_share, entry.blocking, entry.describe(),
                            {"min_share": min_share, "rarest_share": round(rarest, 4),
                             "shares": {str(k): round(float(v), 4) for k, v in shares.items()}})
    raise ValueError(f"unknown sft_check {kind!r}")


def run_gx(entries: list[CheckEntry], df: pd.DataFrame, out_dir: Path | None) -> list[CheckOutcome]:
    """All GX expectations of a suite in one validation of one batch."""
    if not entries:
        return []
    import great_expectations as gx

    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # no tqdm noise in run logs
    batch = (
        context.data_sources.add_pandas("sft")
        .add_dataframe_asset(name="examples")
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": df})
    )
    suite = gx.ExpectationSuite(name="sft_suite")
    for entry in entries:
        suite.add_expectation(build_expectation(entry))
    result = batch.validate(suite, result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["example_id"]})
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "gx_validation.json").write_text(json.dumps(result.to_json_dict(), indent=1, default=str))
    by_name = {entry.name: entry for entry in entries}
    outcomes = []
    for res in result.results:
        entry = by_name[res.expectation_config.meta["check_name"]]
        details = res.result or {}
        index_list = details.get("unexpected_index_list") or []
        failing_ids = [str(row["example_id"]) for row in index_list if isinstance(row, dict) and "example_id" in row]
        column = entry.kwargs.get("column")
        shown = df[df["example_id"].isin(set(failing_ids))]
        shown = shown[[c for c in ("example_id", column, "source_file", "source_line") if c and c in df.columns]]
        exception = res.exception_info.get("exception_message") if res.exception_info and res.exception_info.get("raised_exception") else None
        outcomes.append(CheckOutcome(
            name=entry.name,
            passed=bool(res.success),
            blocking=entry.blocking,
            description=entry.describe(),
            metadata={k: details[k] for k in ("element_count", "unexpected_count", "unexpected_percent", "observed_value")
                      if k in details and not isinstance(details[k], (list, dict))}
            | ({"gx_exception": exception} if exception else {}),
            failing_ids=failing_ids,
            failing_rows=shown.head(FAILING_ROWS_SHOWN),
        ))
    return outcomes


def run_suite(df: pd.DataFrame, suite: Suite, *, task: TaskSpec, token_lengths: pd.DataFrame | None = None,
              max_length: int | None = None, out_dir: Path | None = None) -> list[CheckOutcome]:
    """Every check of the suite on `df`, in the suite's order."""
    gx_entries = [c for c in suite.checks if c.expectation]
    outcomes = {o.name: o for o in run_gx(gx_entries, df, out_dir)}
    for entry in suite.checks:
        if entry.sft_check:
            outcomes[entry.name] = run_sft_check(entry, df, task, token_lengths, max_length)
    ordered = [outcomes[c.name] for c in suite.checks]
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for outcome in ordered:
            if outcome.failing_ids:
                pd.DataFrame({"example_id": outcome.failing_ids}).to_csv(out_dir / f"{outcome.name}.csv", index=False)
    return ordered
