"""Run a suite on a frame: one great-expectations validation for all GX checks, then our SFT checks.

Each check yields a `CheckOutcome` with the failing rows' example_ids (GX's COMPLETE result format
with `unexpected_index_column_names=["example_id"]`), so curation can quarantine exactly those rows
and the UI can show them.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .. import atomic
from ..spec import TaskSpec
from .check_registry import FAILING_ROWS_SHOWN, CheckOutcome
from .sft_checks import run_sft_check
from .suite import CheckEntry, Suite, build_expectation


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
        atomic.write_json(out_dir / "gx_validation.json", result.to_json_dict(), indent=1)
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
              max_length: int | None = None, splits: pd.DataFrame | None = None, out_dir: Path | None = None,
              special_tokens: list[str] | None = None) -> list[CheckOutcome]:
    """Every check of the suite on `df`, in the suite's order.

    token_lengths: (example_id, n_tokens, n_response_tokens) from the trainer's tokenizer; without it
    the token_length check fails (it cannot be skipped silently). splits: (example_id, split), or a
    `split` column in `df`, for the leakage check. special_tokens: the tokenizer's special tokens,
    added to the control_tokens check's list.
    """
    gx_entries = [c for c in suite.checks if c.expectation]
    outcomes = {o.name: o for o in run_gx(gx_entries, df, out_dir)}
    for entry in suite.checks:
        if entry.sft_check:
            try:
                outcomes[entry.name] = run_sft_check(entry, df, task, token_lengths, max_length, splits, special_tokens)
            except KeyError as exc:  # a missing column fails the check (has_required_columns says which)
                outcomes[entry.name] = CheckOutcome(entry.name, False, entry.blocking, entry.describe(),
                                                    {"error": f"missing column {exc}"})
    ordered = [outcomes[c.name] for c in suite.checks]
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for outcome in ordered:
            path = out_dir / f"{outcome.name}.csv"
            if outcome.failing_ids:
                atomic.write_csv(path, pd.DataFrame({"example_id": outcome.failing_ids}))
            else:
                path.unlink(missing_ok=True)  # no list left over from an earlier run
    return ordered


FINDING_COLUMNS = ["check", "example_id", "blocking"]


def findings_frame(outcomes: list[CheckOutcome]) -> pd.DataFrame:
    """The suite's row findings: one row per (check, failing example_id), with the check's blocking flag."""
    rows = [(o.name, str(i), bool(o.blocking)) for o in outcomes for i in o.failing_ids]
    return pd.DataFrame(rows, columns=FINDING_COLUMNS).astype({"check": str, "example_id": str, "blocking": bool})


def blocking_failures(findings: pd.DataFrame) -> dict[str, list[str]]:
    """check name -> the example_ids that failed it, for the blocking checks with failing rows."""
    blocking = findings[findings["blocking"].astype(bool)]
    return {str(check): group["example_id"].astype(str).tolist() for check, group in blocking.groupby("check", sort=False)}
