"""Jobs service: submit, claim, heartbeat, progress, finish, fail, cancel — each a guarded state transition.

Every transition is one conditional UPDATE on (status, attempt) that also sets `status_reason`; a trigger
(migration 0007) writes the `job_event` row and the per-queue tallies in the same statement. Two processes
racing for one job can never both win, the history is complete, and a transition costs one round trip.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Connection, Select, bindparam, func, insert, select, update
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.orm import Session

from trainyard.auth import Principal
from trainyard.config import Settings
from trainyard.db import Database
from trainyard.errors import Conflict, Forbidden, NotFound, ServiceUnavailable
from trainyard.models import Job, JobEvent, JobStatus, to_view, utcnow
from trainyard.spec_checks import checked_spec, default_name
from trainyard.specs import PRIORITY_LEVELS, PRIORITY_NAMES, JobSpec, dispatch_queue
from trainyard.statements import Statement

log = logging.getLogger(__name__)

# (job id, broker queue, priority 0 low – 2 high) → message on the broker. Called only after the job's row is
# committed.
Dispatch = Callable[[int, str, int], None]


@dataclass(frozen=True)
class JobEventView:
    at: datetime
    from_status: str | None
    to_status: str
    attempt: int
    message: str


@dataclass(frozen=True)
class JobView:
    id: int
    kind: str
    name: str
    status: str
    dataset: str
    architecture: str
    spec: dict[str, Any]
    queue: str
    priority: str  # low, normal, high
    attempt: int
    max_attempts: int
    lease_owner: str | None
    lease_expires_at: datetime | None
    cancel_requested: bool
    progress: dict[str, Any]
    metrics: dict[str, Any]
    mlflow_run_id: str | None
    checkpoint_path: str | None
    checkpoint_sha256: str | None
    checkpoint_epoch: int | None
    model_name: str | None
    model_version: int | None
    owner: str | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    sweep_id: int | None  # a sweep's trial: its sweep and trial number
    trial: int | None
    events: list[JobEventView] = field(default_factory=list)


@dataclass(frozen=True)
class JobPage:
    items: list[JobView]
    next_before: int | None  # pass as `before` for the next (older) page; None on the last page


def job_view(row: Any, events: Sequence[Any] = ()) -> JobView:
    """The view of a job row (ORM object or Core row) and its event rows."""
    return to_view(JobView, row, events=[to_view(JobEventView, e) for e in events],
                   priority=PRIORITY_NAMES.get(row.priority, "normal"))


def transition(
    s: Session,
    job_id: int,
    *,
    from_status: JobStatus,
    to_status: JobStatus,
    attempt: int,
    message: str,
    values: dict[str, Any] | None = None,
    also: Sequence[Any] = (),
) -> bool:
    """Move the job from (from_status, attempt) to to_status, `message` going into its history (by the
    trigger); False if it had moved on. `also` adds conditions to the compare-and-set (e.g. "the lease is
    still expired"). One statement: safe in a `read_scope()` session."""
    result = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == from_status, Job.attempt == attempt, *also)
        .values(status=to_status, status_reason=message, updated_at=utcnow(), **(values or {}))
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def submit_job(db: Database, spec: JobSpec, dispatch: Dispatch, *, settings: Settings,
               owner: str | None = None) -> JobView:
    """Check the spec, store a QUEUED job (its first event and tally by trigger, in the same statement), then
    send its id to the broker. The answer comes from the INSERT's RETURNING, not from a re-read."""
    spec = checked_spec(db, spec, settings)
    message = f"submitted by {owner}" if owner else "submitted"
    with db.connection() as conn:
        row = insert_job(conn, spec, owner=owner, message=message)
    submitted = job_view(row, [JobEventView(at=row.created_at, from_status=None, to_status=JobStatus.QUEUED,
                                            attempt=0, message=message)])
    try:
        dispatch(submitted.id, submitted.queue, row.priority)
    except Exception as exc:  # the broker is down or refused: say so rather than leave a job that never runs
        reason = f"could not enqueue: {type(exc).__name__}: {exc}"
        with db.read_scope() as s:
            transition(
                s, submitted.id, from_status=JobStatus.QUEUED, to_status=JobStatus.FAILED, attempt=0,
                message=reason, values={"error": reason, "finished_at": utcnow()},
            )
        raise ServiceUnavailable(f"Job {submitted.id} was recorded but the broker did not accept it ({exc}).") from exc
    return submitted


