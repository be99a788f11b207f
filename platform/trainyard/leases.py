"""Leases: a worker claims the most urgent waiting job (QUEUED → RUNNING, attempt + 1, lease owner and expiry) in
one statement, keeps its lease with a heartbeat, and finds the job it holds after a lost answer. The workers'
hottest statements; everything else a job goes through is in `trainyard.jobs`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import bindparam, select, update

from trainyard.db import Database
from trainyard.jobs import MAX_ID, JobView, get_job, job_view
from trainyard.models import Job, JobStatus, utcnow
from trainyard.statements import Statement


@dataclass(frozen=True)
class LeaseState:
    held: bool
    cancel_requested: bool


def claim_job(db: Database, job_id: int, worker: str, lease_seconds: float, *,
              most_urgent: bool = False, worker_label: str | None = None) -> JobView | None:
    """QUEUED → RUNNING with attempt + 1 and a lease, in one statement; None if nothing is claimable.

    With `most_urgent` (what a worker does with a message), the job claimed is the most urgent one waiting
    in `job_id`'s queue: highest priority first, then the oldest. A message is then only a wake-up: priority
    holds on every broker, and every job runs once whichever message arrives. On PostgreSQL the candidate is
    picked `FOR UPDATE SKIP LOCKED`, so concurrent claimers each take a different job instead of racing for
    the head and retrying; SQLite runs one writing statement at a time. A claim returns None only when no
    job is waiting that another claim is not already taking. `worker_label` names the worker in the
    history (its Celery node name), `worker` is the lease owner. The view has no events (none are read).
    """
    if not 0 < job_id <= MAX_ID:
        return None
    now = utcnow()
    with db.connection() as conn:
        row = (_CLAIM_MOST_URGENT if most_urgent else _CLAIM_THIS).first(
            conn, hint=job_id, reason=f"started on {worker_label or worker}", lease_to=worker,
            expires=now + timedelta(seconds=lease_seconds), now=now)
    return None if row is None else job_view(row)


def _claim_statement(most_urgent: bool):
    """The claim, the workers' hottest statement: precompiled (trainyard.statements), its row turned into a view."""
    job = Job.__table__
    if most_urgent:
        queue = select(job.c.queue).where(job.c.id == bindparam("hint")).scalar_subquery()
        candidate = (select(job.c.id).where(job.c.queue == queue, job.c.status == JobStatus.QUEUED)
                     .order_by(job.c.priority.desc(), job.c.id).limit(1)
                     .with_for_update(skip_locked=True).scalar_subquery())
    else:
        candidate = bindparam("hint")
    return (
        update(job)
        .where(job.c.id == candidate, job.c.status == JobStatus.QUEUED)
        .values(status=JobStatus.RUNNING, status_reason=bindparam("reason"), attempt=job.c.attempt + 1,
                lease_owner=bindparam("lease_to"), lease_expires_at=bindparam("expires", type_=Job.lease_expires_at.type),
                started_at=bindparam("now", type_=Job.started_at.type), error=None,
                updated_at=bindparam("now", type_=Job.updated_at.type))
        .returning(*job.c)
    )


_CLAIM_MOST_URGENT = Statement("claim_most_urgent", _claim_statement(True))
_CLAIM_THIS = Statement("claim_this", _claim_statement(False))


def job_leased_by(db: Database, worker: str) -> JobView | None:
    """The job this worker process holds the lease of, if any (one process runs one job at a time)."""
    with db.read_scope() as s:
        job_id = s.scalar(select(Job.id).where(Job.status == JobStatus.RUNNING, Job.lease_owner == worker)
                          .order_by(Job.id.desc()).limit(1))
    return None if job_id is None else get_job(db, job_id)


def renew_lease(
    db: Database, job_id: int, worker: str, attempt: int, lease_seconds: float,
    progress: dict[str, Any] | None = None,
) -> LeaseState:
    """Extend the lease (and store the latest progress) if this worker still holds it: one statement that
    touches no indexed column, so PostgreSQL updates the row in place (HOT)."""
    now = utcnow()
    params = {"job_id": job_id, "attempt": attempt, "worker": worker, "now": now,
              "expires": now + timedelta(seconds=lease_seconds)}
    with db.connection() as conn:
        if progress is None:
            row = _RENEW.first(conn, **params)
        else:
            row = _RENEW_WITH_PROGRESS.first(conn, **params, progress=progress)
    return LeaseState(held=row is not None, cancel_requested=bool(row and row.cancel_requested))


def _renewal(with_progress: bool):
    job = Job.__table__
    values: dict[str, Any] = {"lease_expires_at": bindparam("expires", type_=Job.lease_expires_at.type),
                              "updated_at": bindparam("now", type_=Job.updated_at.type)}
    if with_progress:
        values["progress"] = bindparam("progress", type_=Job.progress.type)
    return (update(job)
            .where(job.c.id == bindparam("job_id"), job.c.status == JobStatus.RUNNING,
                   job.c.attempt == bindparam("attempt"), job.c.lease_owner == bindparam("worker"))
            .values(**values)
            .returning(job.c.cancel_requested))


_RENEW = Statement("renew_lease", _renewal(False))
_RENEW_WITH_PROGRESS = Statement("renew_lease_with_progress", _renewal(True))
