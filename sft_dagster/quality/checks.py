"""Run a suite on a frame: one great-expectations validation for all GX checks, then our SFT checks.

Each check yields a `CheckOutcome` with the failing rows' example_ids (GX's COMPLETE result format
with `unexpected_index_column_names=["example_id"]`), so curation can quarantine exactly those rows
and the UI can show them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .. import atomic
from ..spec import TaskSpec
from ..splits import normalized_text  # the leakage check and the splits group prompts by the same key
from .pii import DEFAULT_REGIONS, mask_pii, pii_kinds
from .suite import CheckEntry, Suite, build_expectation

FAILING_ROWS_SHOWN = 20
DEFAULT_CONTROL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "</s>", "<s>", "[INST]", "[/INST]", "<|eot_id|>"]


@dataclass
class CheckOutcome:
    name: str
    passed: bool
    blocking: bool
    description: str
    metadata: dict = field(default_factory=dict)
    failing_ids: list[str] = field(default_factory=list)
    failing_rows: pd.DataFrame = field(default_factory=pd.DataFrame)


def _split_frame(df: pd.DataFrame, splits: pd.DataFrame | None) -> pd.Series | None:
    """Each row's split, from the `splits` frame (example_id, split) or the frame's own `split` column."""
    if splits is not None:
        lookup = splits.drop_duplicates("example_id").set_index("example_id")["split"]
        return df["example_id"].map(lookup)
    if "split" in df.columns:
        return df["split"]
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


def _scanned_columns(entry: CheckEntry, df: pd.DataFrame) -> list[str]:
    """Columns a content scan reads: by default also a multi-turn chat's earlier turns (`history`)."""
    extra = ["history"] if "columns" not in entry.kwargs and "history" in df.columns else []
    return _text_columns(entry) + extra


def run_sft_check(entry: CheckEntry, df: pd.DataFrame, task: TaskSpec, token_lengths: pd.DataFrame | None,
                  max_length: int | None, splits: pd.DataFrame | None = None,
                  special_tokens: list[str] | None = None) -> CheckOutcome:
    kind, kw = entry.sft_check, entry.kwargs
    if kind == "token_length":
        if token_lengths is None or max_length is None:
            return CheckOutcome(entry.name, False, entry.blocking, entry.describe(),
                                {"error": "token lengths were not computed (no tokenizer)"})
        lookup = token_lengths.drop_duplicates("example_id").set_index("example_id")["n_tokens"]
        lengths = df["example_id"].map(lookup).reset_index(drop=True)
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
        if kw.get("tokenizer_special_tokens", True):
            tokens += [t for t in (special_tokens or []) if t and t not in tokens]
        pattern = "|".join(re.escape(t) for t in tokens)
        failing = pd.Series(False, index=df.index)
        for col in _scanned_columns(entry, df):
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
    if kind == "near_duplicates":
        columns = _text_columns(entry)
        key = normalized_text(df[columns[0]], kw.get("ignore_digits", False))
        for col in columns[1:]:
            key = key + "\x1f" + normalized_text(df[col], kw.get("ignore_digits", False))
        # a repeat of an earlier row's normalised text that is not an exact repeat of it
        failing = key.duplicated(keep="first") & ~df["content_hash"].duplicated(keep="first")
        failing &= key.str.len() > 0
        outcome = _row_outcome(entry, df, failing, columns[0])
        max_rate = float(kw.get("max_rate", 0.0))
        outcome.passed = outcome.metadata["failing_rate"] <= max_rate
        outcome.metadata["max_rate"] = max_rate
        return outcome
    if kind == "split_leakage":
        split = _split_frame(df, splits)
        if split is None:
            return CheckOutcome(entry.name, True, entry.blocking, entry.describe() + " (not evaluated: no splits yet)",
                                {"evaluated": False, "reason": "no splits given; evaluated on split examples"})
        column = kw.get("column", "prompt")
        key = normalized_text(df[column], kw.get("ignore_digits", False))
        split = split.astype("string").reset_index(drop=True)
        key = key.reset_index(drop=True)
        # an evaluation row whose text is also in an earlier split of TRAIN -> VALIDATION -> TEST
        failing = pd.Series(False, index=key.index)
        seen: set[str] = set()
        by_split = {}
        for name in ("train", "validation", "test"):
            here = split == name
            if name != "train":
                hits = here & key.isin(seen) & key.str.len().gt(0)
                by_split[name] = int(hits.sum())
                failing |= hits
            seen |= set(key[here])
        unknown = int(split.isna().sum())
        outcome = _row_outcome(entry, df.reset_index(drop=True), failing, column,
                               {"evaluated": True, "leaked_rows_by_split": by_split, "rows_without_split": unknown})
        outcome.passed = outcome.passed and unknown == 0
        return outcome
    if kind == "pii":
        # The values found never leave this function: failing rows show the kinds and the text masked.
        regions = tuple(kw.get("regions", DEFAULT_REGIONS))
        columns = [df[c].fillna("").astype(str) for c in _scanned_columns(entry, df)]
        text = columns[0].str.cat(columns[1:], sep=" ") if len(columns) > 1 else columns[0]
        kinds = pd.Series(pii_kinds(text.tolist(), regions), index=text.index, dtype=object)
        failing = kinds.ne("")
        shown = df.assign(pii_found=kinds, masked_text=text[failing].map(lambda t: mask_pii(t, regions)))
        by_kind = kinds[failing].str.split(",").explode().value_counts()
        outcome = _row_outcome(entry, shown, failing, "pii_found",
                               {"by_kind": {str(k): int(v) for k, v in by_kind.items()}, "regions": list(regions)})
        outcome.failing_rows = shown.loc[failing, [c for c in ("example_id", "pii_found", "masked_text", "source_file",
                                                              "source_line") if c in shown]].head(FAILING_ROWS_SHOWN)
        return outcome
    if kind == "class_balance":
        labels = df["response"][df["response"].isin(task.labels)] if task.labels else df["response"]
        shares = labels.value_counts(normalize=True)
        if task.labels:  # a label of the task with no rows at all has share 0
            shares = shares.reindex(task.labels, fill_value=0.0)
        rarest = float(shares.min()) if len(shares) else 0.0
        # min_share: an absolute share; min_share_of_uniform: a fraction of 1/K (scales with K labels)
        thresholds = [float(kw.get("min_share", 0.0 if "min_share_of_uniform" in kw else 0.05))]
        if "min_share_of_uniform" in kw and len(shares):
            thresholds.append(float(kw["min_share_of_uniform"]) / len(shares))
        needed = max(thresholds)
        return CheckOutcome(entry.name, rarest >= needed, entry.blocking, entry.describe(),
                            {"required_share": round(needed, 6), "rarest_share": round(rarest, 6),
                             "rarest_label": str(shares.idxmin()) if len(shares) else None,
                             "shares": {str(k): round(float(v), 6) for k, v in shares.items()}})
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
