"""The reconciler's service: jobs whose worker was lost go back to the queue (or fail), and queues that have
stopped moving while work waits get wake-ups. Run by `python -m trainyard_workers reconciler`.

A broker message is only a wake-up: the claim takes the most urgent job waiting in the message's queue,
whichever job the message names. So the reconciler never re-sends one message per waiting job (a 50,000-job
backlog would flood the broker); it wakes each stalled queue with at most one message per idle worker that
serves it (one, if no registered worker is idle), and at most once per `resend_after`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, select

from trainyard import worker_registry
from trainyard.db import Database
from trainyard.jobs import Dispatch, send_after_commit, transition
from trainyard.models import Job, JobStatus, JobTally, utcnow

LOST_BATCH = 500  # expired leases handled per statement batch: no statement's parameter list grows with them


@dataclass
class WakeUps:
    """When each queue was last woken by the reconciler (in process memory: one reconciler per deployment;
    a second one only doubles a bounded number)."""

    sent_at: dict[str, datetime] = field(default_factory=dict)


@dataclass(frozen=True)
class ReconcileReport:
    requeued: list[int]  # jobs re-queued from lost leases (each got one message)
    failed: list[int]  # jobs out of attempts
    cancelled: list[int]  # lost jobs whose cancel was pending
    woken: dict[str, int]  # queue → wake-up messages sent for stalled queues
    woken_heads: list[int]  # the job each woken queue's messages named (its most urgent waiting job)


def requeue_lost_jobs(db: Database, dispatch: Dispatch, now: datetime | None = None,
                      resend_after: timedelta = timedelta(minutes=5), wakeups: WakeUps | None = None,
                      stale_after_seconds: float = 30.0) -> list[int]:
    """One reconciler pass (see `reconcile`); returns the ids sent: re-queued jobs, then the head job of
    each queue woken up."""
    report = reconcile(db, dispatch, now=now, resend_after=resend_after, wakeups=wakeups,
                       stale_after_seconds=stale_after_seconds)
    return report.requeued + report.woken_heads


def reconcile(db: Database, dispatch: Dispatch, *, now: datetime | None = None,
              resend_after: timedelta = timedelta(minutes=5), wakeups: WakeUps | None = None,
              stale_after_seconds: float = 30.0) -> ReconcileReport:
    """Jobs RUNNING on an expired lease lost their worker: re-queue them to resume from their last checkpoint
    (one message each, once per lease), or fail them once max_attempts are used (a cancel requested meanwhile
    is honoured). Then every queue whose most urgent waiting job has not moved for `resend_after` is woken
    (its messages may have been lost). Cost: the RUNNING jobs with an expired lease, in batches, and one
    index probe per queue — not the backlog."""
    now = now or utcnow()
    requeued, failed, cancelled = [], [], []
    after = 0
    while True:
        with db.read_scope() as s:
            lost = s.execute(
                select(Job.id, Job.attempt, Job.max_attempts, Job.lease_owner, Job.cancel_requested, Job.queue,
                       Job.priority)
                .where(Job.status == JobStatus.RUNNING, Job.id > after, Job.lease_expires_at < now)
                .order_by(Job.id).limit(LOST_BATCH)
            ).all()
            for job_id, attempt, max_attempts, owner, cancel, queue, priority in lost:
                cleared = {"lease_owner": None, "lease_expires_at": None}
                why = f"lease expired (worker {owner} lost)"
                # The lease must still be expired when the update lands: a late heartbeat wins over us.
                still_lost = [Job.lease_expires_at < now]
                if cancel:
                    if transition(s, job_id, from_status=JobStatus.RUNNING, to_status=JobStatus.CANCELLED,
                                  attempt=attempt, message=f"{why}; cancelled as requested",
                                  values={**cleared, "finished_at": now}, also=still_lost):
                        cancelled.append(job_id)
                elif attempt >= max_attempts:
                    error = f"{why} on attempt {attempt} of {max_attempts}; not retried"
                    if transition(s, job_id, from_status=JobStatus.RUNNING, to_status=JobStatus.FAILED,
                                  attempt=attempt, message=error, values={**cleared, "finished_at": now, "error": error},
                                  also=still_lost):
                        failed.append(job_id)
                elif transition(s, job_id, from_status=JobStatus.RUNNING, to_status=JobStatus.QUEUED, attempt=attempt,
                                message=f"{why}; re-queued to resume from its last checkpoint", values=cleared,
                                also=[*still_lost, Job.cancel_requested.is_(False)]):
                    if send_after_commit(dispatch, job_id, queue, priority):
                        requeued.append(job_id)
        if len(lost) < LOST_BATCH:
            break
        after = lost[-1][0]
    woken, heads = _wake_stalled_queues(db, dispatch, now, resend_after, wakeups or WakeUps(), stale_after_seconds,
                                        just_requeued=set(requeued))
    return ReconcileReport(requeued=requeued, failed=failed, cancelled=cancelled, woken=woken, woken_heads=heads)


def _wake_stalled_queues(db: Database, dispatch: Dispatch, now: datetime, resend_after: timedelta,
                         wakeups: WakeUps, stale_after_seconds: float,
                         just_requeued: set[int]) -> tuple[dict[str, int], list[int]]:
    with db.read_scope() as s:
        waiting = s.execute(select(JobTally.queue, func.sum(JobTally.n)).where(JobTally.status == JobStatus.QUEUED)
                            .group_by(JobTally.queue).having(func.sum(JobTally.n) > 0)).all()
        heads = {}
        for queue, n in waiting:
            last = wakeups.sent_at.get(queue)
            if last is not None and now - last < resend_after:
                continue
            head = s.execute(select(Job.id, Job.priority, Job.updated_at)
                             .where(Job.queue == queue, Job.status == JobStatus.QUEUED)
                             .order_by(Job.priority.desc(), Job.id).limit(1)).first()
            # The head of a queue is taken first by any claim: untouched for `resend_after`, nothing in this
            # queue has been claimed since, so its messages may be lost.
            if head is not None and head.updated_at < now - resend_after and head.id not in just_requeued:
                heads[queue] = (head.id, head.priority, int(n))
    if not heads:
        return {}, []
    idle = worker_registry.idle_workers_by_queue(db, stale_after_seconds=stale_after_seconds)
    woken, sent_heads = {}, []
    for queue, (head_id, priority, n) in heads.items():
        count = min(n, max(1, idle.get(queue, 0)))
        sent = sum(send_after_commit(dispatch, head_id, queue, priority) for _ in range(count))
        if sent:
            woken[queue] = sent
            sent_heads.append(head_id)
            wakeups.sent_at[queue] = now
    return woken, sent_heads