def insert_job(conn: Connection, spec: JobSpec, *, owner: str | None, message: str, sweep_id: int | None = None,
               trial: int | None = None) -> Any:
    """Insert a QUEUED job for a checked spec on `conn` (in the caller's transaction, if it has one); its row.
    Nothing is dispatched: the caller sends the message once the row is committed."""
    return _INSERT_JOB.first(
        conn,
        kind=spec.kind,
        name=spec.name or default_name(spec),
        reason=message,
        dataset=spec.dataset or f"folder:{Path(spec.path or '').name}",
        architecture=spec.architecture or "",
        spec=spec.model_dump(mode="json"),
        queue=dispatch_queue(spec.resources.queue, spec.resources.gpus),
        priority=PRIORITY_LEVELS[spec.priority],
        max_attempts=spec.max_attempts,
        progress={"epoch": 0, "epochs": spec.params.epochs if spec.kind == "train" else 0},
        owner=owner,
        now=utcnow(),
        sweep_id=sweep_id,
        trial=trial,
    )


def _insert_job():
    """A new QUEUED job, every column given (its first event and tally come from the trigger)."""
    job = Job.__table__
    given = {name: bindparam(name, type_=job.c[name].type) for name in (
        "kind", "name", "dataset", "architecture", "spec", "queue", "priority", "max_attempts", "progress", "owner",
        "sweep_id", "trial")}
    now = bindparam("now", type_=job.c.created_at.type)
    return insert(job).values(**given, status=JobStatus.QUEUED, status_reason=bindparam("reason"), attempt=0,
                              cancel_requested=False, metrics={}, created_at=now, updated_at=now).returning(*job.c)


_INSERT_JOB = Statement("insert_job", _insert_job())
MAX_ID = 2**63 - 1  # ids beyond this cannot exist, and SQLite would raise on them


def get_job(db: Database, job_id: int) -> JobView:
    """The job and its history: two reads, no transaction."""
    if not 0 < job_id <= MAX_ID:
        raise NotFound(f"No job with id {job_id}.")
    # The API's hottest read: one precompiled statement on the driver, its row straight into the view.
    with db.connection() as conn:
        row = _JOB_WITH_EVENTS.first(conn, job_id=job_id)
    if row is None:
        raise NotFound(f"No job with id {job_id}.")
    return job_view(row, [JobEventView(_utc(at), from_status, to_status, attempt, message)
                          for at, from_status, to_status, attempt, message in row.events or ()])


def _job_with_events(dialect: str) -> Select:
    """The job row and, in its `events` column, its history as a JSON array of [at, from, to, attempt,
    message] in order: one round trip instead of two."""
    job, event = Job.__table__, JobEvent.__table__
    fields = (event.c.at, event.c.from_status, event.c.to_status, event.c.attempt, event.c.message)
    if dialect == "postgresql":
        events = select(func.json_agg(aggregate_order_by(func.json_build_array(*fields), event.c.id), type_=JSON))
        events = events.where(event.c.job_id == bindparam("job_id"))
    else:  # SQLite 3.40 has no ORDER BY inside an aggregate: it aggregates an ordered subquery in its order
        ordered = select(*fields).where(event.c.job_id == bindparam("job_id")).order_by(event.c.id).subquery()
        events = select(func.json_group_array(func.json_array(*ordered.c), type_=JSON))
    return select(*job.c, events.scalar_subquery().label("events")).where(job.c.id == bindparam("job_id"))


def _utc(text: str) -> datetime:
    """An event time from the JSON history (PostgreSQL writes an offset, SQLite stores UTC without one)."""
    at = datetime.fromisoformat(text)
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


_JOB_WITH_EVENTS = Statement("job_with_events", _job_with_events)


def list_jobs(
    db: Database, *, statuses: Sequence[str] = (), limit: int = 50, before: int | None = None,
    dataset: str | None = None, architecture: str | None = None, ids: Sequence[int] = (), sweep: int | None = None,
) -> JobPage:
    """Newest first; keyset pagination on id so a page costs the same at 1,000 or 1,000,000 jobs.

    The page's ids come first, from one index (status, dataset or architecture, then id) read backwards with
    nothing but ids: asked for whole rows, PostgreSQL may walk the primary key instead, filtering every row
    it passes, which costs the whole backlog when the matches are old. Several statuses are read one index
    range each and merged: `status IN (...) ORDER BY id` would sort every match."""
    job = Job.__table__
    ids_query = select(job.c.id).order_by(job.c.id.desc()).limit(limit + 1)
    if dataset:
        ids_query = ids_query.where(job.c.dataset == dataset)
    if architecture:
        ids_query = ids_query.where(job.c.architecture == architecture)
    if sweep is not None:
        ids_query = ids_query.where(job.c.sweep_id == sweep)
    if ids:
        ids_query = ids_query.where(job.c.id.in_([i for i in ids if 0 < i <= MAX_ID]))
    if before is not None:
        ids_query = ids_query.where(job.c.id < before)
    rows_of = select(*job.c).order_by(job.c.id.desc())
    with db.read_scope() as s:
        if len(set(statuses)) > 1:
            page_ids = sorted((i for status in set(statuses)
                               for i in s.scalars(ids_query.where(job.c.status == status))), reverse=True)[:limit + 1]
            rows = s.execute(rows_of.where(job.c.id.in_(page_ids))).all() if page_ids else []
        else:
            if statuses:
                ids_query = ids_query.where(job.c.status == statuses[0])
            rows = s.execute(rows_of.where(job.c.id.in_(ids_query.scalar_subquery()))).all()
    items = [job_view(r) for r in rows[:limit]]
    return JobPage(items, items[-1].id if len(rows) > limit else None)


