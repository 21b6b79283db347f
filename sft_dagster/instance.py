"""The Dagster instance sft_dagster runs in: `$DAGSTER_HOME` (default `./.dagster_home`).

A new instance gets a `dagster.yaml` that keeps two runs of one pipeline from writing its artefacts at
the same time, whoever started them (the nightly schedule, the data-change sensor, the CLI, the UI):

- every asset of a pipeline is in the concurrency pool `sft_<pipeline>`, and `pools.default_limit: 1`
  lets one step of that pool run at a time across all runs (enforced for in-process CLI runs too);
- runs tagged with the same `pipeline` are queued one at a time by the run queue (UI, schedule, sensor).
  Every run of a pipeline carries that tag whatever started it: the pipeline's job has it as a run tag,
  the CLI sets it, and `PipelineRunCoordinator` (the queue this file configures) adds it to runs the UI
  launches for a selection of a pipeline's assets (Dagster's implicit asset job, which has no tags).

Storage is SQLite in the folder by default (no server). `--postgres` writes the same settings with
run, event-log and schedule storage in PostgreSQL (`dagster-postgres`), the server named by the
environment variable `SFT_DAGSTER_POSTGRES_URL` (`postgresql+psycopg2://user:password@host:port/db`)
when the instance starts, so no password is written to the file. The `+psycopg2` matters: SQLAlchemy
2.1 reads a bare `postgresql://` as psycopg 3, while dagster-postgres installs psycopg2.

An existing, non-empty `dagster.yaml` is left as it is (other run launchers, ...).
`python -m sft_dagster.instance [--postgres] [HOME]` creates the folder and the file.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from dagster import QueuedRunCoordinator, SubmitRunContext

DEFAULT_DAGSTER_HOME = ".dagster_home"
POSTGRES_URL_ENV = "SFT_DAGSTER_POSTGRES_URL"

CONCURRENCY_YAML = """\
run_coordinator:
  # The queued run coordinator, adding the `pipeline` tag to runs of one pipeline's assets.
  module: sft_dagster.instance
  class: PipelineRunCoordinator
concurrency:
  pools:
    # Each pipeline's assets share the pool sft_<pipeline>: one step of a pipeline at a time, across runs.
    default_limit: 1
  runs:
    # Runs of the same pipeline (tag `pipeline`) wait in the queue for each other.
    tag_concurrency_limits:
      - key: pipeline
        value:
          applyLimitPerUniqueValue: true
        limit: 1
"""

DEFAULT_INSTANCE_YAML = (
    "# Written by sft_dagster for a new instance (see sft_dagster/instance.py). Storage: SQLite in this folder.\n"
    + CONCURRENCY_YAML
)

POSTGRES_INSTANCE_YAML = f"""\
# Written by sft_dagster (python -m sft_dagster.instance --postgres; see sft_dagster/instance.py).
# Run, event-log and schedule storage in PostgreSQL (dagster-postgres); the server is read from
# ${POSTGRES_URL_ENV} (postgresql+psycopg2://user:password@host:port/database) when the instance starts.
storage:
  postgres:
    postgres_url:
      env: {POSTGRES_URL_ENV}
""" + CONCURRENCY_YAML


PIPELINE_TAG = "pipeline"


def pipeline_of(run) -> str | None:
    """The pipeline a run belongs to: from its job (`<pipeline>_job`), else from the asset keys it selects
    (every key of a pipeline starts with the pipeline's name); None for runs spanning several."""
    if run.tags.get(PIPELINE_TAG):
        return run.tags[PIPELINE_TAG]
    keys = set(run.asset_selection or ()) | {c.asset_key for c in (run.asset_check_selection or ())}
    prefixes = {k.path[0] for k in keys if len(k.path) > 1}
    if len(prefixes) == 1:
        return prefixes.pop()
    if run.job_name.endswith("_job") and not keys:
        return run.job_name.removesuffix("_job")
    return None


class PipelineRunCoordinator(QueuedRunCoordinator):
    """Dagster's queued run coordinator that first tags each run with its pipeline (`pipeline_of`), so the
    queue's per-pipeline limit holds for runs the UI launches from an asset selection too."""

    def submit_run(self, context: SubmitRunContext):
        run = context.dagster_run
        pipeline = pipeline_of(run)
        if pipeline and run.tags.get(PIPELINE_TAG) != pipeline:
            self._instance.add_run_tags(run.run_id, {PIPELINE_TAG: pipeline})
            context = SubmitRunContext(self._instance.get_run_by_id(run.run_id), context.workspace)
        return super().submit_run(context)


def ensure_dagster_home(home: str | Path | None = None, postgres: bool = False) -> Path:
    """Create `$DAGSTER_HOME` (or `home`) with the default `dagster.yaml` (or the Postgres one) unless
    one exists; export it."""
    home = Path(home or os.environ.get("DAGSTER_HOME") or DEFAULT_DAGSTER_HOME).resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists() or not config.read_text().strip():
        config.write_text(POSTGRES_INSTANCE_YAML if postgres else DEFAULT_INSTANCE_YAML)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Create a Dagster instance folder with sft_dagster's dagster.yaml.")
    parser.add_argument("home", nargs="?", help="the folder (default: $DAGSTER_HOME, else ./.dagster_home)")
    parser.add_argument("--postgres", action="store_true",
                        help=f"run, event-log and schedule storage in PostgreSQL (server from ${POSTGRES_URL_ENV})")
    args = parser.parse_args(argv)
    print(ensure_dagster_home(args.home, postgres=args.postgres))


if __name__ == "__main__":
    main()
