"""What the training, report and promotion assets of every path (SFT, preference, student) share.

- `reuse_or_run`: a training run lives in a folder named by its lineage hash; a finished one is kept,
  never retrained.
- `cached_report`: a report lives in a folder named by the hash of everything it is computed from;
  unchanged inputs read it back instead of scoring again.
- `promotion`: a model is copied into the registry only when the report it was judged by is for this
  very model and its decision says promote.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import dagster as dg

from .. import registry
from ..schema import lineage_hash_of
from .guards import BlockedByQualityGate
from .resources import SFTStorage
from .shared import registry_dir


class StaleEvaluation(BlockedByQualityGate):
    """The report a promotion would rest on is for another model than the current one."""


def reuse_or_run(context, run_dir: Path, finished: Callable[[Path], dict | None], run: Callable[[], dict],
                 kept: str = "model") -> tuple[dict, bool]:
    """The record of the finished run in `run_dir` (`finished(run_dir)`, None while it is not), else
    `run()`, which trains and completes it: (record, skipped)."""
    done = finished(run_dir)
    if done is not None:
        context.log.info(f"inputs unchanged since training run {run_dir.name}: keeping its {kept}")
        return done, True
    return run(), False


def cached_report(context, directory: Path, filename: str, inputs: dict, compute: Callable[[str], dict], *,
                  read: Callable[[Path], dict], write: Callable[[Path, dict], None],
                  unchanged: str) -> tuple[dict, str, bool]:
    """The report for `inputs` (everything it is computed from): read back from
    `directory/<inputs hash>/filename` when it exists, else `compute(inputs_hash)` written there by
    `write(folder, report)`. Returns (report, inputs_hash, skipped); `unchanged` is logged on a skip."""
    inputs_hash = lineage_hash_of(inputs)
    cached = directory / inputs_hash / filename
    if cached.exists():
        context.log.info(f"{unchanged}: keeping it")
        return read(cached), inputs_hash, True
    report = compute(inputs_hash)
    write(directory / inputs_hash, report)
    return report, inputs_hash, False


def promotion(spec, storage: SFTStorage, *, model_dir: Path, report: dict, decision: dict, lineage: dict,
              lineage_hash: str, stale: str | None = None) -> dg.Output[dict]:
    """Copy `model_dir` with its model card into the pipeline's registry (the new champion), judged by
    `report` and its `decision`; refused when `stale` says why the report is not for this model, or
    when the decision is not to promote."""
    if stale:
        raise StaleEvaluation(f"refusing to promote: {stale}")
    if not decision["promote"]:  # the check said so too; never promote against the report's own decision
        raise StaleEvaluation(f"refusing to promote: {decision['reason']}")
    version_dir = registry.promote(model_dir, registry_dir(spec, storage), report, lineage, decision)
    record = {"version": version_dir.name, "path": str(version_dir), "lineage_hash": lineage_hash}
    return dg.Output(record, data_version=dg.DataVersion(f"{version_dir.name}-{lineage_hash}"),
                     metadata={"version": version_dir.name, "path": dg.MetadataValue.path(str(version_dir)),
                               "decision": decision["reason"],
                               "model_card": dg.MetadataValue.md((version_dir / "MODEL_CARD.md").read_text())})
