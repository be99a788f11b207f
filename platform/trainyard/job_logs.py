"""Each job's own log, kept in the platform database so any web process can show it, whichever host ran it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, insert, select

from trainyard.db import Database
from trainyard.models import JobLogLine
from trainyard.statements import Statement

MAX_LINE = 4000


@dataclass(frozen=True)
class LogLine:
    id: int
    attempt: int
    at: datetime
    line: str

    def __str__(self) -> str:
        return f"{self.at:%H:%M:%S} [attempt {self.attempt}] {self.line}"


def append(db: Database, job_id: int, attempt: int, lines: Sequence[tuple[datetime, str]]) -> None:
    if not lines:
        return
    with db.connection() as conn:  # precompiled, the rows batched by the driver: a worker writes this every beat
        _APPEND.executemany(conn, [{"job_id": job_id, "attempt": attempt, "at": at, "line": line[:MAX_LINE]}
                                   for at, line in lines])


_APPEND = Statement("append_log_line", insert(JobLogLine.__table__).values(
    {name: bindparam(name, type_=JobLogLine.__table__.c[name].type) for name in ("job_id", "attempt", "at", "line")}))


def read(db: Database, job_id: int, *, after: int = 0, limit: int = 1000) -> list[LogLine]:
    """Lines after the line id `after`, oldest first (pass the last id seen to follow a log)."""
    with db.read_scope() as s:
        rows = s.execute(select(JobLogLine.id, JobLogLine.attempt, JobLogLine.at, JobLogLine.line)
                         .where(JobLogLine.job_id == job_id, JobLogLine.id > after)
                         .order_by(JobLogLine.id).limit(limit)).all()
    return [LogLine(*row) for row in rows]


def tail(db: Database, job_id: int, lines: int = 50) -> list[LogLine]:
    """The last `lines` lines, oldest first."""
    with db.read_scope() as s:
        rows = s.execute(select(JobLogLine.id, JobLogLine.attempt, JobLogLine.at, JobLogLine.line)
                         .where(JobLogLine.job_id == job_id)
                         .order_by(JobLogLine.id.desc()).limit(lines)).all()
    return [LogLine(*row) for row in reversed(rows)]
