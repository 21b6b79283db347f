"""sft_dagster's own data checks, each registered with its name, description and arguments.

A check is a function `(entry, args, df, ctx) -> CheckOutcome`: `entry` the suite's `CheckEntry`
(name, blocking, description), `args` its `kwargs` parsed by the registered model, `df` the frame,
`ctx` what the suite run knows besides the rows (task, token lengths, splits, special tokens).
Adding one: a function here under `@SFT_CHECKS.register(...)`, and its line in a suite YAML.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any

import pandas as pd
from pydantic import BaseModel, BeforeValidator, ConfigDict

from ..spec import TaskSpec
from ..splits import normalized_text  # the leakage check and the splits group prompts by the same key
from .check_registry import FAILING_ROWS_SHOWN, CheckOutcome, CheckRegistry, SuiteEntry
from .pii import DEFAULT_REGIONS, mask_pii, pii_kinds


DEFAULT_CONTROL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "</s>", "<s>", "[INST]", "[/INST]", "<|eot_id|>"]
DEFAULT_TEXT_COLUMNS = ["prompt", "response"]

SFT_CHECKS = CheckRegistry("sft_check")


@dataclass(frozen=True)
class CheckContext:
    """What a suite run knows besides the rows (see `checks.run_suite`)."""

    task: TaskSpec
    token_lengths: pd.DataFrame | None = None
    max_length: int | None = None
    splits: pd.DataFrame | None = None
    special_tokens: list[str] | None = None


# --- argument types: the same messages for every check that takes them ---------------------------

def _share(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"must be a number in [0, 1], got {value!r}")
    return value


def _names(value: Any) -> Any:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError("must be a non-empty list of strings")
    return value


def _flag(value: Any) -> Any:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _column(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError("must be a column name")
    return value


Share = Annotated[float, BeforeValidator(_share)]
Names = Annotated[list[str], BeforeValidator(_names)]
Flag = Annotated[bool, BeforeValidator(_flag)]
Column = Annotated[str, BeforeValidator(_column)]


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RowArgs(_Args):
    mostly: Share = 1.0  # the share of rows that must pass


class TextArgs(RowArgs):
    columns: Names | None = None  # None: prompt and response (content scans also a chat's history)


class ControlTokenArgs(TextArgs):
    tokens: Names | None = None  # None: DEFAULT_CONTROL_TOKENS
    tokenizer_special_tokens: Flag = True


class PiiArgs(TextArgs):
    regions: Names | None = None  # None: pii.DEFAULT_REGIONS


class RateArgs(_Args):
    max_rate: Share = 0.0


class NearDuplicateArgs(RateArgs):
    columns: Names | None = None
    ignore_digits: Flag = False


class LeakageArgs(RowArgs):
    column: Column = "prompt"
    ignore_digits: Flag = False


class BalanceArgs(_Args):
    min_share: Share | None = None  # an absolute share (0.05 when neither is given)
    min_share_of_uniform: Share | None = None  # a fraction of 1/K for K labels


# --- shared pieces ---------------------------------------------------------------------------------

def _row_outcome(entry: SuiteEntry, df: pd.DataFrame, failing: pd.Series, shown_column: str | None,
                 extra: dict | None = None, mostly: float = 1.0) -> CheckOutcome:
    """Outcome of a row-level check: passes when at most 1 - `mostly` of the rows fail."""
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


def _rate_outcome(entry: SuiteEntry, df: pd.DataFrame, failing: pd.Series, shown_column: str, max_rate: float) -> CheckOutcome:
    """A row-level check that passes while at most `max_rate` of the rows fail."""
    outcome = _row_outcome(entry, df, failing, shown_column)
    outcome.passed = outcome.metadata["failing_rate"] <= max_rate
    outcome.metadata["max_rate"] = max_rate
    return outcome


def _text_columns(args: TextArgs | NearDuplicateArgs) -> list[str]:
    return list(args.columns or DEFAULT_TEXT_COLUMNS)


def _scanned_columns(args: TextArgs, df: pd.DataFrame) -> list[str]:
    """Columns a content scan reads: by default also a multi-turn chat's earlier turns (`history`)."""
    extra = ["history"] if args.columns is None and "history" in df.columns else []
    return _text_columns(args) + extra


