"""Sweeps end to end on PostgreSQL and Redis with real Celery workers, the sweep driver process and MLflow: a
random sweep that loses its driver and a worker mid-way and still ends with exactly its trials, never more
than max_parallel at once, its best model registered and its runs nested; early stopping on real training."""

from __future__ import annotations

import psutil
import pytest
from mlflow.tracking import MlflowClient

from sqlalchemy import select

from trainyard.db import Database, upgrade_schema
from trainyard.models import Job
from trainyard_web import create_app
from conftest import WorkerProcess, authed_client, make_settings, wait_until

pytestmark = pytest.mark.slow

FINAL = {"SUCCEEDED", "FAILED", "CANCELLED", "PRUNED"}


@pytest.fixture
def platform(tmp_path, postgres, redis_broker_url):
    settings = make_settings(tmp_path, database_url=postgres.create(), broker_url=redis_broker_url).model_copy(
        update={"heartbeat_seconds": 0.5, "lease_seconds": 4.0, "reconcile_seconds": 1.0})
    upgrade_schema(settings.database_url)
    processes: list[WorkerProcess] = []

    def start(name: str, command: str = "worker") -> WorkerProcess:
        process = WorkerProcess(settings, tmp_path / f"{name}.log", command=command)
        processes.append(process)
        return process

    yield settings, authed_client(create_app(settings)), start
    for process in processes:
        process.stop()


def wait_for_sweep(client, sweep_id: int, timeout: float) -> dict:
    return wait_until(lambda: (s := client.get(f"/api/v1/sweeps/{sweep_id}").get_json())["status"] != "RUNNING"
                      and s, timeout, f"sweep {sweep_id} never ended")


def most_at_once(jobs: list[dict]) -> int:
    """The most trials that were queued or running at the same moment (from creation to their end)."""
    edges = sorted([(j["created_at"], 1) for j in jobs] + [(j["finished_at"], -1) for j in jobs])
    level = peak = 0
    for _, step in edges:
        level += step
        peak = max(peak, level)
    return peak


def worker_running(workers: list[WorkerProcess], settings, job_id: int) -> WorkerProcess:
    """The worker whose pool process holds the job's lease (its owner is "<host>:<pid>")."""
    db = Database(settings.database_url)
    try:
        with db.read_scope() as s:
            owner = s.scalar(select(Job.lease_owner).where(Job.id == job_id))
    finally:
        db.dispose()
    pid = int(owner.rsplit(":", 1)[1])
    return next(w for w in workers if pid in {p.pid for p in psutil.Process(w.process.pid).children(recursive=True)})


