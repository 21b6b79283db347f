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


FAILED_CHECKS = "failed_blocking_checks"  # the column of the blocking suite checks a row failed
SEPARATOR = "|"


def with_failed_checks(df: pd.DataFrame, outcomes: list[CheckOutcome]) -> pd.DataFrame:
    """`df` with `failed_blocking_checks`: the blocking checks each row failed, in the suite's order
    (`|`-joined, "" for none): the suite's row findings, which curation quarantines."""
    failed: dict[str, list[str]] = {}
    for outcome in outcomes:
        if outcome.blocking:
            for example_id in dict.fromkeys(outcome.failing_ids):
                failed.setdefault(str(example_id), []).append(outcome.name)
    names = df["example_id"].astype(str).map(lambda i: SEPARATOR.join(failed.get(i, [])))
    return df.assign(**{FAILED_CHECKS: names.astype(str).to_numpy()})


def blocking_failures(df: pd.DataFrame, order: list[str]) -> dict[str, list[str]]:
    """check name -> the example_ids that failed it (from `with_failed_checks`), checks in `order`."""
    rows = df[FAILED_CHECKS].fillna("").astype(str).str.split(SEPARATOR).explode()
    rows = rows[rows != ""]
    ids = df.loc[rows.index, "example_id"].astype(str).to_numpy()
    by_check = pd.Series(ids, index=rows.to_numpy()).groupby(level=0).agg(list).to_dict() if len(rows) else {}
    return {name: by_check[name] for name in order if name in by_check}
