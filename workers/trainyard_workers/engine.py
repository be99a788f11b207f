"""The training engine: claim a job, keep its lease, train it, track it in MLflow, record the outcome."""

from __future__ import annotations

import contextvars
import logging
import os
import socket
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any

import structlog
import torch

from trainyard import attempts, leases, sweep_driver, sweeps, worker_registry
from trainyard.config import Settings
from trainyard.db import Database
from trainyard.jobs import JobView
from trainyard.models import JobStatus
from trainyard.queueing import CeleryDispatch
from trainyard.tracking import JobRun
from trainyard_workers.db_retry import call_db, claim, end_attempt, is_connection_error
from trainyard_workers.evaluation import run_evaluation
from trainyard_workers.job_log import JobLogCapture
from trainyard_workers.loop import StopRequested, TrialPruned
from trainyard_workers.prediction import run_prediction
from trainyard_workers.training import run_training

log = logging.getLogger(__name__)

# Set in a pool process when its worker is shutting down (SIGTERM): the running job stops at the next
# batch and goes back to the queue, to resume elsewhere from its last checkpoint.
SHUTTING_DOWN = threading.Event()


@dataclass
class WorkerContext:
    """What a worker process needs; the database engine is made on first use, after any fork."""

    settings: Settings
    _db: Database | None = field(default=None, repr=False)
    _db_pid: int = field(default=-1, repr=False)
    _dispatch: CeleryDispatch | None = field(default=None, repr=False)

    @property
    def db(self) -> Database:
        # A connection pool must not cross a fork: each process builds its own.
        if self._db is None or self._db_pid != os.getpid():
            # Two threads use it at once (the job's and its lease keeper's): two connections kept per process at
            # most, the budget the README's connection arithmetic counts on.
            self._db = Database(self.settings.database_url, pool_size=2, max_overflow=2)
            self._db_pid = os.getpid()
        return self._db

    @property
    def dispatch(self) -> CeleryDispatch:
        if self._dispatch is None:
            self._dispatch = CeleryDispatch(self.settings)
        return self._dispatch

    @property
    def worker_id(self) -> str:
        # The pid of the process that trains (a prefork child), not of the worker's parent.
        return f"{socket.gethostname()}:{os.getpid()}"


class LeaseKeeper:
    """Renews the job's lease from a background thread and turns a cancel request into a flag.

    The training loop only reads two in-memory flags per batch; the database is touched once per
    heartbeat interval, whatever the batch rate.
    """

    def __init__(self, ctx: WorkerContext, job: JobView, log_capture: JobLogCapture | None = None) -> None:
        self._ctx = ctx
        self._job = job
        self._log_capture = log_capture
        self.progress: dict[str, Any] = dict(job.progress)
        self.cancel_requested = threading.Event()
        self.lease_lost = threading.Event()
        self._stopped = threading.Event()
        # In the job's logging context (job_id, attempt): a new thread would otherwise start with an empty one.
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run,),
                                        name=f"lease-job-{job.id}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopped.set()
        self._thread.join(timeout=10)

    def should_stop(self) -> bool:
        return self.cancel_requested.is_set() or self.lease_lost.is_set() or SHUTTING_DOWN.is_set()

    def _run(self) -> None:
        settings = self._ctx.settings
        while not self._stopped.wait(settings.beat_seconds):
            try:
                # Backing off no further than one beat: once the database is back the lease must be
                # renewed at once, before it runs out.
                state = call_db(
                    leases.renew_lease, self._ctx.db, self._job.id, self._ctx.worker_id, self._job.attempt,
                    settings.lease_seconds, progress=dict(self.progress),
                    patience=settings.lease_seconds, max_backoff=settings.beat_seconds, stopped=self._stopped,
                )
            except Exception:  # a database outage must not kill training; the next beat tries again
                log.exception("heartbeat for job %s failed", self._job.id)
                continue
            if not state.held:
                self.lease_lost.set()
            if state.cancel_requested:
                self.cancel_requested.set()
            if self._log_capture is not None:
                self._log_capture.flush_to_db()


# What each job kind runs once claimed: (ctx, job, lease, run) → (final metrics, final progress).
JOB_KINDS = {"train": run_training, "evaluate": run_evaluation, "predict": run_prediction}


