"""`python -m trainyard_workers drain`: the worker finishes its running job, takes no new one, exits 0 —
by a broadcast on Redis, and by a signal found through its pid file on the embedded SQLite broker."""

from __future__ import annotations

import pytest

from trainyard.db import upgrade_schema
from trainyard_web import create_app
from conftest import (
    WorkerProcess,
    authed_client,
    make_settings,
    redis_queue_messages,
    sqlite_queue_messages,
    submit_digits_job,
    wait_for_job,
    wait_until,
)

pytestmark = pytest.mark.slow


@pytest.fixture(params=["redis", "embedded"])
def settings(request, tmp_path):
    if request.param == "redis":
        s = make_settings(tmp_path, database_url=request.getfixturevalue("postgres").create(),
                          broker_url=request.getfixturevalue("redis_broker_url"))
    else:
        s = make_settings(tmp_path)  # SQLite platform database, kombu's SQLAlchemy transport as the broker
    s = s.model_copy(update={"heartbeat_seconds": 0.5})
    upgrade_schema(s.database_url)
    return s


def test_a_drained_worker_finishes_its_job_takes_no_new_one_and_exits(settings, tmp_path, start_worker):
    worker = start_worker(settings)
    client = authed_client(create_app(settings))
    # Long enough to outlast the drain command's start-up.
    running = submit_digits_job(client, epochs=3, batch_size=8)
    wait_until(lambda: client.get(f"/api/v1/jobs/{running}").get_json()["progress"].get("batch", 0) > 0, 240,
               "job never started")
    waiting = submit_digits_job(client, epochs=1, batch_size=64)

    node = next(a for a in worker.process.args if a.startswith("--hostname=")).split("=", 1)[1]
    drain = WorkerProcess(settings, tmp_path / "drain.log", command="drain", extra=("--hostname", node, "--wait"))
    wait_until(lambda: "trainyard drain: draining test-" in drain.log() or drain.process.poll() is not None, 120,
               "drain never reached the worker")
    assert client.get(f"/api/v1/jobs/{running}").get_json()["status"] == "RUNNING", "drained too late to tell"
    assert drain.process.wait(timeout=300) == 0, drain.log()
    drain.stop()
    assert drain.log().rstrip().endswith("trainyard drain: drained")
    assert worker.process.wait(timeout=60) == 0, worker.log()[-3000:]
    assert f"draining: taking no new job from {settings.queue}" in worker.log()

    finished = wait_for_job(client, running, {"SUCCEEDED", "FAILED", "CANCELLED"}, timeout=5)
    assert finished["status"] == "SUCCEEDED" and finished["attempt"] == 1, finished["error"]
    left = client.get(f"/api/v1/jobs/{waiting}").get_json()
    assert left["status"] == "QUEUED" and left["attempt"] == 0
    # Its message is still on the broker for another worker: on SQLite a delivered message is hidden for
    # good, so a visible one is one no worker has taken.
    if settings.broker_url.startswith("redis://"):
        assert len(redis_queue_messages(settings.broker_url)) == 1
    else:
        assert sqlite_queue_messages(settings.broker_url) == 1


def test_drain_says_so_when_no_worker_answers(settings, tmp_path):
    drain = WorkerProcess(settings, tmp_path / "drain.log", command="drain", extra=("--hostname", "nobody@nowhere",
                                                                                   "--timeout", "1"))
    assert drain.process.wait(timeout=60) == 1
    drain.stop()
    assert "no" in drain.log() and "nobody@nowhere" in drain.log()
