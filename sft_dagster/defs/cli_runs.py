"""Runs the `sft-dagster run` command starts: recorded like runs the UI launches.

A UI run belongs to the code location's job: Dagster stores its remote origin (location `sft_dagster`,
repository `__repository__`, the job), and the job's page and the Overview timeline list runs by that
origin (the `.dagster/repository` tag). `execute_in_process` and `execute_job` record no remote origin,
so their runs appeared under Runs only. `create_cli_run` creates the run with the same remote origin the
workspace (`workspace.yaml`) gives the job and a reconstructable code origin, then executes it in this
process: the job's page lists it, and the UI can re-execute it from the code location.

Dagster has no public API that creates a run with a remote origin outside the webserver or daemon, so
this module takes the origin classes and `execute_run` from Dagster's private API through
`dagster_compat.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import dagster as dg

from ..instance import PIPELINE_TAG
from ..spec import load_spec
from .dagster_compat import execute_run, remote_job_origin

CODE_LOCATION = "sft_dagster"  # workspace.yaml's location_name (and pyproject's tool.dagster)
DEFINITIONS_MODULE = "sft_dagster.definitions"
REPOSITORY = "__repository__"  # the repository name Dagster gives a Definitions object
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def cli_job(spec_path: str, storage_root: str | None, device: str) -> dg.JobDefinition:
    """The job of one spec file, built the way the code location builds it (reconstructable by name)."""
    from . import build_definitions
    from .automation import job_name

    spec = load_spec(spec_path)
    return build_definitions([spec], storage_root=storage_root, device=device).resolve_job_def(job_name(spec))


def remote_origin(job_name: str):
    """The origin the workspace's code location gives `job_name` (what the UI records for its runs)."""
    return remote_job_origin(job_name, executable_path=sys.executable, module_name=DEFINITIONS_MODULE,
                             working_directory=str(PROJECT_ROOT), location_name=CODE_LOCATION,
                             repository_name=REPOSITORY)


def create_cli_run(instance: dg.DagsterInstance, spec, spec_path: str | Path, *, storage_root: str | None,
                   device: str, asset_selection: list[dg.AssetKey] | None, run_config: dict,
                   tags: dict[str, str] | None = None):
    """Create the run of `spec`'s job (code-location origin, `pipeline` tag); returns (job, run)."""
    recon = dg.build_reconstructable_job(__name__, cli_job.__name__,
                                         reconstructable_args=(str(Path(spec_path).resolve()), storage_root, device))
    job = recon.get_subset(asset_selection=frozenset(asset_selection)) if asset_selection else recon
    job_def = job.get_definition()
    run = instance.create_run_for_job(
        job_def=job_def, run_config=run_config,
        tags={**job_def.run_tags, PIPELINE_TAG: spec.name, "sft_dagster/launched_by": "cli", **(tags or {})},
        asset_selection=frozenset(asset_selection) if asset_selection else None,
        job_code_origin=job.get_python_origin(), remote_job_origin=remote_origin(job_def.name),
    )
    return job, run


def execute_cli_run(instance: dg.DagsterInstance, job, run) -> bool:
    """Execute a created run here, in this process (the run config picks the `in_process` executor, as
    `execute_in_process` did: progress shows as it happens, training uses this process's device)."""
    return execute_run(job, run, instance, raise_on_error=False).success
