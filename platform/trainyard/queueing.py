"""The Celery side both ends share: broker configuration and the dispatcher that sends job ids.

The platform sends tasks by name (`send_task`), so it never imports the workers' code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery import Celery

from trainyard.config import Settings

RUN_JOB_TASK = "training.run_job"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for the client (web, CLI) and the workers alike."""
    if settings.broker_url.startswith("sqla+sqlite:///"):
        # SQLite makes the file but not its folder; without it kombu retries forever, quietly.
        Path(settings.broker_url.removeprefix("sqla+sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "task_default_queue": settings.queue,
        "task_ignore_result": True,
        # A job is acknowledged only once its task returns, so a worker lost mid-job leaves the message
        # to be delivered again; the claim's compare-and-set makes that second delivery harmless.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_connection_retry_on_startup": True,
        # A worker outlives a broker restart: it reconnects for as long as it takes (Celery's default
        # gives up after 100 tries), and the job it is training carries on meanwhile — its lease lives in
        # the database, and its message, if redelivered, finds the job claimed.
        "broker_connection_retry": True,
        "broker_connection_max_retries": None,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_serializer": "json",
        "accept_content": ["json"],
    }
    if settings.broker_url.startswith(("redis://", "rediss://")):
        config["broker_transport_options"] = {
            "queue_order_strategy": "priority",
            "priority_steps": list(range(10)),  # kept as before: changing it would strand queued messages
            "sep": ":",
            # Redis hands an unacknowledged message out again after the visibility timeout. Tied to the lease:
            # a message whose worker died before claiming its job (the database never heard of it) is
            # delivered again about as soon as a claimed job's expired lease is re-queued. Redelivering the
            # message of a job that is still training is harmless — the claim finds the job taken — so the
            # lease, not the broker, still decides when a job is lost.
            "visibility_timeout": 2 * settings.lease_seconds,
            "unacked_restore_interval": min(10.0, max(1.0, settings.lease_seconds / 2)),
            "unacked_restore_throttle": 1,  # look every interval (kombu's default: every tenth)
        }
    # The embedded SQLite broker polls once a second (kombu's default; its SQLAlchemy transport hands every
    # transport option to create_engine, so the interval cannot be tuned): up to 1 s of dispatch latency,
    # which is why real deployments use Redis.
    return config


class CeleryDispatch:
    """Sends `training.run_job(job_id)` to the job's queue; the callable the jobs service takes."""

    def __init__(self, settings: Settings) -> None:
        self.app = Celery("trainyard-client")
        self.app.conf.update(celery_config(settings))

    def __call__(self, job_id: int, queue: str, priority: int) -> None:
        # The claim picks the most urgent waiting job whatever message arrives; the broker's priority (Redis
        # serves 0 first) only has high-priority messages reach the workers sooner.
        self.app.send_task(
            RUN_JOB_TASK, args=[job_id], queue=queue, priority={2: 0, 1: 4}.get(priority, 8),
            retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        )

    def ping(self, timeout: float = 2.0) -> None:
        """Raise if the broker cannot be reached within `timeout` seconds."""
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)

    def close(self) -> None:
        self.app.close()
