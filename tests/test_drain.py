"""`python -m trainyard_workers drain`: the worker finishes its running job, takes no new one, exits 0 —
by a broadcast on Redis, and by a signal found through its pid file on the embedded SQLite broker."""

from __future__ import annotations

import pytest

from trainyard.db import upgrade_schema
from trainyard_web import create_app
from conftest import WorkerProcess, authed_client, make_settings, redis_queue_messages, wait_for_job, wait_until

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


def submit(client, epochs: int, batch_size: int) -> int:
    response = client.post("/api/v1/jobs", json={"kind": "train", "dataset": "digits", "architecture": "cnn",
                                                 "register": False,
                                                 "params": {"epochs": epochs, "batch_size": batch_size}})
    assert response.status_code == 201, response.get_json()
    return response.get_json()["id"]


def test_a_drained_worker_finishes_its_job_takes_no_new_one_and_exits(settings, tmp_path, start_worker):
    worker = start_worker(settings)
    client = authed_client(create_app(settings))
    running = submit(client, epochs=5, batch_size=8)  # long enough to outlast the drain command's start-up
    wait_until(lambda: client.get(f"/api/v1/jobs/{running}").get_json()["progress"].get("batch", 0) > 0, 240,
               "job never started")
    waiting = submit(client, epochs=1, batch_size=64)

    node = next(a for a in worker.process.args if a.startswith("--hostname=")).split("=", 1)[1]
    drain = WorkerProcess(settings, tmp_path / "drain.log", command="drain", extra=("--hostname", node, "--wait"))
    wait_until(lambda: "trainyard drain: draining test-" in drain.log() or drain.process.poll() is not None, 120,
               "drain never reached the worker")
    assert client.get(f"/api/v1/jobs/{running}").get_json()["status"] == "RUNNING", "drained too late to tell"
    assert drain.process.wait(timeout=300) == 0, drain.log()
    drain.stop()
    assert drain.log().rstrip().endswith("trainyard drain: drained")
    assert worker.process.wait(timeout=60) == 0, worker.log()[-3000:]
    assert "draining: taking no new job from training" in worker.log()

    finished = wait_for_job(client, running, {"SUCCEEDED", "FAILED", "CANCELLED"}, timeout=5)
    assert finished["status"] == "SUCCEEDED" and finished["attempt"] == 1, finished["error"]
    left = client.get(f"/api/v1/jobs/{waiting}").get_json()
    assert left["status"] == "QUEUED" and left["attempt"] == 0
    if settings.broker_url.startswith("redis://"):
        assert len(redis_queue_messages(settings.broker_url)) == 1  # its message is still there for others
        return
    replacement = start_worker(settings)  # the SQLite broker's queue cannot be read here: show another worker takes it
    done = wait_for_job(client, waiting, {"SUCCEEDED", "FAILED", "CANCELLED"}, timeout=240)
    assert done["status"] == "SUCCEEDED", f"{done['error']}\n{replacement.log()[-3000:]}"


def test_drain_says_so_when_no_worker_answers(settings, tmp_path):
    drain = WorkerProcess(settings, tmp_path / "drain.log", command="drain", extra=("--hostname", "nobody@nowhere",
                                                                                   "--timeout", "1"))
    assert drain.process.wait(timeout=60) == 1
    drain.stop()
    assert "no" in drain.log() and "nobody@nowhere" in drain.log()
