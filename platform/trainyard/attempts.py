"""A running attempt's own writes, made by the worker that holds its lease: progress and metrics, its MLflow
run, notes in its history, and how it ends (finished, failed, cancelled, or handed back to the queue). Each
write is conditional on the attempt still running, so a worker that lost its lease changes nothing."""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, insert, literal, select, update

from trainyard.db import Database
from trainyard.jobs import Dispatch, send_after_commit, transition
from trainyard.models import Job, JobEvent, JobStatus, utcnow
from trainyard.statements import Statement


def record_progress(
    db: Database, job_id: int, attempt: int, *, progress: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None, mlflow_run_id: str | None = None,
    checkpoint_path: str | None = None, checkpoint_sha256: str | None = None, checkpoint_epoch: int | None = None,
    model_name: str | None = None, model_version: int | None = None,
) -> bool:
    """Store progress, metrics, the MLflow run or the latest checkpoint of a running attempt.

    False if the attempt no longer runs (it was cancelled, or another worker took the job over).
    """
    given = {
        "progress": progress, "metrics": metrics, "mlflow_run_id": mlflow_run_id,
        "checkpoint_path": checkpoint_path, "checkpoint_sha256": checkpoint_sha256,
        "checkpoint_epoch": checkpoint_epoch, "model_name": model_name, "model_version": model_version,
    }
    values = {key: value for key, value in given.items() if value is not None}
    with db.read_scope() as s:
        result = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.attempt == attempt)
            .values(updated_at=utcnow(), **values)
        )
        return result.rowcount == 1


def record_run(db: Database, job_id: int, attempt: int, mlflow_run_id: str) -> bool:
    """Store a running attempt's MLflow run (what a resumed attempt continues); False if it no longer runs.
    Precompiled: every job's start writes it."""
    with db.connection() as conn:
        return _RECORD_RUN.rowcount(conn, job_id=job_id, attempt=attempt, run_id=mlflow_run_id, now=utcnow()) == 1


def _running_attempt(statement):
    job = Job.__table__
    return statement.where(job.c.id == bindparam("job_id"), job.c.status == JobStatus.RUNNING,
                           job.c.attempt == bindparam("attempt"))


_RECORD_RUN = Statement("record_run", _running_attempt(update(Job.__table__)).values(
    mlflow_run_id=bindparam("run_id"), updated_at=bindparam("now", type_=Job.__table__.c.updated_at.type)))


def note_event(db: Database, job_id: int, attempt: int, message: str) -> bool:
    """Add a note to a running attempt's history (e.g. "fell back to an older checkpoint").

    False if the attempt no longer runs.
    """
    note = insert(JobEvent).from_select(
        ["job_id", "at", "from_status", "to_status", "attempt", "message"],
        select(Job.id, literal(utcnow(), JobEvent.at.type), Job.status, Job.status, Job.attempt, literal(message))
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.attempt == attempt))
    with db.read_scope() as s:
        return s.execute(note).rowcount == 1


def _end_running(db: Database, job_id: int, attempt: int, to: JobStatus, message: str, **values: Any) -> bool:
    with db.read_scope() as s:
        return transition(
            s, job_id, from_status=JobStatus.RUNNING, to_status=to, attempt=attempt, message=message,
            values={"lease_owner": None, "lease_expires_at": None, "finished_at": utcnow(), **values},
        )


def finish_job(db: Database, job_id: int, attempt: int, metrics: dict[str, Any], progress: dict[str, Any]) -> bool:
    """RUNNING → SUCCEEDED for this attempt, with its final metrics and progress; False if it had moved on.
    Precompiled: every job ends here (`_end_running` does the rarer outcomes)."""
    with db.connection() as conn:
        return _FINISH.rowcount(conn, job_id=job_id, attempt=attempt, metrics=metrics, progress=progress,
                                now=utcnow()) == 1


def _finish():
    job = Job.__table__
    now = bindparam("now", type_=job.c.updated_at.type)
    return _running_attempt(update(job)).values(
        status=JobStatus.SUCCEEDED, status_reason="finished", lease_owner=None, lease_expires_at=None,
        finished_at=now, updated_at=now, metrics=bindparam("metrics", type_=job.c.metrics.type),
        progress=bindparam("progress", type_=job.c.progress.type))


_FINISH = Statement("finish_job", _finish())


def prune_job(db: Database, job_id: int, attempt: int, reason: str, metrics: dict[str, Any],
              progress: dict[str, Any]) -> bool:
    """RUNNING → PRUNED: a sweep's trial its sweep stopped early, keeping its metrics, progress and checkpoint."""
    return _end_running(db, job_id, attempt, JobStatus.PRUNED, reason, metrics=metrics, progress=progress)


def fail_job(db: Database, job_id: int, attempt: int, error: str) -> bool:
    return _end_running(db, job_id, attempt, JobStatus.FAILED, error.splitlines()[0][:500], error=error)


def mark_cancelled(db: Database, job_id: int, attempt: int) -> bool:
    return _end_running(db, job_id, attempt, JobStatus.CANCELLED, "cancelled by request")


def release_job(db: Database, job_id: int, attempt: int, message: str, dispatch: Dispatch) -> bool:
    """RUNNING → QUEUED for a worker that stops on purpose (or → CANCELLED if a cancel was asked for)."""
    with db.read_scope() as s:
        row = s.get(Job, job_id)
        if row is None:
            return False
        queue, priority = row.queue, row.priority
        cleared = {"lease_owner": None, "lease_expires_at": None}
        if row.cancel_requested:
            transition(s, job_id, from_status=JobStatus.RUNNING, to_status=JobStatus.CANCELLED, attempt=attempt,
                        message="cancelled by request", values={**cleared, "finished_at": utcnow()})
            return False
        # A deliberate stop is not a failure: it must not use up one of the job's attempts.
        released = transition(
            s, job_id, from_status=JobStatus.RUNNING, to_status=JobStatus.QUEUED, attempt=attempt, message=message,
            values={**cleared, "max_attempts": row.max_attempts + 1},
            also=[Job.cancel_requested.is_(False)])
    if released:
        send_after_commit(dispatch, job_id, queue, priority)
    return released
