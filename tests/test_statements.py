"""Precompiled statements on the driver's cursor (trainyard.statements): the same values as SQLAlchemy's own
execution on SQLite and PostgreSQL, refusals at compile time, and SQLAlchemy's errors when things fail."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from trainyard.models import ApiToken, Job, JobStatus
from trainyard.statements import Statement

JOB = Job.__table__
JOB_BY_ID = Statement("t_job_by_id", select(*JOB.c).where(JOB.c.id == bindparam("job_id")))
QUEUED_OF = Statement("t_queued_of", select(JOB.c.id, JOB.c.spec, JOB.c.cancel_requested, JOB.c.created_at)
                      .where(JOB.c.queue == bindparam("queue"), JOB.c.status == JobStatus.QUEUED)
                      .order_by(JOB.c.id).limit(bindparam("n")))
RENAME = Statement("t_rename", update(JOB).where(JOB.c.id == bindparam("job_id"))
                   .values(name=bindparam("name"), updated_at=bindparam("now")))


def _insert_job(db, **values) -> int:
    now = datetime.now(UTC)
    row = dict(kind="train", name="a job", status=JobStatus.QUEUED, dataset="digits", architecture="cnn",
               spec={"params": {"lr": 5e-05}, "nested": [1, "two", None]}, queue="cpu", priority=1, attempt=0,
               max_attempts=3, cancel_requested=False, progress={}, metrics={}, owner="ann",
               created_at=now, updated_at=now)
    row.update(values)
    with db.session_scope() as s:
        return s.execute(insert(Job).values(**row).returning(Job.id)).scalar_one()


def test_rows_match_sqlalchemys_own_execution(db):
    job_id = _insert_job(db, cancel_requested=True, started_at=datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC))
    with db.connection() as conn:
        fast = JOB_BY_ID.first(conn, job_id=job_id)
        slow = conn.execute(JOB_BY_ID.statement_for(db.dialect), {"job_id": job_id}).one()
    assert fast._asdict() == slow._asdict()
    assert fast.spec == {"params": {"lr": 5e-05}, "nested": [1, "two", None]}  # JSON parsed on SQLite too
    assert fast.cancel_requested is True
    assert fast.started_at == datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    assert fast.started_at.tzinfo is not None and fast.finished_at is None
    with db.connection() as conn:
        assert JOB_BY_ID.first(conn, job_id=job_id + 1000) is None


def test_literals_in_the_statement_and_bound_limits(db):
    ids = [_insert_job(db) for _ in range(3)]
    _insert_job(db, status=JobStatus.RUNNING)
    _insert_job(db, queue="gpu")
    with db.connection() as conn:
        assert [r.id for r in QUEUED_OF.all(conn, queue="cpu", n=2)] == ids[:2]
        assert [r.id for r in QUEUED_OF.all(conn, queue="cpu", n=10)] == ids
        assert QUEUED_OF.all(conn, queue="none", n=10) == []


def test_writes_commit_as_they_run_and_count_rows(db):
    job_id = _insert_job(db)
    later = datetime.now(UTC) + timedelta(hours=1)
    with db.connection() as conn:
        assert RENAME.rowcount(conn, job_id=job_id, name="renamed", now=later) == 1
        assert RENAME.rowcount(conn, job_id=job_id + 1000, name="nobody", now=later) == 0
    with db.read_scope() as s:  # another connection sees it: committed
        row = s.execute(select(JOB.c.name, JOB.c.updated_at).where(JOB.c.id == job_id)).one()
    assert row.name == "renamed" and row.updated_at == later


def test_statements_whose_sql_is_not_fixed_are_refused(db):
    in_list = Statement("t_in", select(JOB.c.id).where(JOB.c.id.in_(bindparam("ids", expanding=True))))
    python_default = Statement("t_default", insert(ApiToken.__table__).values(
        user=bindparam("user"), role="viewer", name="", token_hash=bindparam("h"), prefix="ty_", created_by="x",
        expires_at=bindparam("expires")))
    with db.connection() as conn:
        with pytest.raises(ValueError, match="depends on its parameters"):
            in_list.all(conn, ids=[1, 2])
        with pytest.raises(ValueError, match=r"give \['created_at'\] explicitly"):
            python_default.rowcount(conn, user="u", h="h", expires=datetime.now(UTC))
        with pytest.raises(TypeError, match="returns no rows"):
            RENAME.all(conn, job_id=1, name="x", now=datetime.now(UTC))
        with pytest.raises(KeyError):
            JOB_BY_ID.first(conn)  # a missing parameter is the caller's bug, said at once


def test_driver_errors_come_out_as_sqlalchemys(db):
    token = Statement("t_token", insert(ApiToken.__table__).values(
        user="u", role="viewer", name="", token_hash=bindparam("h"), prefix="ty_", created_by="x",
        created_at=bindparam("now"), expires_at=bindparam("now")).returning(ApiToken.__table__.c.id))
    now = datetime.now(UTC)
    with db.connection() as conn:
        token.first(conn, h="same", now=now)
        with pytest.raises(IntegrityError):
            token.first(conn, h="same", now=now)
        assert token.first(conn, h="other", now=now) is not None  # the connection is still good


def test_a_dropped_connection_invalidates_it_as_sqlalchemy_would(db):
    if db.dialect != "postgresql":
        pytest.skip("SQLite has no server to drop the connection")
    job_id = _insert_job(db)
    name = db.url.rsplit("/", 1)[1]
    with db.connection() as conn:
        assert JOB_BY_ID.first(conn, job_id=job_id) is not None
        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                          "AND pid <> pg_backend_pid()", (name,))
        with pytest.raises(DBAPIError) as caught:
            JOB_BY_ID.first(conn, job_id=job_id)
        assert caught.value.connection_invalidated
    with db.connection() as conn:  # the pool hands out a live one next
        assert JOB_BY_ID.first(conn, job_id=job_id).id == job_id


def test_many_rows_in_one_batch(db):
    from trainyard import job_logs

    job_id = _insert_job(db)
    at = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    job_logs.append(db, job_id, 1, [(at + timedelta(seconds=i), f"line {i}") for i in range(50)])
    job_logs.append(db, job_id, 1, [])
    lines = job_logs.read(db, job_id)
    assert [line.line for line in lines] == [f"line {i}" for i in range(50)]
    assert lines[7].at == at + timedelta(seconds=7) and lines[7].attempt == 1
