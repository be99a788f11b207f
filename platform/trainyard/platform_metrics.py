"""What the platform database says about the queues, jobs and workers, as numbers for monitoring (the web's
/metrics page renders them for Prometheus). A few aggregate queries, whatever the number of jobs."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Float, case, cast, extract, func, select

from trainyard import worker_registry
from trainyard.db import Database
from trainyard.models import TERMINAL_STATUSES, Job, JobStatus
from trainyard.worker_registry import QueueView, WorkerView

# Upper bounds (seconds) of the job-duration histogram: a smoke test takes seconds, real training hours.
DURATION_BUCKETS = (10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 3 * 3600.0, 6 * 3600.0, 12 * 3600.0,
                    24 * 3600.0, 72 * 3600.0)


@dataclass(frozen=True)
class DurationHistogram:
    kind: str
    status: str
    buckets: list[tuple[float, int]]  # (upper bound, finished jobs that took at most that long), cumulative
    count: int
    sum_seconds: float


@dataclass(frozen=True)
class PlatformNumbers:
    queues: list[QueueView]
    jobs_by_status: dict[str, int]  # every status, zeros included
    durations: list[DurationHistogram]
    workers: list[WorkerView]


def platform_numbers(db: Database, *, stale_after_seconds: float,
                     buckets: tuple[float, ...] = DURATION_BUCKETS) -> PlatformNumbers:
    """Queue depths, jobs per status, finished jobs' durations and the worker pool, read now."""
    pool = worker_registry.pool_status(db, stale_after_seconds=stale_after_seconds)  # two queries
    seconds = _duration_seconds(db.dialect)
    # Cumulative bucket counts in SQL: one row per (kind, final status), not one per job.
    bucket_columns = [func.sum(case((seconds <= bound, 1), else_=0)) for bound in buckets]
    with db.session_scope() as s:
        by_status = dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        rows = s.execute(
            select(Job.kind, Job.status, func.count(), func.sum(seconds), *bucket_columns)
            .where(Job.status.in_(TERMINAL_STATUSES), Job.started_at.is_not(None), Job.finished_at.is_not(None))
            .group_by(Job.kind, Job.status).order_by(Job.kind, Job.status)).all()
    durations = [
        DurationHistogram(kind=kind, status=status, count=count, sum_seconds=float(total or 0.0),
                          buckets=[(bound, int(n or 0)) for bound, n in zip(buckets, counts, strict=True)])
        for kind, status, count, total, *counts in rows
    ]
    return PlatformNumbers(queues=pool.queues, jobs_by_status={s.value: by_status.get(s.value, 0) for s in JobStatus},
                           durations=durations, workers=pool.workers)


def _duration_seconds(dialect: str):
    """finished_at - started_at in seconds, in the database's own date arithmetic."""
    if dialect == "sqlite":  # datetimes are ISO text there
        return (func.julianday(Job.finished_at) - func.julianday(Job.started_at)) * 86400.0
    return cast(extract("epoch", Job.finished_at - Job.started_at), Float)
