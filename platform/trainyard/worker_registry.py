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
        s.merge(row)


UNCHANGED = object()


def heartbeat(db: Database, name: str, *, current_job: int | None | object = UNCHANGED) -> bool:
    """Say the worker is alive (and, if given, what it runs now); False if it was never registered."""
    values: dict = {"last_seen": utcnow(), "stopped_at": None}
    if current_job is not UNCHANGED:
        values["current_job"] = current_job
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


def why_queued(db: Database, job_id: int, *, stale_after_seconds: float) -> str:
    """Why a QUEUED job has not started: its place in its queue, and whether any live worker serves it."""
    with db.session_scope() as s:
        job = s.get(Job, job_id)
        if job is None or job.status != JobStatus.QUEUED:
            return ""
        ahead = s.scalar(select(func.count()).select_from(Job).where(
            Job.status == JobStatus.QUEUED, Job.queue == job.queue, Job.id != job.id,
            (Job.priority > job.priority) | ((Job.priority == job.priority) & (Job.id < job.id))))
        queue = job.queue
    serving = next((q.workers for q in pool_status(db, stale_after_seconds=stale_after_seconds).queues
                    if q.name == queue), [])
    place = f"{ahead} job{'s' if ahead != 1 else ''} ahead of it in queue {queue}" if ahead else f"next in queue {queue}"
    if not serving:
        return f"{place}; no live worker serves queue {queue} (start one with `trainyard worker --queues {queue}`)"
    return f"{place}; served by {', '.join(serving)}"
