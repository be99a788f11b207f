"""The Celery app factory. Tasks are thin: an id in, one engine call."""

from __future__ import annotations

import gc
import logging
import os
import signal

import psutil
import torch
from celery import Celery
from celery.signals import (after_setup_logger, after_setup_task_logger, worker_init, worker_process_init,
                            worker_ready, worker_shutdown, worker_shutting_down)

from trainyard.config import Settings
from trainyard.logging_setup import structure_handlers
from trainyard.queueing import RUN_JOB_TASK, celery_config
from trainyard_workers import drain, engine, gpu_stats
from trainyard_workers.presence import Presence

log = logging.getLogger(__name__)
CPU_JOBS_PER_PROCESS = 1000


def jobs_per_process(settings: Settings) -> int:
    """How many jobs one pool process runs before a fresh one replaces it.

    On a GPU worker, one: the CUDA context, the caching allocator's memory and any tensor a job leaked go
    with the process. Replacing a process costs 1-5 s (billiard's exiting child sleeps a second, the parent
    starts the next on its pool-maintenance tick), nothing next to a GPU job, but it dominated short CPU jobs
    (25 ms a no-op job when it came every 100), so a CPU worker keeps its process warm, with its imports,
    compile caches and database connections: it is renewed when a job leaves it holding too much memory
    (`max_memory_kib`), and after 1,000 jobs at the latest.
    """
    if settings.jobs_per_process:
        return settings.jobs_per_process
    return 1 if uses_gpus(settings) else CPU_JOBS_PER_PROCESS


def max_memory_kib(settings: Settings) -> int | None:
    """Celery's worker_max_memory_per_child: a CPU worker's process is replaced after a job that leaves its
    resident memory above TRAINYARD_WORKER_MAX_MEMORY_MB (what a large job's data and allocator caches keep);
    None on a GPU worker (its process is replaced after every job) or when set to 0."""
    if settings.worker_max_memory_mb == 0 or jobs_per_process(settings) == 1:
        return None
    return settings.worker_max_memory_mb * 1024


def uses_gpus(settings: Settings) -> bool:
    """Whether this worker's jobs can see a GPU, read without initialising CUDA (the parent forks)."""
    from trainyard.gpus import discover_gpus

    if "CUDA_VISIBLE_DEVICES" in os.environ:  # pinned (the pool does it), or "" / "-1": every GPU hidden
        return bool(gpu_stats.pinned_devices())
    return bool(discover_gpus(settings.simulated_gpus))


def create_celery_app(settings: Settings) -> Celery:
    """A Celery app bound to `settings`, with the platform's tasks registered."""
    app = Celery("trainyard")
    app.conf.update(celery_config(settings))
    # One job at a time per process; see jobs_per_process for how long a process lives.
    app.conf.update(worker_concurrency=1, worker_max_tasks_per_child=jobs_per_process(settings),
                    worker_max_memory_per_child=max_memory_kib(settings))
    app.steps["consumer"].add(drain.DrainStep)  # `python -m trainyard_workers drain`
    context = engine.WorkerContext(settings)

    @app.task(name=RUN_JOB_TASK, ignore_result=True, bind=True)
    def run_job(task, job_id: int) -> None:
        # Set here, not at process start: the pool installs its own SIGTERM handler after that. In a pool
        # process SIGTERM now means "hand the job back", not "die mid-batch".
        signal.signal(signal.SIGTERM, lambda *_: engine.SHUTTING_DOWN.set())
        threads = torch.get_num_threads()
        try:
            engine.run_job(context, job_id, worker_name=task.request.hostname)
        finally:
            # A process may run the next job too: leave it as the job found it, its cycles freed. What is
            # still alive after that (modules the job imported, caches) stays: freezing it keeps the next
            # collection as cheap as this one (a full collection over torch's and MLflow's objects takes
            # half a second).
            torch.set_num_threads(threads)
            gc.collect()
            gc.freeze()

    @worker_process_init.connect(weak=False)
    def _connect_early(**_) -> None:
        # A new pool process opens its database connection now, not when the first message is waiting.
        try:
            with context.db.engine.connect():
                pass
        except Exception:  # the claim retries through an outage; nothing to do here
            log.warning("pool process could not reach the platform database yet", exc_info=True)

    @after_setup_logger.connect(weak=False)
    @after_setup_task_logger.connect(weak=False)
    def _structured_logs(logger=None, **_) -> None:
        # Celery has set up its handlers (root's, and the task logger's own); render them through structlog.
        if logger is not None:
            structure_handlers(logger)

    presence: list[Presence] = []

    @worker_ready.connect(weak=False)
    def _register(sender=None, **_) -> None:
        queues = sorted(q.name for q in sender.task_consumer.queues) if sender.task_consumer else []
        presence.append(Presence(settings, sender.hostname, queues))
        presence[-1].start()

    @worker_shutdown.connect(weak=False)
    def _unregister(**_) -> None:
        for p in presence:
            p.stop()

    return app


@worker_init.connect
def _import_before_forking(**_) -> None:
    # A pool process is forked again and again (after every job on a GPU worker); importing MLflow's model
    # code here, once, in the parent saves each of them seconds of imports. Imports only: MLflow starts no
    # thread and opens no connection on import (checked), and CUDA is not touched, so forking stays safe.
    from trainyard.tracking import quiet_mlflow

    quiet_mlflow()  # before the pool processes fork: they inherit it
    import mlflow.models  # noqa: F401
    import mlflow.pytorch  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  (the embedded store: 1-3 s a fresh process)
    import mlflow.tracking  # noqa: F401

    # Everything imported so far lives as long as the worker: out of the collector's sight, so no pool
    # process pays to traverse it (and its pages stay shared with the parent instead of being copied).
    gc.freeze()


@worker_shutting_down.connect
def _tell_pool_processes(**_) -> None:
    # A warm shutdown would wait for the running job to finish, maybe for hours: ask it to hand back now.
    for child in psutil.Process().children():
        try:
            child.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
