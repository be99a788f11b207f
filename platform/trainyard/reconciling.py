"""The reconciler's service: jobs whose worker was lost go back to the queue (or fail), and QUEUED jobs
whose message may have been lost are sent again. Run by `python -m trainyard_workers reconciler`."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select, update

from trainyard.db import Database
from trainyard.jobs import Dispatch, send_after_commit, transition
from trainyard.models import Job, JobStatus, utcnow


def requeue_lost_jobs(db: Database, dispatch: Dispatch, now: datetime | None = None,
                      resend_after: timedelta = timedelta(minutes=5)) -> list[int]:
    """Jobs RUNNING on an expired lease lost their worker: re-queue them to resume from their last
    checkpoint, or fail them once max_attempts are used (a cancel requested meanwhile is honoured).
    QUEUED jobs untouched for `resend_after` get their message sent again, in case it was lost (a second
    delivery is harmless: the claim is a compare-and-set). Returns the ids sent."""
    now = now or utcnow()
    with db.session_scope() as s:
        lost = s.execute(
            select(Job.id, Job.attempt, Job.max_attempts, Job.lease_owner, Job.cancel_requested)
            .where(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now)
            .order_by(Job.id)
        ).all()
    for job_id, attempt, max_attempts, owner, cancel in lost:
        cleared = {"lease_owner": None, "lease_expires_at": None}
        why = f"lease expired (worker {owner} lost)"
        # The lease must still be expired when the update lands: a late heartbeat wins over us.
        still_lost = [Job.lease_expires_at < now]
        with db.session_scope() as s:
            if cancel:
                transition(s, job_id, from_status=JobStatus.RUNNING, to_status=JobStatus.CANCELLED, attempt=attempt,
                            message=f"{why}; cancelled as requested", values={**cleared, "finished_at": now},
                            also=still_lost)
            elif attempt >= max_attempts:
                error = f"{why} on attempt {attempt} of {max_attempts}; not retried"
                transition(s, job_id, from_status=JobStatus.RUNNING, to_status=JobStatus.FAILED, attempt=attempt,
                            message=error, values={**cleared, "finished_at": now, "error": error}, also=still_lost)
            else:
                transition(s, job_id, from_status=JobStatus.RUNNING, to_status=JobStatus.QUEUED, attempt=attempt,
                            message=f"{why}; re-queued to resume from its last checkpoint", values=cleared,
                            also=[*still_lost, Job.cancel_requested.is_(False)])
    with db.session_scope() as s:
        # Just re-queued jobs (updated now) and long-silent QUEUED ones: (re)send, and note when.
        due = s.execute(
            select(Job.id, Job.queue, Job.priority)
            .where(Job.status == JobStatus.QUEUED, Job.updated_at < now - resend_after)
            .order_by(Job.id)
        ).all()
        fresh = s.execute(
            select(Job.id, Job.queue, Job.priority)
            .where(Job.status == JobStatus.QUEUED, Job.id.in_([job_id for job_id, *_ in lost]))
        ).all()
        rows = {r[0]: r for r in [*fresh, *due]}
        if due:
            s.execute(update(Job).where(Job.id.in_([r[0] for r in due])).values(updated_at=now))
    return [job_id for job_id, queue, priority in rows.values() if send_after_commit(dispatch, job_id, queue, priority)]