def retry_job(db: Database, job_id: int, dispatch: Dispatch, *, actor: Principal | None = None) -> JobView:
    """Queue a FAILED or CANCELLED job again as a new attempt; it resumes from its last checkpoint.

    With an `actor`, only the job's owner or an admin may retry it."""
    get_job(db, job_id)  # 404 for an id that cannot exist
    with db.read_scope() as s:
        row = s.get(Job, job_id)
        if row is None:
            raise NotFound(f"No job with id {job_id}.")
        _check_owner(actor, row, "retry")
        status = JobStatus(row.status)
        if status not in (JobStatus.FAILED, JobStatus.CANCELLED):
            raise Conflict(f"Job {job_id} is {status}; only a FAILED or CANCELLED job can be retried.")
        queue, priority = row.queue, row.priority
        done = transition(
            s, job_id, from_status=status, to_status=JobStatus.QUEUED, attempt=row.attempt,
            message="retried" + (f" from the epoch-{row.checkpoint_epoch} checkpoint" if row.checkpoint_epoch else ""),
            values={"error": None, "finished_at": None, "cancel_requested": False,
                    # a retry asked for by a person is one more attempt, whatever the budget said
                    "max_attempts": max(row.max_attempts, row.attempt + 1)},
        )
    if not done:
        raise Conflict(f"Job {job_id} changed while it was being retried; look at it again.")
    if not send_after_commit(dispatch, job_id, queue, priority):
        raise ServiceUnavailable(f"Job {job_id} is QUEUED again but the broker did not take its message; "
                                 "the reconciler will send it again.")
    return get_job(db, job_id)


def send_after_commit(dispatch: Dispatch, job_id: int, queue: str, priority: int) -> bool:
    """Dispatch after commit; False if the broker is away (the reconciler re-sends stale QUEUED jobs)."""
    try:
        dispatch(job_id, queue, priority)
    except Exception:
        log.exception("could not send job %s to the broker; the reconciler will retry", job_id)
        return False
    return True


def request_cancel(db: Database, job_id: int, *, actor: Principal | None = None) -> JobView:
    """Cancel a queued job at once; flag a running one, which stops within a batch of seeing the flag.

    With an `actor`, only the job's owner or an admin may cancel it."""
    get_job(db, job_id)  # 404 for an id that cannot exist
    for _ in range(3):  # the job may move between our read and our write; re-read and decide again
        with db.session_scope() as s:
            row = s.get(Job, job_id)
            if row is None:
                raise NotFound(f"No job with id {job_id}.")
            _check_owner(actor, row, "cancel")
            status = JobStatus(row.status)
            if status.is_terminal:
                raise Conflict(f"Job {job_id} is already {status}; there is nothing to cancel.")
            if status == JobStatus.RUNNING and row.cancel_requested:
                break
            if status == JobStatus.QUEUED:
                done = transition(
                    s, job_id, from_status=status, to_status=JobStatus.CANCELLED, attempt=row.attempt,
                    message="cancelled before it started", values={"finished_at": utcnow()},
                )
            else:
                done = s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.attempt == row.attempt)
                    .values(cancel_requested=True, updated_at=utcnow())
                ).rowcount == 1
                if done:
                    s.add(JobEvent(job_id=job_id, from_status=status, to_status=status, attempt=row.attempt,
                                   message="cancel requested"))
            if done:
                break
    return get_job(db, job_id)


def _check_owner(actor: Principal | None, row: Job, doing: str) -> None:
    if actor is not None and not actor.may_act_for(row.owner):
        whose = f"{row.owner}'s" if row.owner else "a job with no owner"
        raise Forbidden(f"Job {row.id} is {whose}; only its owner or an admin may {doing} it.")