def run_job(ctx: WorkerContext, job_id: int, worker_name: str | None = None) -> None:
    """A message for `job_id`: claim the most urgent job waiting in its queue (usually `job_id` itself) and
    run it to an outcome; with nothing claimable, do nothing."""
    label = f"{worker_name} (pid {os.getpid()})" if worker_name else None
    job = claim(ctx.db, job_id, ctx.worker_id, ctx.settings.lease_seconds, label)
    if job is None:
        log.info("message for job %s: nothing claimable in its queue (taken, finished or cancelled)", job_id)
        return
    structlog.contextvars.bind_contextvars(job_id=job.id, attempt=job.attempt)  # on every log line until it ends
    if job.id != job_id:
        log.info("message for job %s: took job %s, more urgent in queue %s", job_id, job.id, job.queue)
    _show_current_job(ctx, worker_name, job.id)
    try:
        with JobLogCapture(ctx.db, job.id, job.attempt) as capture:
            _run_claimed(ctx, job, capture)
    finally:
        _show_current_job(ctx, worker_name, None)
        structlog.contextvars.unbind_contextvars("job_id", "attempt")


def _show_current_job(ctx: WorkerContext, worker_name: str | None, job_id: int | None) -> None:
    if worker_name:
        try:
            worker_registry.show_current_job(ctx.db, worker_name, job_id)
        except Exception:  # the registry is for people: never let it stop a job
            log.warning("could not record worker %s's current job", worker_name, exc_info=True)


def _run_claimed(ctx: WorkerContext, job: JobView, capture: JobLogCapture) -> None:
    log.info("job %s attempt %s started on %s", job.id, job.attempt, ctx.worker_id)
    if ctx.settings.torch_threads:
        torch.set_num_threads(ctx.settings.torch_threads)
    run: JobRun | None = None
    with LeaseKeeper(ctx, job, capture) as lease:
        try:
            if job.mlflow_run_id:  # a resumed attempt continues its job's run: one value per epoch, one run
                run = JobRun(ctx.settings, job.mlflow_run_id)
                run.reopen()
                run.client.set_tag(run.run_id, "trainyard.attempt", str(job.attempt))
            else:
                run = JobRun.start(ctx.settings, job_id=job.id, name=job.name, spec=job.spec,
                                   tags={"trainyard.attempt": str(job.attempt), "trainyard.kind": job.kind,
                                         **call_db(sweeps.trial_run_tags, ctx.db, job)})
                call_db(attempts.record_run, ctx.db, job.id, job.attempt, run.run_id)
            metrics, progress = JOB_KINDS[job.kind](ctx, job, lease, run)
        except TrialPruned as pruned:
            log.info("job %s: %s", job.id, pruned)
            if end_attempt(attempts.prune_job, ctx.db, job, JobStatus.PRUNED, str(pruned), pruned.metrics,
                           pruned.progress):
                _end_run(run, "FINISHED", {"trainyard.pruned_at_epoch": str(pruned.epoch)})
        except StopRequested:
            if lease.lease_lost.is_set():
                log.warning("job %s: lease lost; leaving the job to its new owner", job.id)
                return
            if lease.cancel_requested.is_set():
                if end_attempt(attempts.mark_cancelled, ctx.db, job, JobStatus.CANCELLED):
                    _end_run(run, "KILLED")
                return
            log.info("job %s: worker stopping; back to the queue to resume from its last checkpoint", job.id)
            call_db(attempts.release_job, ctx.db, job.id, job.attempt, f"worker {ctx.worker_id} stopped; re-queued",
                    ctx.dispatch)
        except Exception as exc:
            if is_connection_error(exc):
                # Not the job's fault: leave it RUNNING; once its lease runs out the reconciler re-queues
                # it to resume from its last checkpoint.
                log.error("job %s: the database stayed unreachable; leaving the job to the reconciler", job.id)
                return
            log.exception("job %s failed", job.id)
            # Only the attempt that still owns the job may close the run it shares with later attempts.
            error = f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}"
            if end_attempt(attempts.fail_job, ctx.db, job, JobStatus.FAILED, error):
                _end_run(run, "FAILED")
        else:
            if end_attempt(attempts.finish_job, ctx.db, job, JobStatus.SUCCEEDED, metrics, progress):
                _end_run(run, "FINISHED")
    _next_trials(ctx, job)


def _next_trials(ctx: WorkerContext, job: JobView) -> None:
    """A sweep's trial ended here: start the sweep's next trials now rather than at its driver's next pass."""
    if job.sweep_id is None:
        return
    try:
        sweep_driver.after_trial(ctx.db, ctx.dispatch, ctx.settings, job.sweep_id)
    except Exception:  # the driver's next pass does it
        log.warning("job %s: could not start sweep %s's next trials", job.id, job.sweep_id, exc_info=True)


def _end_run(run: JobRun | None, status: str, tags: dict[str, str] | None = None) -> None:
    if run is not None:
        try:
            for key, value in (tags or {}).items():
                run.client.set_tag(run.run_id, key, value)
            run.end(status)
        except Exception:
            log.exception("could not close MLflow run %s", run.run_id)
