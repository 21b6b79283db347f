"""The Dagster instance on PostgreSQL (dagster-postgres): the dagster.yaml `python -m sft_dagster.instance
--postgres` writes, with the data stages and the cross-run blocking guard running against it.

Needs a server: `SFT_DAGSTER_TEST_POSTGRES_URL` (`scripts/with_postgres.sh` starts a throwaway one and
sets it; `.ci/run` runs the whole suite that way). Skipped without it, so `make test` alone passes.
"""

from __future__ import annotations

import os
import uuid
from urllib.parse import urlsplit, urlunsplit

import dagster as dg
import pytest
import yaml

from sft_dagster.instance import POSTGRES_INSTANCE_YAML, POSTGRES_URL_ENV, ensure_dagster_home

from test_pipeline_dagster import ROOT, gate_blocks_training_across_runs

SERVER = os.environ.get("SFT_DAGSTER_TEST_POSTGRES_URL")
needs_server = pytest.mark.skipif(not SERVER, reason="no PostgreSQL server: set SFT_DAGSTER_TEST_POSTGRES_URL "
                                                   "(scripts/with_postgres.sh starts one; .ci/run does)")


@pytest.fixture()
def database():
    """A fresh database on the server for one test, dropped afterwards."""
    import psycopg2

    name = f"sft_test_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(SERVER)
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {name}")
    parts = urlsplit(SERVER)
    yield urlunsplit(parts._replace(path=f"/{name}"))
    admin.cursor().execute(f"DROP DATABASE {name} WITH (FORCE)")
    admin.close()


@needs_server
def test_postgres_instance_runs_the_data_stages_and_the_cross_run_guard(tmp_path, tiny_model_dir, database, monkeypatch):
    import psycopg2

    # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; dagster-postgres installs psycopg2.
    monkeypatch.setenv(POSTGRES_URL_ENV, database.replace("postgresql://", "postgresql+psycopg2://", 1))
    home = ensure_dagster_home(tmp_path / "home", postgres=True)
    config = yaml.safe_load((home / "dagster.yaml").read_text())
    assert config["storage"]["postgres"]["postgres_url"] == {"env": POSTGRES_URL_ENV}
    assert config["concurrency"]["pools"]["default_limit"] == 1  # the same guards as the SQLite default

    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert [type(s).__name__ for s in (instance.run_storage, instance.event_log_storage, instance.schedule_storage)] \
            == ["PostgresRunStorage", "PostgresEventLogStorage", "PostgresScheduleStorage"]
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
        gate_blocks_training_across_runs(tmp_path, tiny_model_dir, instance)
        runs = instance.get_runs()

    # What the guard read lives in PostgreSQL: the runs, and the failed gate's check evaluation.
    with psycopg2.connect(database) as conn, conn.cursor() as cur:
        cur.execute("SELECT run_id, status FROM runs")
        stored = dict(cur.fetchall())
        cur.execute("SELECT execution_status FROM asset_check_executions WHERE check_name = 'label_issue_rate' "
                    "ORDER BY id DESC LIMIT 1")
        latest_gate = cur.fetchone()[0]
        cur.execute("SELECT count(*) FROM instigators")  # schedule storage's tables exist in this database
        cur.fetchone()
    assert set(stored) == {r.run_id for r in runs} and len(stored) == 3
    # data stages pass; the strict gate fails (a failed blocking check fails its run); training is refused
    assert [stored[r.run_id] for r in reversed(runs)] == ["SUCCESS", "FAILURE", "FAILURE"]
    assert latest_gate == "FAILED"


def test_the_written_postgres_config_is_the_shipped_one(tmp_path):
    assert (ROOT / "deploy" / "dagster.yaml").read_text() == POSTGRES_INSTANCE_YAML
