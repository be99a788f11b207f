"""Migrations: one head, upgrade → downgrade → upgrade on both backends, and code refuses a stale schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect

from trainyard.config import Settings
from trainyard.db import alembic_config, downgrade_schema, schema_revisions, upgrade_schema
from trainyard.errors import SchemaOutOfDate
from trainyard.models import Base
from trainyard.specs import JobSpec
from conftest import ROOT


def test_single_head():
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert len(script.get_heads()) == 1


@pytest.fixture(params=["sqlite", "postgres"])
def empty_db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    return request.getfixturevalue("postgres").create()


def test_upgrade_downgrade_upgrade(empty_db_url):
    upgrade_schema(empty_db_url)
    engine = create_engine(empty_db_url)
    assert {"job", "job_event", "dataset"} <= set(inspect(engine).get_table_names())
    downgrade_schema(empty_db_url, "base")
    assert not {"job", "job_event", "dataset"} & set(inspect(engine).get_table_names())
    upgrade_schema(empty_db_url)
    current, head = schema_revisions(engine)
    assert current == head
    # The ORM models and the migrations describe the same schema.
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
    engine.dispose()


def test_web_app_refuses_stale_schema(tmp_path):
    from trainyard_web import create_app

    settings = Settings(data_dir=tmp_path)
    with pytest.raises(SchemaOutOfDate, match="trainyard db upgrade"):
        create_app(settings)
    upgrade_schema(settings.database_url)
    downgrade_schema(settings.database_url, "base")
    with pytest.raises(SchemaOutOfDate, match="trainyard db upgrade"):
        create_app(settings)


def test_worker_refuses_stale_schema(tmp_path):
    env = {**os.environ, "TRAINYARD_DATA_DIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("platform", "workers", "web"))}
    result = subprocess.run([sys.executable, "-m", "trainyard_workers", "worker"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "trainyard db upgrade" in result.stderr


def test_priorities_and_device_counts_of_stored_jobs_carry_over(empty_db_url):
    """0006: the old 0–9 priority becomes normal/high in the row and the stored spec; gpus 0 becomes 1."""
    from sqlalchemy import text

    upgrade_schema(empty_db_url, "0005_workers_and_job_logs")
    engine = create_engine(empty_db_url)
    insert = text("INSERT INTO job (kind, name, status, dataset, architecture, spec, queue, priority, attempt, "
                  "max_attempts, cancel_requested, progress, metrics, created_at, updated_at) VALUES ('train', "
                  "'j', 'QUEUED', 'digits', 'cnn', :spec, 'training', :priority, 0, 3, false, '{}', '{}', "
                  "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)")
    with engine.begin() as conn:
        for priority in (0, 5):
            conn.execute(insert, {"priority": priority, "spec": json.dumps(
                {"kind": "train", "priority": priority, "resources": {"queue": "training", "gpus": 0}})})
    upgrade_schema(empty_db_url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT priority, spec FROM job ORDER BY id")).all()
    specs = [json.loads(spec) if isinstance(spec, str) else spec for _, spec in rows]
    assert [p for p, _ in rows] == [1, 2]
    assert [(s["priority"], s["resources"]["gpus"]) for s in specs] == [("normal", 1), ("high", 1)]
    for spec in specs:  # what a worker does with a queued job's spec when it runs
        JobSpec.model_validate({**spec, "dataset": "digits", "architecture": "cnn"})
    downgrade_schema(empty_db_url, "0005_workers_and_job_logs")
    with engine.connect() as conn:
        assert [p for (p,) in conn.execute(text("SELECT priority FROM job ORDER BY id"))] == [0, 9]
    engine.dispose()