def test_a_sweep_survives_losing_its_driver_and_a_worker_and_registers_its_best(platform):
    settings, client, start = platform
    workers = [start(f"worker-{i}") for i in range(3)]
    for worker in workers:
        worker.wait_ready()
    start("reconciler", command="reconciler")
    driver = start("sweeper", command="sweeper")
    response = client.post("/api/v1/sweeps", json={
        "name": "digits lr", "algorithm": "random", "seed": 7, "max_trials": 6, "max_parallel": 2,
        "model_name": "digits-sweep", "objective": {"metric": "val_accuracy"},
        "base": {"dataset": "digits", "architecture": "cnn", "params": {"epochs": 3, "batch_size": 32}},
        "space": {"params.lr": {"type": "loguniform", "low": 1e-3, "high": 3e-2},
                  "params.batch_size": {"type": "choice", "values": [16, 32]}}})
    assert response.status_code == 201, response.get_json()
    sweep_id = response.get_json()["id"]
    assert response.headers["Location"].endswith(f"/api/v1/sweeps/{sweep_id}")

    def trials() -> list[dict]:
        return client.get(f"/api/v1/jobs?sweep={sweep_id}&limit=50").get_json()["items"]

    # Mid-sweep: two trials done and another training past its first epoch. Kill the driver and that worker.
    running = wait_until(lambda: sum(j["status"] in FINAL for j in trials()) >= 2 and next(
        (j for j in trials() if j["status"] == "RUNNING" and (j["checkpoint_epoch"] or 0) >= 1), None),
        300, "the sweep never got half-way")
    driver.kill()
    lost = worker_running(workers, settings, running["id"])
    lost.kill()
    start("sweeper-2", command="sweeper")

    sweep = wait_for_sweep(client, sweep_id, timeout=600)
    assert sweep["status"] == "SUCCEEDED", sweep["status_reason"]
    jobs = trials()
    assert sorted(j["trial"] for j in jobs) == [1, 2, 3, 4, 5, 6] and sweep["trials_started"] == 6
    assert all(j["status"] == "SUCCEEDED" for j in jobs), [(j["trial"], j["status"], j["error"]) for j in jobs]
    resumed = next(j for j in jobs if j["id"] == running["id"])
    assert resumed["attempt"] == 2  # the lost worker's trial resumed elsewhere, like any job
    assert most_at_once(jobs) <= 2
    assert sweep["counts"] == {"SUCCEEDED": 6}

    # The best trial (by its best epoch's val_accuracy) is registered, tagged with its sweep; no other trial is.
    best = max(sweep["trials"], key=lambda t: t["value"])
    assert (sweep["best_trial"], sweep["best_value"]) == (best["number"], best["value"])
    assert (sweep["model_name"], sweep["model_version"]) == ("digits-sweep", 1)
    model = client.get("/api/v1/models/digits-sweep").get_json()
    assert [v["version"] for v in model["versions"]] == [1]
    assert model["versions"][0]["job_id"] == best["job_id"]
    assert sum(j["model_version"] is not None for j in jobs) == 1

    # MLflow: every trial's run nests under the sweep's run (MLflow's parentRunId), which is closed.
    tracking = MlflowClient(settings.mlflow_tracking_uri)
    parent = tracking.get_run(sweep["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    for job in jobs:
        tags = tracking.get_run(job["mlflow_run_id"]).data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id and tags["trainyard.sweep_trial"] == str(job["trial"])


def test_median_early_stopping_stops_a_clearly_worse_trial_on_a_real_worker(platform):
    settings, client, start = platform
    start("worker").wait_ready()
    start("sweeper", command="sweeper")
    # A grid visits its points in an order its seed fixes: with seed 1 the hopeless learning rate comes after
    # the good one has completed, and is compared with it at the end of its first epoch.
    response = client.post("/api/v1/sweeps", json={
        "name": "stop the hopeless", "algorithm": "grid", "seed": 1, "max_trials": 2, "max_parallel": 1,
        "register": "none", "early_stopping": {"type": "median", "min_epochs": 1, "startup_trials": 1},
        "base": {"dataset": "digits", "architecture": "cnn", "params": {"epochs": 4, "batch_size": 32}},
        "space": {"params.lr": {"type": "choice", "values": [3e-3, 1e-8]}}})
    assert response.status_code == 201, response.get_json()
    sweep = wait_for_sweep(client, response.get_json()["id"], timeout=400)
    assert sweep["status"] == "SUCCEEDED", sweep["status_reason"]
    stopped = [t for t in sweep["trials"] if t["status"] == "PRUNED"]
    assert [t["params"]["params.lr"] for t in stopped] == [1e-8], sweep["trials"]
    job = client.get(f"/api/v1/jobs/{stopped[0]['job_id']}").get_json()
    # Stopped early, not failed: it keeps its metrics and its checkpoint, and its run says where it stopped.
    assert job["status"] == "PRUNED" and job["error"] is None
    assert job["checkpoint_epoch"] == 1 and job["metrics"]["pruned_at_epoch"] == 1 and "val_accuracy" in job["metrics"]
    run = MlflowClient(settings.mlflow_tracking_uri).get_run(job["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["trainyard.pruned_at_epoch"] == "1"
    best = next(t for t in sweep["trials"] if t["number"] == sweep["best_trial"])
    assert (best["number"], best["params"]["params.lr"], best["epochs"], best["status"]) == (1, 3e-3, 4, "SUCCEEDED")
