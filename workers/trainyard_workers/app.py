"""The Celery app factory. Tasks are thin: an id in, one engine call."""

from __future__ import annotations

import signal

import psutil
from celery import Celery
from celery.signals import (after_setup_logger, after_setup_task_logger, worker_init, worker_ready,
                            worker_shutdown, worker_shutting_down)

from trainyard.config import Settings
from trainyard.logging_setup import structure_handlers
from trainyard.queueing import RUN_JOB_TASK, celery_config
from trainyard_workers import drain, engine
from trainyard_workers.presence import Presence


def create_celery_app(settings: Settings) -> Celery:
    """A Celery app bound to `settings`, with the platform's tasks registered."""
    app = Celery("trainyard")
    app.conf.update(celery_config(settings))
    # One job at a time per process, and a fresh process per job: a CUDA context or a leaked tensor
    # never outlives the job that made it.
    app.conf.update(worker_concurrency=1, worker_max_tasks_per_child=1)
    app.steps["consumer"].add(drain.DrainStep)  # `python -m trainyard_workers drain`
    context = engine.WorkerContext(settings)

    @app.task(name=RUN_JOB_TASK, ignore_result=True, bind=True)
    def run_job(task, job_id: int) -> None:
        # Set here, not at process start: the pool installs its own SIGTERM handler after that. In a pool
        # process SIGTERM now means "hand the job back", not "die mid-batch".
        signal.signal(signal.SIGTERM, lambda *_: engine.SHUTTING_DOWN.set())
        engine.run_job(context, job_id, worker_name=task.request.hostname)

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
    # Every job runs in a fresh pool process (max_tasks_per_child=1); importing MLflow's model code here,
    # once, in the parent saves each of them seconds of imports. Imports only: MLflow starts no thread and
    # opens no connection on import (checked), and CUDA is not touched, so forking stays safe.
    import mlflow.models  # noqa: F401
    import mlflow.pytorch  # noqa: F401
    import mlflow.tracking  # noqa: F401


@worker_shutting_down.connect
def _tell_pool_processes(**_) -> None:
    # A warm shutdown would wait for the running job to finish, maybe for hours: ask it to hand back now.
    for child in psutil.Process().children():
        try:
            child.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
