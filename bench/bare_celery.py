"""The bare Celery baseline for measures 4 and 6: a trivial task on the same Redis, with the platform's own
broker settings (acks late, prefetch 1, priority queues) and a concurrency-1 prefork worker, but nothing else.

Run a worker with: `celery -A bare_celery worker --queues=bare --concurrency=1` (BENCH_BROKER_URL set).
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

from trainyard.config import Settings
from trainyard.queueing import celery_config

BROKER_URL = os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/15")
QUEUE = "bare"

app = Celery("bench-bare")
app.conf.update(celery_config(Settings(broker_url=BROKER_URL, database_url="sqlite://", queue=QUEUE)))
app.conf.update(worker_concurrency=1)

_redis: redis.Redis | None = None


def _client() -> redis.Redis:
    global _redis  # one connection per (forked) process, made on first use
    if _redis is None:
        _redis = redis.Redis.from_url(BROKER_URL)
    return _redis


@app.task(name="bench.record_start", ignore_result=True)
def record_start(key: str) -> None:
    """First line of the task: write the wall-clock start time where the submitter polls for it."""
    _client().set(key, repr(time.time()), ex=600)


@app.task(name="bench.noop", ignore_result=True)
def noop(counter_key: str) -> None:
    """A no-op that counts itself, so the submitter knows when a batch has drained."""
    _client().incr(counter_key)
