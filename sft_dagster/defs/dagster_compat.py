"""Everything this project takes from Dagster's private `dagster._core`, in one place.

Dagster 1.13 has no public name for these; each is pinned by `tests/test_dagster_compat.py`, which
uses every name below against the installed Dagster (`dagster>=1.13,<1.14` in pyproject.toml), so
an upgrade that moves or changes one fails there first, not in a sensor or a CLI run.

- `AssetCheckExecutionRecordStatus`: the status of a check's latest execution record
  (`DagsterInstance.event_log_storage.get_latest_asset_check_execution_by_key`), read by the
  cross-run gate (`guards.py`) and the failed-gate sensor (`automation.py`).
- `remote_job_origin` and `execute_run`: a run created outside the webserver with the remote origin
  the workspace gives the job, executed in this process (`cli_runs.py`).
"""

from __future__ import annotations

from dagster._core.execution.api import execute_run
from dagster._core.remote_origin import (
    ManagedGrpcPythonEnvCodeLocationOrigin,
    RemoteJobOrigin,
    RemoteRepositoryOrigin,
)
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin


def remote_job_origin(job_name: str, *, executable_path: str, module_name: str, working_directory: str,
                      location_name: str, repository_name: str) -> RemoteJobOrigin:
    """The origin of `job_name` in a code location loaded from `module_name` by a managed gRPC server
    (what the webserver records for the runs it launches from that workspace entry)."""
    target = LoadableTargetOrigin(executable_path=executable_path, module_name=module_name,
                                  working_directory=working_directory)
    location = ManagedGrpcPythonEnvCodeLocationOrigin(target, location_name)
    return RemoteJobOrigin(RemoteRepositoryOrigin(location, repository_name), job_name)


__all__ = ["AssetCheckExecutionRecordStatus", "execute_run", "remote_job_origin"]
