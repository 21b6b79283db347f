"""The contract of `sft_dagster/defs/dagster_compat.py` with the installed Dagster: every name it
exposes from `dagster._core`, used as the project uses it. A Dagster upgrade that moves or changes
one of them fails here."""

from __future__ import annotations

import sys
from pathlib import Path

import dagster as dg

from sft_dagster.defs import dagster_compat


@dg.asset
def compat_value() -> int:
    return 1


@dg.asset_check(asset=compat_value, blocking=True)
def compat_passes() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=True)


@dg.asset_check(asset=compat_value)
def compat_fails() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=False)


@dg.op
def compat_op() -> int:
    return 2


@dg.job(executor_def=dg.in_process_executor)  # what cli_runs' run config picks
def compat_job():
    compat_op()


def test_the_compat_module_exposes_exactly_what_the_contract_covers():
    assert sorted(dagster_compat.__all__) == ["AssetCheckExecutionRecordStatus", "execute_run", "remote_job_origin"]


def test_check_record_statuses_are_the_compat_enum():
    """guards.py and automation.py compare `record.status` of the latest check executions with it."""
    Status = dagster_compat.AssetCheckExecutionRecordStatus
    instance = dg.DagsterInstance.ephemeral()
    dg.materialize([compat_value, compat_passes, compat_fails], instance=instance, raise_on_error=False)
    keys = [compat_passes.check_key, compat_fails.check_key]
    records = instance.event_log_storage.get_latest_asset_check_execution_by_key(keys)
    assert records[compat_passes.check_key].status == Status.SUCCEEDED
    assert records[compat_fails.check_key].status == Status.FAILED
    assert records[compat_fails.check_key].status != Status.SUCCEEDED
    assert {s.name for s in Status} >= {"SUCCEEDED", "FAILED", "PLANNED"}


def test_a_run_with_a_remote_origin_executes_in_process():
    """cli_runs.py: create a run with the workspace's remote origin, then `execute_run` it here."""
    origin = dagster_compat.remote_job_origin(
        "compat_job", executable_path=sys.executable, module_name="sft_dagster.definitions",
        working_directory=".", location_name="a_location", repository_name="__repository__")
    assert origin.job_name == "compat_job"
    assert origin.repository_origin.repository_name == "__repository__"
    assert origin.repository_origin.code_location_origin.location_name == "a_location"
    assert origin.repository_origin.code_location_origin.loadable_target_origin.module_name == "sft_dagster.definitions"

    instance = dg.DagsterInstance.ephemeral()
    recon = dg.reconstructable(compat_job)
    run = instance.create_run_for_job(job_def=compat_job, job_code_origin=recon.get_python_origin(),
                                      remote_job_origin=origin)
    assert instance.get_run_by_id(run.run_id).remote_job_origin.job_name == "compat_job"
    result = dagster_compat.execute_run(recon, run, instance, raise_on_error=False)
    assert result.success
    assert [e.step_key for e in result.get_step_success_events()] == ["compat_op"]
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.SUCCESS


def test_no_other_module_reaches_into_dagster_core():
    package = Path(dagster_compat.__file__).resolve().parents[1]
    users = sorted(str(p.relative_to(package)) for p in package.rglob("*.py") if "dagster._core" in p.read_text())
    assert users == ["defs/dagster_compat.py"]
