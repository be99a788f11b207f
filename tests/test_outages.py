"""Outages of the parts around a worker: the database goes away mid-job, Redis restarts under queued and
running jobs, and a message arrives twice. Real worker processes, real PostgreSQL and Redis."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from mlflow.tracking import MlflowClient

from trainyard.db import upgrade_schema
from trainyard.queueing import CeleryDispatch
from trainyard.tracking import JOB_ID_TAG
from trainyard_web import create_app
from conftest import (
    POSTGRES_ADMIN_URL,
    WorkerProcess,
    authed_client,
    make_settings,
    redis_queue_messages,
    submit_digits_job,
    wait_for_job,
    wait_until,
)
from tcp_proxy import TcpProxy

pytestmark = pytest.mark.slow

FINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


def progress(client, job_id: int) -> dict:
    return client.get(f"/api/v1/jobs/{job_id}").get_json()["progress"]


def transitions(job: dict) -> list[tuple]:
    return [(e["from_status"], e["to_status"], e["attempt"]) for e in job["events"]]


def epoch_steps(settings, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(settings.mlflow_tracking_uri).get_metric_history(run_id, key))


@pytest.fixture
def processes(tmp_path):
    started: list[WorkerProcess] = []

    def start(settings, name: str, command: str = "worker", wait: bool = True) -> WorkerProcess:
        process = WorkerProcess(settings, tmp_path / f"{name}.log", command=command)
        started.append(process)
        if command == "worker" and wait:
            process.wait_ready()
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def postgres_proxy():
    admin = urlsplit(POSTGRES_ADMIN_URL)
    proxy = TcpProxy(admin.hostname or "127.0.0.1", admin.port or 5432)
    yield proxy
    proxy.close()


def test_a_database_outage_mid_job_delays_it_but_never_fails_it(tmp_path, postgres, redis_broker_url,
                                                                  postgres_proxy, processes):
    direct = postgres.create()
    upgrade_schema(direct)
    # A lease that outlives the outage: the job must come through on its first attempt.
    settings = make_settings(tmp_path, database_url=direct, broker_url=redis_broker_url).model_copy(
        update={"heartbeat_seconds": 0.5, "lease_seconds": 20.0, "reconcile_seconds": 1.0})
    port = urlsplit(direct).port or 5432
    through_proxy = settings.model_copy(
        update={"database_url": direct.replace(f":{port}/", f":{postgres_proxy.port}/", 1)})
    processes(settings, "reconciler", command="reconciler")  # would re-queue the job if its lease lapsed
    worker = processes(through_proxy, "worker")  # only the worker's database goes away
    client = authed_client(create_app(settings))

    job_id = submit_digits_job(client, epochs=4, batch_size=16)
    wait_until(lambda: progress(client, job_id).get("epoch", 0) >= 1, 240, "job never finished an epoch")
    postgres_proxy.cut()
    try:
        # The outage lasts until the worker has felt it twice: the lease heartbeat, and an epoch's bookkeeping
        # (its checkpoint written, the database away) that must wait it out rather than fail the job.
        wait_until(lambda: all(f"database unreachable during {call}" in worker.log()
                               for call in ("record_progress", "renew_lease")), 120,
                   "the worker never felt the outage", interval=0.2)
    finally:
        postgres_proxy.restore()

    job = wait_for_job(client, job_id, FINAL, timeout=240)
    assert job["status"] == "SUCCEEDED" and job["attempt"] == 1, f"{job['error']}\n{worker.log()[-4000:]}"
    assert transitions(job) == [(None, "QUEUED", 0), ("QUEUED", "RUNNING", 1), ("RUNNING", "SUCCEEDED", 1)]
    assert postgres_proxy.refused > 0
    for key in ("train_loss", "val_accuracy"):
        assert epoch_steps(settings, job["mlflow_run_id"], key) == [1, 2, 3, 4]


def test_queued_and_running_jobs_survive_a_redis_restart(tmp_path, postgres, private_redis, processes):
    settings = make_settings(tmp_path, database_url=postgres.create(), broker_url=private_redis.url).model_copy(
        update={"heartbeat_seconds": 0.5})
    upgrade_schema(settings.database_url)
    worker = processes(settings, "worker")
    client = authed_client(create_app(settings))

    running = submit_digits_job(client, epochs=3, batch_size=8)
    wait_until(lambda: progress(client, running).get("batch", 0) > 0, 240, "first job never started")
    queued = [submit_digits_job(client, epochs=1, batch_size=64) for _ in range(2)]
    assert len(redis_queue_messages(private_redis.url)) == 2  # waiting on the broker, not in the worker
    private_redis.restart()  # SIGTERM and start again on the same append-only file

    for job_id in [running, *queued]:
        job = wait_for_job(client, job_id, FINAL, timeout=240)
        assert job["status"] == "SUCCEEDED" and job["attempt"] == 1, f"{job_id}: {job['error']}"
    assert "Connection to broker lost" in worker.log()  # the worker did see Redis go, and came back


def test_a_message_delivered_again_while_its_job_runs_trains_it_once(tmp_path, postgres, redis_broker_url,
                                                                      processes):
    settings = make_settings(tmp_path, database_url=postgres.create(), broker_url=redis_broker_url).model_copy(
        update={"heartbeat_seconds": 0.5})
    upgrade_schema(settings.database_url)
    workers = [processes(settings, "worker-a", wait=False), processes(settings, "worker-b", wait=False)]
    for worker in workers:  # started side by side: each takes seconds to import torch and MLflow
        worker.wait_ready()
    client = authed_client(create_app(settings))

    job_id = submit_digits_job(client, epochs=3, batch_size=8)
    wait_until(lambda: progress(client, job_id).get("batch", 0) > 0, 240, "job never started")
    dispatch = CeleryDispatch(settings)
    dispatch(job_id, "cpu", 1)  # the same message again, e.g. redelivered after a broker hiccup
    dispatch.close()
    skipped = f"message for job {job_id}: nothing claimable"
    wait_until(lambda: any(skipped in w.log() for w in workers), 60, "the second delivery never arrived")
    assert client.get(f"/api/v1/jobs/{job_id}").get_json()["status"] == "RUNNING"  # it came while training

    job = wait_for_job(client, job_id, FINAL, timeout=240)
    assert job["status"] == "SUCCEEDED" and job["attempt"] == 1, job["error"]
    assert transitions(job) == [(None, "QUEUED", 0), ("QUEUED", "RUNNING", 1), ("RUNNING", "SUCCEEDED", 1)]
    tracking = MlflowClient(settings.mlflow_tracking_uri)
    experiment_id = tracking.get_run(job["mlflow_run_id"]).info.experiment_id
    assert len(tracking.search_runs([experiment_id], filter_string=f"tags.`{JOB_ID_TAG}` = '{job_id}'")) == 1
    assert epoch_steps(settings, job["mlflow_run_id"], "train_loss") == [1, 2, 3]


def test_the_web_app_answers_503_while_the_database_is_away_and_recovers(tmp_path, postgres, redis_broker_url,
                                                                        postgres_proxy):
    direct = postgres.create()
    upgrade_schema(direct)
    port = urlsplit(direct).port or 5432
    settings = make_settings(tmp_path, database_url=direct.replace(f":{port}/", f":{postgres_proxy.port}/", 1),
                             broker_url=redis_broker_url)
    client = authed_client(create_app(settings))
    assert client.get("/api/v1/jobs").status_code == 200
    postgres_proxy.cut()
    try:
        away = client.get("/api/v1/jobs")
        assert away.status_code == 503 and away.headers["Retry-After"] == "5"
        assert away.get_json()["title"] == "Database unreachable"
        assert client.get("/api/v1/health").get_json()["checks"]["database"]["ok"] is False
    finally:
        postgres_proxy.restore()
    wait_until(lambda: client.get("/api/v1/jobs").status_code == 200, 30, "the web app did not recover")
    assert client.post("/api/v1/jobs", json={"kind": "train", "dataset": "digits", "architecture": "cnn"}).status_code == 201
