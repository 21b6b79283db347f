"""What every stage module of the Dagster layer shares: the pipeline's key space, metadata helpers.

Each `defs/<stage>.py` has one `build(p: PipelineDefs)` that adds that stage's assets and checks to
`p`. Data travels between assets as inputs (DataFrames as Parquet through `ParquetIOManager`, model
artefacts as small JSON records through `JsonIOManager`), never by re-reading another stage's files.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import dagster as dg
import pandas as pd

from ..quality import Suite
from ..quality.check_registry import CheckDef
from ..quality.pii import mask_pii
from ..spec import PipelineSpec
from ..storage import PipelinePaths

PREVIEW_ROWS = 10
JSON_IO = "json_io_manager"  # io_manager_key of assets whose value is a JSON record (model artefacts)


def source_files(module: ModuleType) -> list[Path]:
    """Every source file of a module, or of a package and its subpackages."""
    path = Path(module.__file__)
    if path.name == "__init__.py":
        return sorted(path.parent.rglob("*.py"))
    return [path]


def code_version(*modules: ModuleType) -> str:
    """Hash of every source file a stage runs: editing any of them makes its assets stale in the UI
    and changes the training lineage (a package's `__init__.py` alone is not enough)."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for module in modules:
        for path in source_files(module):
            h.update(str(path.resolve().relative_to(root) if path.resolve().is_relative_to(root) else path.name).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


PREVIEWS_OFF = "_row previews are off (quality.previews: false in the spec)_"


def preview(df: pd.DataFrame, columns: list[str] | None = None, n: int = PREVIEW_ROWS, enabled: bool = True) -> dg.MetadataValue:
    """The first rows as a Markdown table for the UI, every PII span masked before the cell is cut to 80
    characters: Dagster keeps event metadata after the rows themselves were dropped."""
    if not enabled:
        return dg.MetadataValue.md(PREVIEWS_OFF)
    cols = [c for c in (columns or list(df.columns)) if c in df.columns]
    if df.empty:
        return dg.MetadataValue.md("_no rows_")
    shown = df[cols].head(n).apply(lambda s: s.map(lambda v: mask_pii(str(v))[:80]))
    return dg.MetadataValue.md(shown.to_markdown(index=False))


SIGNIFICANT_DIGITS = 4  # of a float shown in the UI (which prints a float's full repr: 0.39574468085106385)


def rounded(value):
    """Floats to `SIGNIFICANT_DIGITS` significant places (never fewer than their integer digits), in
    nested dicts and lists too; the rest as it is."""
    if isinstance(value, float) and math.isfinite(value) and value != 0:
        return round(value, max(0, SIGNIFICANT_DIGITS - 1 - math.floor(math.log10(abs(value)))))
    if type(value) is dict:
        return {k: rounded(v) for k, v in value.items()}
    if type(value) in (list, tuple):  # not a MetadataValue (a named tuple), which stays as it is
        return [rounded(v) for v in value]
    return value


def numbers(metrics: dict) -> dict:
    """The numeric entries of `metrics` as metadata entries of their own. Not rounded: they stand beside
    the metrics' JSON, which keeps the trainer's exact numbers (MLflow logs the same)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def jsonable(metadata: dict) -> dict:
    """Nested dicts/lists become JSON metadata; scalars stay scalars, floats rounded for the UI."""
    out = {}
    for key, value in metadata.items():
        if isinstance(value, (dict, list)):
            out[key] = dg.MetadataValue.json(value)
        elif value is None:
            out[key] = dg.MetadataValue.null()
        else:
            out[key] = rounded(value)
    return out


def severity(blocking: bool) -> dg.AssetCheckSeverity:
    """A check's severity follows its blocking flag, always: ERROR blocks, WARN warns."""
    return dg.AssetCheckSeverity.ERROR if blocking else dg.AssetCheckSeverity.WARN


def check_specs(asset_key: dg.AssetKey, defs: list[CheckDef], **kwargs) -> list[dg.AssetCheckSpec]:
    """Declared checks (a suite's, the cleanlab or pair gates) as Dagster check specs on one asset."""
    return [dg.AssetCheckSpec(d.name, asset=asset_key, blocking=d.blocking, description=d.description, **kwargs)
            for d in defs]


def outcome_to_check_result(outcome, asset_key: dg.AssetKey, previews: bool = True,
                            failing_ids_file=None, blocking: bool | None = None) -> dg.AssetCheckResult:
    """The outcome as Dagster's check result; `blocking`: the check spec's flag, which sets the severity."""
    metadata = jsonable({k: mask_pii(v) if isinstance(v, str) else v for k, v in outcome.metadata.items()})
    metadata["failing_rows_count"] = len(outcome.failing_ids)
    if failing_ids_file is not None and outcome.failing_ids:
        metadata["failing_ids_file"] = dg.MetadataValue.path(str(failing_ids_file))
    if getattr(outcome, "failing_rows", None) is not None and len(outcome.failing_rows):
        metadata["failing_rows"] = preview(outcome.failing_rows, n=20, enabled=previews)
    return dg.AssetCheckResult(
        asset_key=asset_key,
        check_name=outcome.name,
        passed=bool(outcome.passed),
        severity=severity(outcome.blocking if blocking is None else blocking),
        description=outcome.description,
        metadata=metadata,
    )


@dataclass
class PipelineDefs:
    """One spec's asset group as it is being built: its keys, assets, checks and blocking gates."""

    spec: PipelineSpec
    suite: Suite  # the spec's data-quality suite (data_checks/<quality.suite>.yaml), loaded once
    assets: list = field(default_factory=list)
    checks: list = field(default_factory=list)
    # Every blocking check whose failure must stop training, evaluation and promotion, in any run.
    blocking_checks: list[dg.AssetCheckKey] = field(default_factory=list)
    # The blocking pair gates (and pair accounting) that must pass before preference training; kept apart
    # from `blocking_checks` so that a failed pair gate never stops SFT.
    preference_blocking_checks: list[dg.AssetCheckKey] = field(default_factory=list)
    # Multi-task specs: each further task's data sub-pipeline by task name (defs/multitask.py).
    task_pipelines: dict[str, "PipelineDefs"] = field(default_factory=dict)
    # The Dagster group (hence job) and pool: the spec's name, or for a task's data sub-pipeline the
    # multi-task pipeline's, so one job runs every task.
    group: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def key(self, name: str) -> dg.AssetKey:
        return dg.AssetKey([self.spec.name, name])

    def check_key(self, asset: str, check: str) -> dg.AssetCheckKey:
        return dg.AssetCheckKey(self.key(asset), check)

    @property
    def pool(self) -> str:
        """The concurrency pool of every asset that writes this pipeline's artefacts. With the instance's
        pool limit at 1 (the shipped dagster.yaml), two runs never execute them at the same time."""
        return f"sft_{self.group or self.spec.name}"

    def asset_args(self, name: str, **kwargs) -> dict:
        """Keyword arguments every asset of the pipeline shares."""
        group = self.group or self.spec.name
        return {"key": self.key(name), "group_name": group, "tags": {"pipeline": group},
                "pool": self.pool, **kwargs}

    def out(self, name: str, **kwargs) -> dg.AssetOut:
        """An output of a multi-asset, keyed and grouped like `asset_args`."""
        group = self.group or self.spec.name
        return dg.AssetOut(key=self.key(name), group_name=group, tags={"pipeline": group}, **kwargs)

    def preview(self, df: pd.DataFrame, columns: list[str] | None = None, n: int = PREVIEW_ROWS) -> dg.MetadataValue:
        """A row preview, PII masked, or a note when the spec turned previews off."""
        return preview(df, columns, n, enabled=self.spec.quality.previews)

    def ins(self, *names: str) -> dict[str, dg.AssetIn]:
        return {n: dg.AssetIn(self.key(n)) for n in names}

    def paths(self, storage) -> PipelinePaths:
        return storage.paths(self.spec.name)
