"""The worker pool as the database sees it: who is alive, on what device, serving which queues, running
which job; and, per queue, how many jobs wait and who could take them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Integer, bindparam, func, select, update

from trainyard.db import Database
from trainyard.models import Job, JobStatus, JobTally, Worker, to_view, utcnow
from trainyard.statements import Statement

# A queued job's place is counted up to this many jobs ahead ("1000+"): an exact count would read the backlog.
AHEAD_CAP = 1000
SERVED_BY_SHOWN = 20  # worker names a queued job's wait lists; the message gives the whole count


@dataclass
class WorkerView:
    name: str
    host: str
    device: str
    device_memory_mb: int | None
    queues: list[str]
    current_job: int | None
    started_at: datetime
    last_seen: datetime
    stopped_at: datetime | None
    gpu_utilization: float | None = None  # percent, at the last heartbeat; None on a CPU worker
    gpu_memory_used_mb: int | None = None
    alive: bool = False


@dataclass
class QueueView:
    name: str
    queued: int = 0
    running: int = 0
    workers: list[str] = field(default_factory=list)  # live workers that consume it


@dataclass
class PoolView:
    workers: list[WorkerView]
    queues: list[QueueView]


def register_worker(db: Database, *, name: str, host: str, device: str, queues: Sequence[str],
                    device_memory_mb: int | None = None) -> None:
    """Insert or refresh a worker's row when it starts (a restarted worker keeps its name)."""
    now = utcnow()
    with db.session_scope() as s:
        row = s.get(Worker, name) or Worker(name=name)
        row.host, row.device, row.device_memory_mb, row.queues = host, device, device_memory_mb, list(queues)
        row.current_job, row.started_at, row.last_seen, row.stopped_at = None, now, now, None
        row.gpu_utilization = row.gpu_memory_used_mb = None  # a restarted worker's old readings are stale
        s.merge(row)


UNCHANGED = object()


def heartbeat(db: Database, name: str, *, gpu_utilization: float | None | object = UNCHANGED,
              gpu_memory_used_mb: int | None | object = UNCHANGED) -> bool:
    """Say the worker is alive (and, if given, its GPU's utilisation in percent and memory used); False if it
    was never registered. What it runs is said by `show_current_job`."""
    values: dict = {"last_seen": utcnow(), "stopped_at": None}
    given = {"gpu_utilization": gpu_utilization, "gpu_memory_used_mb": gpu_memory_used_mb}
    values.update({column: value for column, value in given.items() if value is not UNCHANGED})
    with db.read_scope() as s:
        return s.execute(update(Worker).where(Worker.name == name).values(**values)).rowcount == 1


def show_current_job(db: Database, name: str, job_id: int | None) -> bool:
    """A heartbeat that says which job the worker runs now (None: idle); one precompiled statement, since a
    worker sends two per job. False if the worker was never registered."""
    with db.connection() as conn:
        return _SHOW_CURRENT_JOB.rowcount(conn, name=name, job_id=job_id, now=utcnow()) == 1


_SHOW_CURRENT_JOB = Statement("show_current_job", update(Worker.__table__)
                              .where(Worker.__table__.c.name == bindparam("name"))
                              .values(last_seen=bindparam("now", type_=Worker.__table__.c.last_seen.type),
                                      stopped_at=None, current_job=bindparam("job_id", type_=Integer())))


def worker_stopped(db: Database, name: str) -> None:
    with db.read_scope() as s:
        s.execute(update(Worker).where(Worker.name == name).values(stopped_at=utcnow(), current_job=None))


def _workers(db: Database, stale_after_seconds: float) -> list[WorkerView]:
    cutoff = utcnow() - timedelta(seconds=stale_after_seconds)
    # Core rows: a thousand workers as ORM objects, deep-copied into views, cost ~70 ms a read.
    with db.read_scope() as s:
        workers = [to_view(WorkerView, row, alive=False)
                   for row in s.execute(select(*Worker.__table__.c).order_by(Worker.host, Worker.name))]
    for worker in workers:
        worker.alive = worker.stopped_at is None and worker.last_seen >= cutoff
    return workers


