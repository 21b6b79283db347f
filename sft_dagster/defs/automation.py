"""Jobs, the nightly schedule, the data-change sensor, the rankings sensor, and the failed-gate sensor."""


import glob
import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg

from ..spec import PipelineSpec
from .common import PipelineDefs
from .dagster_compat import AssetCheckExecutionRecordStatus
from .evaluation import PROMOTION_CHECK
from .preference import rankings_path
from .shared import corrections_path
from .resources import SFTStorage


def job_name(spec: PipelineSpec) -> str:
    return f"{spec.name}_job"


def pipeline_job(spec: PipelineSpec):
    return dg.define_asset_job(
        job_name(spec),
        selection=dg.AssetSelection.groups(spec.name),
        description=f"Materialize the whole {spec.name} pipeline: data, gates, training, evaluation, promotion.",
        tags={"pipeline": spec.name},
    )


def preference_job_name(spec: PipelineSpec) -> str:
    return f"{spec.name}_preference_job"


def preference_job(spec: PipelineSpec):
    """`preference_pairs` and everything downstream of it: what new rankings change."""
    pairs = dg.AssetKey([spec.name, "preference_pairs"])
    return dg.define_asset_job(
        preference_job_name(spec),
        selection=dg.AssetSelection.assets(pairs).downstream().required_multi_asset_neighbors(),
        description=f"Rebuild {spec.name}'s preference pairs from the rankings and train, report and promote from them.",
        tags={"pipeline": spec.name},
    )


def rankings_sensor(spec: PipelineSpec, job) -> dg.SensorDefinition:
    """Starts the preference job when the rankings file changes (`sft-dagster rank` appends to it)."""
    def watched(storage: SFTStorage) -> dict[str, list]:
        return stamps([rankings_path(spec, storage)])

    return file_change_sensor(f"{spec.name}_rankings_sensor", job, watched, "rankings file",
                              "Starts a run of preference_pairs and downstream when new rankings are recorded.")


def nightly_schedule(spec: PipelineSpec, job) -> dg.ScheduleDefinition:
    # Unchanged stages cost little: datasets re-hash to the same data version, and training and
    # evaluation skip themselves when their lineage is unchanged.
    return dg.ScheduleDefinition(
        name=f"{spec.name}_nightly",
        job=job,
        cron_schedule=spec.schedule.cron,
        execution_timezone=spec.schedule.timezone,
        default_status=dg.DefaultScheduleStatus.RUNNING if spec.schedule.enabled else dg.DefaultScheduleStatus.STOPPED,
        description=f"Nightly run of {spec.name} ({spec.schedule.cron} {spec.schedule.timezone}).",
    )


def stamps(paths) -> dict[str, list]:
    """Size and mtime of each existing file."""
    out = {}
    for path in paths:
        if Path(path).exists():
            stat = Path(path).stat()
            out[str(path)] = [stat.st_size, stat.st_mtime_ns]
    return out


def watched_files(spec: PipelineSpec, storage: SFTStorage) -> dict[str, list]:
    """Size and mtime of every source file and of the corrections file (of every task of a multi-task spec)."""
    files: dict[str, list] = {}
    for entry in spec.tasks:
        files |= watched_files(spec.task_pipeline(entry.name), storage)
    paths = [path for source in spec.sources
             for path in sorted(glob.glob(str(spec.resolve(source.path).resolve()), recursive=True))]
    paths += [str(spec.resolve(source.target).resolve()) for source in spec.sources if source.target]
    return files | stamps([*paths, corrections_path(spec, storage)])


def file_change_sensor(name: str, job, watched, what: str, description: str) -> dg.SensorDefinition:
    """A sensor that starts `job` when a file of `watched(storage)` (path -> [size, mtime]) appears, changes
    or disappears; its first tick only remembers what is there."""
    @dg.sensor(name=name, job=job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING,
               description=description)
    def _sensor(context: dg.SensorEvaluationContext, storage: SFTStorage):
        current = watched(storage)
        if context.cursor is None:
            # First tick: remember what is there; only later changes start runs.
            context.update_cursor(json.dumps(current))
            return dg.SkipReason(f"watching {len(current)} files")
        previous = json.loads(context.cursor)
        changed = sorted(p for p in current if previous.get(p) != current[p])
        removed = sorted(set(previous) - set(current))
        context.update_cursor(json.dumps(current))
        if not changed and not removed:
            return dg.SkipReason(f"no {what} changed")
        run_key = hashlib.sha256(json.dumps(current, sort_keys=True).encode()).hexdigest()[:16]
        return dg.RunRequest(run_key=run_key, tags={"sft_dagster/changed_files": ", ".join(Path(p).name for p in changed + removed)[:200]})

    return _sensor


def data_change_sensor(spec: PipelineSpec, job) -> dg.SensorDefinition:
    return file_change_sensor(f"{spec.name}_data_change_sensor", job, lambda storage: watched_files(spec, storage),
                              "source or corrections file",
                              "Starts a run when raw files appear or change, or the corrections file changes.")


def failed_gate_sensor(pipeline: PipelineDefs) -> dg.SensorDefinition:
    """Reports a pipeline's failed blocking checks the way a run-failure sensor reports failed runs.

    A failed check does not fail its run, so nothing else would tell anyone. Each new failure is
    logged and appended to `<storage root>/alerts.jsonl` (point a log shipper or a hook at it).
    """
    check_keys = [*pipeline.blocking_checks, pipeline.check_key("evaluation_report", PROMOTION_CHECK),
                  *pipeline.preference_blocking_checks]

    @dg.sensor(name=f"{pipeline.name}_failed_quality_gate_sensor", minimum_interval_seconds=60,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description=f"Alerts on every newly failed blocking data-quality or promotion check of {pipeline.name}.")
    def _sensor(context: dg.SensorEvaluationContext, storage: SFTStorage):
        seen = json.loads(context.cursor) if context.cursor else {}
        records = context.instance.event_log_storage.get_latest_asset_check_execution_by_key(check_keys)
        alerts = []
        for key, record in records.items():
            name = f"{key.asset_key.to_user_string()}:{key.name}"
            if record.id <= seen.get(name, -1):
                continue
            seen[name] = record.id
            if record.status == AssetCheckExecutionRecordStatus.FAILED:
                alerts.append({"check": name, "run_id": record.run_id,
                               "at": datetime.fromtimestamp(record.create_timestamp, timezone.utc).isoformat()})
        for alert in alerts:
            context.log.error(f"blocking check failed: {alert['check']} in run {alert['run_id']}")
        if alerts:
            path = Path(storage.root) / "alerts.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as fh:
                fh.writelines(json.dumps(a) + "\n" for a in alerts)
        context.update_cursor(json.dumps(seen))
        return dg.SkipReason(f"{len(alerts)} new failed blocking checks" if alerts else "no new failed blocking checks")

    return _sensor
