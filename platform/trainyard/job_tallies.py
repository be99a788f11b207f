"""The job tallies (jobs per queue and status; finished attempts' durations), which the triggers of migration
0007 keep on every insert, status change and delete of a job. `recount` rebuilds them from the job rows: after
rows were loaded with triggers off (a bulk import), or to check them."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, func, select, text

from trainyard.db import Database
from trainyard.models import INF_BOUND, TALLY_SHARDS, Job, JobDurationTally, JobTally
from trainyard.platform_metrics import DURATION_BUCKETS


@dataclass(frozen=True)
class TallyCheck:
    counted: dict[tuple[str, str], int]  # (queue, status) → jobs, counted now from the rows
    kept: dict[tuple[str, str], int]  # the same, as the tally says (zero rows left out)

    @property
    def consistent(self) -> bool:
        return self.counted == self.kept


def check(db: Database) -> TallyCheck:
    """Count the jobs per (queue, status) and compare with the tally (reads every job: an operator's tool)."""
    with db.read_scope() as s:
        counted = {(q, st): n for q, st, n in s.execute(
            select(Job.queue, Job.status, func.count()).group_by(Job.queue, Job.status))}
        kept = {(q, st): int(n) for q, st, n in s.execute(select(JobTally.queue, JobTally.status, func.sum(JobTally.n))
                                                      .group_by(JobTally.queue, JobTally.status)) if n}
    return TallyCheck(counted=counted, kept=kept)


def recount(db: Database) -> TallyCheck:
    """Rebuild both tallies from the job rows in one transaction; returns the check after."""
    seconds = ("EXTRACT(EPOCH FROM j.finished_at - j.started_at)::float8" if db.dialect == "postgresql"
               else "(julianday(j.finished_at) - julianday(j.started_at)) * 86400.0")
    bounds = " UNION ALL ".join(f"SELECT {b!r} AS le" for b in (*DURATION_BUCKETS, INF_BOUND))
    with db.session_scope() as s:
        if db.dialect == "postgresql":  # transitions wait while the tallies are rebuilt, rather than be lost
            s.execute(text("LOCK TABLE job_tally, job_duration_tally IN EXCLUSIVE MODE"))
        s.execute(delete(JobTally))
        s.execute(delete(JobDurationTally))
        s.execute(text(f"INSERT INTO job_tally (queue, status, shard, n) SELECT queue, status, id % {TALLY_SHARDS}, "
                       f"count(*) FROM job GROUP BY queue, status, id % {TALLY_SHARDS}"))
        s.execute(text(
            f"INSERT INTO job_duration_tally (kind, status, le, n, sum_seconds) "
            f"SELECT j.kind, j.status, b.le, count(*), sum({seconds}) FROM job AS j, ({bounds}) AS b "
            f"WHERE j.status IN ('SUCCEEDED', 'FAILED', 'CANCELLED') AND j.started_at IS NOT NULL "
            f"AND j.finished_at IS NOT NULL AND b.le >= {seconds} GROUP BY j.kind, j.status, b.le"))
    return check(db)