def _split_of(df: pd.DataFrame, splits: pd.DataFrame | None) -> pd.Series | None:
    """Each row's split, from the `splits` frame (example_id, split) or the frame's own `split` column."""
    if splits is not None:
        lookup = splits.drop_duplicates("example_id").set_index("example_id")["split"]
        return df["example_id"].map(lookup)
    if "split" in df.columns:
        return df["split"]
    return None


# --- the checks ------------------------------------------------------------------------------------

@SFT_CHECKS.register("token_length", "prompt + response fit the training max_length in the base model's tokenizer "
                                     "(nothing is truncated silently)", RowArgs)
def token_length(entry: SuiteEntry, args: RowArgs, df: pd.DataFrame, ctx: CheckContext) -> CheckOutcome:
    if ctx.token_lengths is None or ctx.max_length is None:
        return CheckOutcome(entry.name, False, entry.blocking, entry.describe(),
                            {"error": "token lengths were not computed (no tokenizer)"})
    lookup = ctx.token_lengths.drop_duplicates("example_id").set_index("example_id")["n_tokens"]
    lengths = df["example_id"].map(lookup).reset_index(drop=True)
    failing = (lengths.isna() | (lengths > ctx.max_length)).to_numpy()
    shown = df.assign(n_tokens=lengths.to_numpy())
    return _row_outcome(entry, shown, pd.Series(failing, index=df.index), "n_tokens",
                        {"max_length": ctx.max_length, "longest": int(lengths.max()) if len(lengths) else 0,
                         "p95": float(lengths.quantile(0.95)) if len(lengths) else 0.0}, args.mostly)


@SFT_CHECKS.register("empty_text", "no empty or whitespace-only text in `columns`", TextArgs)
def empty_text(entry: SuiteEntry, args: TextArgs, df: pd.DataFrame, ctx: CheckContext) -> CheckOutcome:
    failing = pd.Series(False, index=df.index)
    for col in _text_columns(args):
        failing |= df[col].fillna("").astype(str).str.strip().eq("")
    return _row_outcome(entry, df, failing, _text_columns(args)[0], mostly=args.mostly)


@SFT_CHECKS.register("control_tokens", "no chat control tokens (e.g. <|im_start|>) inside the data", ControlTokenArgs)
def control_tokens(entry: SuiteEntry, args: ControlTokenArgs, df: pd.DataFrame, ctx: CheckContext) -> CheckOutcome:
    tokens = list(args.tokens or DEFAULT_CONTROL_TOKENS)
    if args.tokenizer_special_tokens:
        tokens += [t for t in (ctx.special_tokens or []) if t and t not in tokens]
    pattern = "|".join(re.escape(t) for t in tokens)
    failing = pd.Series(False, index=df.index)
    for col in _scanned_columns(args, df):
        failing |= df[col].fillna("").astype(str).str.contains(pattern, regex=True)
    return _row_outcome(entry, df, failing, "prompt", {"tokens": tokens}, args.mostly)


@SFT_CHECKS.register("label_in_set", "every label is one of the task's labels", RowArgs)
def label_in_set(entry: SuiteEntry, args: RowArgs, df: pd.DataFrame, ctx: CheckContext) -> CheckOutcome:
    if not ctx.task.labels:
        return CheckOutcome(entry.name, True, entry.blocking, entry.describe(), {"skipped": "not a label task"})
    failing = ~df["response"].isin(ctx.task.labels)
    return _row_outcome(entry, df, failing, "response", {"labels": ctx.task.labels}, args.mostly)


@SFT_CHECKS.register("class_balance", "the rarest label has at least `min_share` of the rows, or "
                                      "`min_share_of_uniform` x 1/K for K labels", BalanceArgs)
def class_balance(entry: SuiteEntry, args: BalanceArgs, df: pd.DataFrame, ctx: CheckContext) -> CheckOutcome:
    labels = ctx.task.labels
    shares = (df["response"][df["response"].isin(labels)] if labels else df["response"]).value_counts(normalize=True)
    if labels:  # a label of the task with no rows at all has share 0
        shares = shares.reindex(labels, fill_value=0.0)
    rarest = float(shares.min()) if len(shares) else 0.0
    thresholds = [args.min_share if args.min_share is not None else (0.0 if args.min_share_of_uniform is not None else 0.05)]
    if args.min_share_of_uniform is not None and len(shares):
        thresholds.append(args.min_share_of_uniform / len(shares))
    needed = float(max(thresholds))
    return CheckOutcome(entry.name, rarest >= needed, entry.blocking, entry.describe(),
                        {"required_share": round(needed, 6), "rarest_share": round(rarest, 6),
                         "rarest_label": str(shares.idxmin()) if len(shares) else None,
                         "shares": {str(k): round(float(v), 6) for k, v in shares.items()}})


