"""The Dagster layer: thin wiring of the pure stages into assets, checks, jobs and automation."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from ..spec import PipelineSpec, load_specs
from ..storage import default_storage_root
from .common import PipelineDefs
from .pipeline import build_pipeline_assets
from .automation import data_change_sensor, failed_gate_sensor, nightly_schedule, pipeline_job
from .common import JSON_IO
from .resources import ComputeResource, JsonIOManager, MLflowTracking, ParquetIOManager, SFTStorage

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def specs_dir() -> Path:
    return Path(os.environ.get("SFT_DAGSTER_SPECS", PROJECT_ROOT / "assets"))


def checks_dir() -> Path:
    return Path(os.environ.get("SFT_DAGSTER_CHECKS", PROJECT_ROOT / "data_checks"))


def build_definitions(
    specs: list[PipelineSpec] | None = None,
    checks: Path | None = None,
    storage_root: str | Path | None = None,
    device: str = "auto",
) -> dg.Definitions:
    """One asset group, job, schedule and data sensor per spec, plus the failed-gate sensor."""
    specs = load_specs(specs_dir()) if specs is None else specs
    checks = checks or checks_dir()
    root = str(Path(storage_root or default_storage_root()).resolve())
    pipelines: list[PipelineDefs] = [build_pipeline_assets(spec, checks) for spec in specs]
    assets, asset_checks, jobs, schedules, sensors = [], [], [], [], []
    for pipeline in pipelines:
        job = pipeline_job(pipeline.spec)
        assets += pipeline.assets
        asset_checks += pipeline.checks
        jobs.append(job)
        schedules.append(nightly_schedule(pipeline.spec, job))
        sensors.append(data_change_sensor(pipeline.spec, job))
    if pipelines:
        sensors.append(failed_gate_sensor(pipelines))
    return dg.Definitions(
        assets=assets,
        asset_checks=asset_checks,
        jobs=jobs,
        schedules=schedules,
        sensors=sensors,
        resources={
            "storage": SFTStorage(root=root),
            "compute": ComputeResource(device=device),
            "mlflow": MLflowTracking(),
            "io_manager": ParquetIOManager(root=root),
            JSON_IO: JsonIOManager(root=root),
            "pipes_subprocess_client": dg.PipesSubprocessClient(),
        },
    )
