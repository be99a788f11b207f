"""The worker pool as the database sees it: who is alive, on what device, serving which queues, running
which job; and, per queue, how many jobs wait and who could take them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, select, update

from trainyard.db import Database
from trainyard.models import Job, JobStatus, Worker, to_view, utcnow


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


def heartbeat(db: Database, name: str, *, current_job: int | None | object = UNCHANGED,
              gpu_utilization: float | None | object = UNCHANGED,
              gpu_memory_used_mb: int | None | object = UNCHANGED) -> bool:
    """Say the worker is alive (and, if given, what it runs now and its GPU's utilisation in percent and
    memory used); False if it was never registered."""
    values: dict = {"last_seen": utcnow(), "stopped_at": None}
    given = {"current_job": current_job, "gpu_utilization": gpu_utilization, "gpu_memory_used_mb": gpu_memory_used_mb}
    values.update({column: value for column, value in given.items() if value is not UNCHANGED})
    with db.session_scope() as s:
        return s.execute(update(Worker).where(Worker.name == name).values(**values)).rowcount == 1


def worker_stopped(db: Database, name: str) -> None:
    with db.session_scope() as s:
        s.execute(update(Worker).where(Worker.name == name).values(stopped_at=utcnow(), current_job=None))


def pool_status(db: Database, *, stale_after_seconds: float) -> PoolView:
    """Workers (alive unless stopped or silent for `stale_after_seconds`) and every queue's depth."""
    cutoff = utcnow() - timedelta(seconds=stale_after_seconds)
    with db.session_scope() as s:
        workers = [to_view(WorkerView, row, alive=False) for row in s.scalars(select(Worker).order_by(Worker.host, Worker.name))]
        counts = s.execute(select(Job.queue, Job.status, func.count()).where(
            Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING])).group_by(Job.queue, Job.status)).all()
    queues: dict[str, QueueView] = {}
    for worker in workers:
        worker.alive = worker.stopped_at is None and worker.last_seen >= cutoff
        for queue in worker.queues if worker.alive else ():
            queues.setdefault(queue, QueueView(queue)).workers.append(worker.name)
    for queue, status, count in counts:
        view = queues.setdefault(queue, QueueView(queue))
        if status == JobStatus.QUEUED:
            view.queued = count
        else:
            view.running = count
    return PoolView(workers=workers, queues=sorted(queues.values(), key=lambda q: q.name))


@dataclass(frozen=True)
class QueueWait:
    """Why a QUEUED job has not started."""

    queue: str
    jobs_ahead: int  # waiting in the same queue that start first: higher priority, or as high and older
    served_by: list[str]  # live workers that consume the queue; empty: nobody will take the job
    message: str


def queue_wait(db: Database, job_id: int, *, stale_after_seconds: float) -> QueueWait | None:
    """Its place in its queue and who could take it, for a QUEUED job; None for any other."""
    with db.session_scope() as s:
        job = s.get(Job, job_id)
        if job is None or job.status != JobStatus.QUEUED:
            return None
        ahead = s.scalar(select(func.count()).select_from(Job).where(
            Job.status == JobStatus.QUEUED, Job.queue == job.queue, Job.id != job.id,
            (Job.priority > job.priority) | ((Job.priority == job.priority) & (Job.id < job.id))))
        queue = job.queue
    serving = next((q.workers for q in pool_status(db, stale_after_seconds=stale_after_seconds).queues
                    if q.name == queue), [])
    place = f"{ahead} job{'s' if ahead != 1 else ''} ahead of it in queue {queue}" if ahead else f"next in queue {queue}"
    if serving:
        message = f"{place}; served by {', '.join(serving)}"
    else:
        message = (f"{place}; no worker serves queue {queue} (start one with `trainyard worker --queues {queue}`, "
                   "or submit to a queue a worker serves)")
    return QueueWait(queue=queue, jobs_ahead=ahead, served_by=list(serving), message=message)


def why_queued(db: Database, job_id: int, *, stale_after_seconds: float) -> str:
    """`queue_wait`'s message, or "" for a job that is not QUEUED."""
    wait = queue_wait(db, job_id, stale_after_seconds=stale_after_seconds)
    return wait.message if wait else ""