@SFT_CHECKS.register("exact_duplicates", "at most `max_rate` of rows repeat an earlier row exactly", RateArgs)
def exact_duplicates(entry: SuiteEntry, args: RateArgs, df: pd.DataFrame, ctx: CheckContext) -> CheckOutcome:
    return _rate_outcome(entry, df, df.duplicated("content_hash", keep="first"), "prompt", args.max_rate)


@SFT_CHECKS.register("near_duplicates", "at most `max_rate` of rows repeat an earlier row up to case, punctuation "
                                        "and spacing", NearDuplicateArgs)
def near_duplicates(entry: SuiteEntry, args: NearDuplicateArgs, df: pd.DataFrame, ctx: CheckContext) -> CheckOutcome:
    columns = _text_columns(args)
    key = normalized_text(df[columns[0]], args.ignore_digits)
    for col in columns[1:]:
        key = key + "\x1f" + normalized_text(df[col], args.ignore_digits)
    # a repeat of an earlier row's normalised text that is not an exact repeat of it
    failing = key.duplicated(keep="first") & ~df["content_hash"].duplicated(keep="first") & (key.str.len() > 0)
    return _rate_outcome(entry, df, failing, columns[0], args.max_rate)


@SFT_CHECKS.register("split_leakage", "no validation/test prompt also appears (normalised) in an earlier split", LeakageArgs)
def split_leakage(entry: SuiteEntry, args: LeakageArgs, df: pd.DataFrame, ctx: CheckContext) -> CheckOutcome:
    split = _split_of(df, ctx.splits)
    if split is None:
        return CheckOutcome(entry.name, True, entry.blocking, entry.describe() + " (not evaluated: no splits yet)",
                            {"evaluated": False, "reason": "no splits given; evaluated on split examples"})
    key = normalized_text(df[args.column], args.ignore_digits).reset_index(drop=True)
    split = split.astype("string").reset_index(drop=True)
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
    outcome = _row_outcome(entry, df.reset_index(drop=True), failing, args.column,
                           {"evaluated": True, "leaked_rows_by_split": by_split, "rows_without_split": unknown},
                           args.mostly)
    outcome.passed = outcome.passed and unknown == 0
    return outcome


@SFT_CHECKS.register("pii", "no e-mail addresses, phone numbers (libphonenumber, national formats of `regions`) "
                            "or Luhn-valid card numbers", PiiArgs)
def pii(entry: SuiteEntry, args: PiiArgs, df: pd.DataFrame, ctx: CheckContext) -> CheckOutcome:
    # The values found never leave this function: failing rows show the kinds and the text masked.
    regions = tuple(args.regions or DEFAULT_REGIONS)
    columns = [df[c].fillna("").astype(str) for c in _scanned_columns(args, df)]
    text = columns[0].str.cat(columns[1:], sep=" ") if len(columns) > 1 else columns[0]
    kinds = pd.Series(pii_kinds(text.tolist(), regions), index=text.index, dtype=object)
    failing = kinds.ne("")
    shown = df.assign(pii_found=kinds, masked_text=text[failing].map(lambda t: mask_pii(t, regions)))
    by_kind = kinds[failing].str.split(",").explode().value_counts()
    outcome = _row_outcome(entry, shown, failing, "pii_found",
                           {"by_kind": {str(k): int(v) for k, v in by_kind.items()}, "regions": list(regions)}, args.mostly)
    outcome.failing_rows = shown.loc[failing, [c for c in ("example_id", "pii_found", "masked_text", "source_file",
                                                          "source_line") if c in shown]].head(FAILING_ROWS_SHOWN)
    return outcome


def run_sft_check(entry: SuiteEntry, df: pd.DataFrame, task: TaskSpec, token_lengths: pd.DataFrame | None,
                  max_length: int | None, splits: pd.DataFrame | None = None,
                  special_tokens: list[str] | None = None) -> CheckOutcome:
    """The suite entry's registered SFT check on `df`."""
    check = SFT_CHECKS[entry.sft_check]
    ctx = CheckContext(task, token_lengths, max_length, splits, special_tokens)
    return check.run(entry, check.parse(entry.kwargs), df, ctx)
