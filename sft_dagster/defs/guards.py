"""Cross-run enforcement of blocking checks.

Dagster's `blocking=True` stops downstream steps inside one run only: a later run that selects just
the adapter would train anyway. Expensive assets therefore call `require_checks_passed` first: every
blocking check upstream must have passed, and on the asset's latest materialization, not an older one.
"""

from __future__ import annotations

from collections.abc import Iterable

import dagster as dg

from .dagster_compat import AssetCheckExecutionRecordStatus


class BlockedByQualityGate(Exception):
    """A blocking check upstream failed, never ran, or ran on older data."""


def check_problems(instance: dg.DagsterInstance, check_keys: Iterable[dg.AssetCheckKey]) -> list[str]:
    keys = list(check_keys)
    records = instance.event_log_storage.get_latest_asset_check_execution_by_key(keys)
    problems = []
    for key in keys:
        name = f"{key.asset_key.to_user_string()}:{key.name}"
        record = records.get(key)
        if record is None:
            problems.append(f"{name} has never been evaluated")
            continue
        if record.status != AssetCheckExecutionRecordStatus.SUCCEEDED:
            problems.append(f"{name} is {record.status.value} (run {record.run_id[:8]})")
            continue
        evaluation = record.event.dagster_event.event_specific_data if record.event and record.event.dagster_event else None
        target = getattr(evaluation, "target_materialization_data", None)
        latest = instance.fetch_materializations(key.asset_key, limit=1).records
        if target is not None and latest and target.storage_id != latest[0].storage_id:
            problems.append(f"{name} passed on an older materialization; re-run the check on the current data")
    return problems


def require_checks_passed(context: dg.AssetExecutionContext, check_keys: Iterable[dg.AssetCheckKey]) -> None:
    problems = check_problems(context.instance, check_keys)
    if problems:
        raise BlockedByQualityGate(
            "refusing to run: blocking data-quality checks upstream did not pass:\n  - " + "\n  - ".join(problems)
        )
