"""Platform-database calls that ride out an outage: connection-level errors are retried with exponential
backoff, so a database that is briefly unreachable delays a job's bookkeeping but never fails the job.

Every call retried here is safe to repeat: the job service's writes are conditional updates on
(status, attempt), so a try whose commit landed but whose answer was lost makes the next try a no-op —
which `claim` and `end_attempt` recognise for what it is.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    stop_when_event_set,
    wait_exponential,
)

from trainyard import attempts, jobs, leases
from trainyard.jobs import JobView
from trainyard.models import JobStatus

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long a worker waits for the database before giving up on a write. Longer than any restart or
# failover; beyond it the job is left RUNNING for the reconciler to re-queue once its lease expires.
OUTAGE_PATIENCE_SECONDS = 600.0
MAX_BACKOFF_SECONDS = 10.0


def is_connection_error(exc: BaseException) -> bool:
    """The database could not be reached or dropped the connection (not: the statement was wrong)."""
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def _log_retry(name: str) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        first_line = str(exc).strip().splitlines()[0] if exc and str(exc).strip() else type(exc).__name__
        log.warning("database unreachable during %s (%s); try %d again in %.1f s", name, first_line,
                    state.attempt_number + 1, state.next_action.sleep if state.next_action else 0)
    return before_sleep


def call_db(fn: Callable[..., T], *args: Any, patience: float = OUTAGE_PATIENCE_SECONDS,
            max_backoff: float = MAX_BACKOFF_SECONDS, stopped: threading.Event | None = None, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`, retried on connection-level errors for up to `patience` seconds (or until
    `stopped` is set), waiting 0.25 s, 0.5 s, 1 s, … up to `max_backoff` between tries."""
    stop = stop_after_delay(patience)
    if stopped is not None:
        stop = stop | stop_when_event_set(stopped)
    retrying = Retrying(
        retry=retry_if_exception(is_connection_error),
        wait=wait_exponential(multiplier=0.25, max=max_backoff),
        stop=stop,
        sleep=stopped.wait if stopped is not None else time.sleep,
        before_sleep=_log_retry(getattr(fn, "__name__", repr(fn))),
        reraise=True,
    )
    return retrying(fn, *args, **kwargs)


def claim(db, job_id: int, worker: str, lease_seconds: float, worker_label: str | None = None) -> JobView | None:
    """`leases.claim_job` of the most urgent job in `job_id`'s queue, retried. A try that won but whose answer
    was lost leaves a job RUNNING under this very worker (one process per job), so that job is ours."""
    tries = 0

    def claim_job() -> JobView | None:
        nonlocal tries
        tries += 1
        return leases.claim_job(db, job_id, worker, lease_seconds, most_urgent=True, worker_label=worker_label)

    job = call_db(claim_job)
    if job is None and tries > 1:
        return call_db(leases.job_leased_by, db, worker)
    return job


def end_attempt(end: Callable[..., bool], db, job: JobView, to: JobStatus, *args: Any) -> bool:
    """Run an end transition (`attempts.finish_job`, `fail_job`, `mark_cancelled`), retried; True if the job
    now sits in `to` at this attempt, even when it was an earlier try whose answer got lost that moved it."""
    if call_db(end, db, job.id, job.attempt, *args):
        return True
    current = call_db(jobs.get_job, db, job.id)
    return current.status == to and current.attempt == job.attempt
