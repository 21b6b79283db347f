"""The Dagster layer: thin wiring of the pure stages into assets, checks, jobs and automation.

Two ways in, one schema: `build_definitions` loads every spec in `assets/` (the `workspace.yaml` code
location), and the `sft_dagster.SFTPipeline` component (`defs/component.py`) takes one spec's fields as
its attributes in a `dg` project. Both build a pipeline with `pipeline_definitions` and share the
resources of `shared_resources`.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import dagster as dg

from ..spec import PipelineSpec, load_specs
from ..storage import default_storage_root
from .automation import (
    data_change_sensor,
    failed_gate_sensor,
    nightly_schedule,
    pipeline_job,
    preference_job,
    rankings_sensor,
)
from .common import JSON_IO
from .pipeline import build_pipeline_assets
from .resources import ComputeResource, JsonIOManager, K8sTraining, MLflowTracking, ParquetIOManager, SFTStorage

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def specs_dir() -> Path:
    return Path(os.environ.get("SFT_DAGSTER_SPECS", PROJECT_ROOT / "assets"))


def checks_dir() -> Path:
    return Path(os.environ.get("SFT_DAGSTER_CHECKS", PROJECT_ROOT / "data_checks"))


def pipeline_definitions(spec: PipelineSpec, checks: Path | None = None) -> dg.Definitions:
    """One spec's asset group, job, nightly schedule, data-change sensor and failed-gate sensor (no resources);
    with a `preference:` section also the preference job and the rankings sensor that starts it."""
    pipeline = build_pipeline_assets(spec, checks or checks_dir())
    job = pipeline_job(spec)
    jobs, sensors = [job], [data_change_sensor(spec, job), failed_gate_sensor(pipeline)]
    if spec.preference is not None:
        jobs.append(preference_job(spec))
        sensors.append(rankings_sensor(spec, jobs[-1]))
    return dg.Definitions(assets=pipeline.assets, asset_checks=pipeline.checks, jobs=jobs,
                          schedules=[nightly_schedule(spec, job)], sensors=sensors)


@functools.lru_cache(maxsize=16)
def shared_resources(storage_root: str, device: str = "auto") -> dict:
    """The resources every pipeline uses. Cached: pipelines loaded separately (several components in a
    `dg` project) get the very same objects, which `Definitions.merge` requires of a shared key."""
    return {
        "storage": SFTStorage(root=storage_root),
        "compute": ComputeResource(device=device),
        "mlflow": MLflowTracking(),
        "io_manager": ParquetIOManager(root=storage_root),
        JSON_IO: JsonIOManager(root=storage_root),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
        "k8s_training": K8sTraining(),
    }


def build_definitions(
    specs: list[PipelineSpec] | None = None,
    checks: Path | None = None,
    storage_root: str | Path | None = None,
    device: str = "auto",
) -> dg.Definitions:
    """Every spec (default: `assets/*.yaml`) as its own pipeline, with the shared resources."""
    specs = load_specs(specs_dir()) if specs is None else specs
    root = str(Path(storage_root or default_storage_root()).resolve())
    return dg.Definitions.merge(*(pipeline_definitions(spec, checks) for spec in specs),
                                dg.Definitions(resources=shared_resources(root, device)))
