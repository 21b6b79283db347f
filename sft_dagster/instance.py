"""The Dagster instance sft_dagster runs in: `$DAGSTER_HOME` (default `./.dagster_home`), SQLite storage.

A new instance gets a `dagster.yaml` that keeps two runs of one pipeline from writing its artefacts at
the same time, whoever started them (the nightly schedule, the data-change sensor, the CLI, the UI):

- every asset of a pipeline is in the concurrency pool `sft_<pipeline>`, and `pools.default_limit: 1`
  lets one step of that pool run at a time across all runs (enforced for in-process CLI runs too);
- runs tagged with the same `pipeline` are queued one at a time by the run queue (UI, schedule, sensor).

An existing, non-empty `dagster.yaml` is left as it is (Postgres, other run launchers, ...).
`python -m sft_dagster.instance` creates the folder and the file.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DAGSTER_HOME = ".dagster_home"

DEFAULT_INSTANCE_YAML = """\
# Written by sft_dagster for a new instance (see sft_dagster/instance.py). Storage: SQLite in this folder.
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


def ensure_dagster_home(home: str | Path | None = None) -> Path:
    """Create `$DAGSTER_HOME` (or `home`) with the default `dagster.yaml` unless one exists; export it."""
    home = Path(home or os.environ.get("DAGSTER_HOME") or DEFAULT_DAGSTER_HOME).resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists() or not config.read_text().strip():
        config.write_text(DEFAULT_INSTANCE_YAML)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


if __name__ == "__main__":
    print(ensure_dagster_home())
