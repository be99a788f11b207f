"""What the platform database says about the queues, jobs and workers, as numbers for monitoring (the web's
/metrics page renders them for Prometheus). A few rows of tallies, whatever the number of jobs."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select

from trainyard import worker_registry
from trainyard.db import Database
from trainyard.models import INF_BOUND, JobDurationTally, JobStatus, JobTally
from trainyard.worker_registry import QueueView, WorkerView

# Upper bounds (seconds) of the job-duration histogram: a smoke test takes seconds, real training hours. The
# triggers of migration 0007 count into these bounds; changing them takes a migration that re-counts.
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


def platform_numbers(db: Database, *, stale_after_seconds: float) -> PlatformNumbers:
    """Queue depths, jobs per status, finished attempts' durations and the worker pool, read now from the
    tallies the job triggers keep (migration 0007): a few rows per queue and kind, whatever the backlog."""
    pool = worker_registry.pool_status(db, stale_after_seconds=stale_after_seconds)
    with db.read_scope() as s:
        by_status = dict(s.execute(select(JobTally.status, func.sum(JobTally.n)).group_by(JobTally.status)).all())
        rows = s.execute(select(JobDurationTally.kind, JobDurationTally.status, JobDurationTally.le,
                                JobDurationTally.n, JobDurationTally.sum_seconds)
                         .order_by(JobDurationTally.kind, JobDurationTally.status, JobDurationTally.le)).all()
    histograms: dict[tuple[str, str], dict[float, tuple[int, float]]] = {}
    for kind, status, le, n, total in rows:
        histograms.setdefault((kind, status), {})[le] = (int(n), float(total))
    durations = []
    for (kind, status), by_bound in histograms.items():
        count, total = by_bound.get(INF_BOUND, (0, 0.0))
        cumulative, buckets = 0, []
        for bound in DURATION_BUCKETS:  # a bucket no attempt reached has no row: it holds what the one below does
            cumulative = by_bound.get(bound, (cumulative, 0.0))[0]
            buckets.append((bound, cumulative))
        durations.append(DurationHistogram(kind=kind, status=status, buckets=buckets, count=count, sum_seconds=total))
    return PlatformNumbers(queues=pool.queues,
                           jobs_by_status={s.value: int(by_status.get(s.value) or 0) for s in JobStatus},
                           durations=durations, workers=pool.workers)