def pool_status(db: Database, *, stale_after_seconds: float) -> PoolView:
    """Workers (alive unless stopped or silent for `stale_after_seconds`) and every queue's depth, read from
    the tallies the job triggers keep: the worker rows and one row per (queue, status), whatever the backlog."""
    workers = _workers(db, stale_after_seconds)
    with db.read_scope() as s:
        counts = s.execute(select(JobTally.queue, JobTally.status, func.sum(JobTally.n)).where(
            JobTally.status.in_([JobStatus.QUEUED, JobStatus.RUNNING])).group_by(JobTally.queue, JobTally.status)).all()
    queues: dict[str, QueueView] = {}
    for worker in workers:
        for queue in worker.queues if worker.alive else ():
            queues.setdefault(queue, QueueView(queue)).workers.append(worker.name)
    for queue, status, count in counts:
        count = int(count)  # a sum: PostgreSQL's is a numeric
        if not count and queue not in queues:
            continue  # a queue that once had jobs and has none now, with nobody serving it
        view = queues.setdefault(queue, QueueView(queue))
        if status == JobStatus.QUEUED:
            view.queued = count
        else:
            view.running = count
    return PoolView(workers=workers, queues=sorted(queues.values(), key=lambda q: q.name))


def idle_workers_by_queue(db: Database, *, stale_after_seconds: float) -> dict[str, int]:
    """queue → live workers that serve it and run nothing now."""
    idle: dict[str, int] = {}
    for worker in _workers(db, stale_after_seconds):
        if worker.alive and worker.current_job is None:
            for queue in worker.queues:
                idle[queue] = idle.get(queue, 0) + 1
    return idle


@dataclass(frozen=True)
class QueueWait:
    """Why a QUEUED job has not started."""

    queue: str
    jobs_ahead: int  # waiting in the same queue that start first, counted up to AHEAD_CAP
    served_by: list[str]  # live workers that consume the queue (the first SERVED_BY_SHOWN); empty: nobody will
    message: str
    jobs_ahead_capped: bool = False  # True: at least AHEAD_CAP jobs are ahead


def queue_wait(db: Database, job_id: int, *, stale_after_seconds: float) -> QueueWait | None:
    """Its place in its queue (up to AHEAD_CAP) and who could take it, for a QUEUED job; None for any other."""
    with db.read_scope() as s:
        job = s.execute(select(Job.status, Job.queue, Job.priority).where(Job.id == job_id)).first()
    if job is None or job.status != JobStatus.QUEUED:
        return None
    return place_in_queue(db, job_id, job.queue, job.priority, stale_after_seconds=stale_after_seconds)


def place_in_queue(db: Database, job_id: int, queue: str, priority: int, *, stale_after_seconds: float) -> QueueWait:
    """`queue_wait` for a job known to be waiting in `queue` at `priority`: two reads, whatever the backlog.

    The jobs ahead are two ranges of the claim index (higher priority; same priority and older), each read no
    further than the cap, counted in one statement."""
    waiting = select(Job.id).where(Job.queue == queue, Job.status == JobStatus.QUEUED)

    def capped(query):
        return select(func.count()).select_from(query.limit(AHEAD_CAP).subquery()).scalar_subquery()

    with db.read_scope() as s:
        ahead = s.scalar(select(capped(waiting.where(Job.priority > priority))
                                + capped(waiting.where(Job.priority == priority, Job.id < job_id))))
    ahead = min(ahead, AHEAD_CAP)
    capped_at = ahead >= AHEAD_CAP
    serving = [w.name for w in _workers(db, stale_after_seconds) if w.alive and queue in w.queues]
    count = f"{AHEAD_CAP:,}+ jobs" if capped_at else f"{ahead} job{'s' if ahead != 1 else ''}"
    place = f"{count} ahead of it in queue {queue}" if ahead else f"next in queue {queue}"
    if serving:
        names = ", ".join(serving[:SERVED_BY_SHOWN])
        more = f" and {len(serving) - SERVED_BY_SHOWN} more" if len(serving) > SERVED_BY_SHOWN else ""
        message = f"{place}; served by {names}{more}"
    else:
        message = (f"{place}; no worker serves queue {queue} (start one with `trainyard worker --queues {queue}`, "
                   "or submit to a queue a worker serves)")
    return QueueWait(queue=queue, jobs_ahead=ahead, served_by=serving[:SERVED_BY_SHOWN], message=message,
                     jobs_ahead_capped=capped_at)


def why_queued(db: Database, job_id: int, *, stale_after_seconds: float) -> str:
    """`queue_wait`'s message, or "" for a job that is not QUEUED."""
    wait = queue_wait(db, job_id, stale_after_seconds=stale_after_seconds)
    return wait.message if wait else ""
