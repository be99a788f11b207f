"""Migrations: one head, upgrade → downgrade → upgrade on both backends, and code refuses a stale schema."""

from __future__ import annotations

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
