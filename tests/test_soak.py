"""Soak: 20 short jobs on two workers while a thread SIGKILLs a random worker every few seconds and starts a
new one. Every job must end in exactly one final state, no two attempts of a job may overlap, and no
metric step may be logged twice."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from datetime import datetime

import pytest
from mlflow.tracking import MlflowClient

from trainyard.db import upgrade_schema
from trainyard.tracking import JOB_ID_TAG, prepare_tracking_store
from trainyard_web import create_app
from conftest import WorkerProcess, authed_client, make_settings, wait_until

pytestmark = pytest.mark.slow

JOBS = 40  # enough work to outlast three kills and restarts now that a CPU worker keeps its pool process
EPOCHS = 2  # two, so that a resumed job has a checkpoint to resume from and epochs it must not log twice
BATCH_SIZE = 256  # a few steps an epoch: what is soaked is the platform around the jobs, not training
FINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


class Killer(threading.Thread):
    """Every few seconds: SIGKILL a random worker (with its pool child, like a lost machine), start another."""

    def __init__(self, workers: list[WorkerProcess], start: Callable[[], WorkerProcess], rng: random.Random,
                 max_kills: int) -> None:
        super().__init__(name="killer", daemon=True)
        self.workers, self.start_worker, self.rng, self.max_kills = workers, start, rng, max_kills
        self.stopped = threading.Event()
        self.kills = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while self.kills < self.max_kills and not self.stopped.wait(self.rng.uniform(2, 5)):
                index = self.rng.randrange(len(self.workers))
                self.workers[index].kill()
                self.kills += 1
                self.workers[index] = self.start_worker()
        except BaseException as exc:  # surfaced by the test, not lost in a thread
            self.error = exc


def attempt_intervals(events: list[dict]) -> list[tuple[int, datetime, datetime]]:
    """(attempt, started at, ended at) from a job's history; an attempt ends at its first event that
    leaves RUNNING."""
    intervals = []
    for i, event in enumerate(events):
        if event["to_status"] == "RUNNING" and event["from_status"] == "QUEUED":
            end = next((e for e in events[i + 1:] if e["from_status"] == "RUNNING" and e["to_status"] != "RUNNING"),
                       None)
            assert end is not None and end["attempt"] == event["attempt"], events
            intervals.append((event["attempt"], datetime.fromisoformat(event["at"]), datetime.fromisoformat(end["at"])))
    return intervals


def check_history(job: dict) -> None:
    events = job["events"]
    finals = [e for e in events if e["to_status"] in FINAL]
    assert len(finals) == 1 and finals[0] is events[-1], events  # exactly one final state, and nothing after it
    assert job["status"] == "SUCCEEDED" or (job["status"] == "FAILED" and "not retried" in job["error"]), job
    intervals = attempt_intervals(events)
    assert [a for a, _, _ in intervals] == list(range(1, job["attempt"] + 1)), events
    for (_, _, ended), (_, started, _) in zip(intervals, intervals[1:]):
        assert started >= ended, events  # attempt n+1 began only after attempt n had ended


def check_metrics(tracking: MlflowClient, job: dict) -> None:
    runs = tracking.search_runs([tracking.get_run(job["mlflow_run_id"]).info.experiment_id],
                                filter_string=f"tags.`{JOB_ID_TAG}` = '{job['id']}'")
    assert len(runs) == 1, f"job {job['id']} has {len(runs)} MLflow runs"
    for key in runs[0].data.metrics:
        steps = [m.step for m in tracking.get_metric_history(job["mlflow_run_id"], key)]
        assert len(steps) == len(set(steps)), (job["id"], key, sorted(steps))
    if job["status"] == "SUCCEEDED":
        steps = sorted(m.step for m in tracking.get_metric_history(job["mlflow_run_id"], "val_accuracy"))
        assert steps == list(range(1, EPOCHS + 1)), (job["id"], steps)


def test_jobs_come_through_workers_killed_at_random(tmp_path, postgres, redis_broker_url):
    seed = int(os.environ.get("TRAINYARD_SOAK_SEED", time.time()))
    rng = random.Random(seed)
    settings = make_settings(tmp_path, database_url=postgres.create(), broker_url=redis_broker_url).model_copy(
        # A lease (and so a Redis visibility timeout, twice as long) a little longer than most jobs here: a
        # killed worker's job is re-queued within seconds, and few running jobs see their message again.
        update={"heartbeat_seconds": 0.5, "lease_seconds": 6.0, "reconcile_seconds": 1.0})
    upgrade_schema(settings.database_url)
    prepare_tracking_store(settings)  # before two workers race to create it
    client = authed_client(create_app(settings))
    started: list[WorkerProcess] = []

    def launch(command: str = "worker") -> WorkerProcess:
        process = WorkerProcess(settings, tmp_path / f"{command}-{len(started)}.log", command=command)
        started.append(process)
        return process

    def start() -> WorkerProcess:
        process = launch()
        process.wait_ready(timeout=180)
        return process

    killer = None
    try:
        launch("reconciler")
        workers = [launch(), launch()]
        for worker in workers:  # started together: each takes seconds to import torch and MLflow
            worker.wait_ready(timeout=180)
        ids = [client.post("/api/v1/jobs", json={
            "kind": "train", "dataset": "digits", "architecture": "cnn", "register": False,
            "params": {"epochs": EPOCHS, "batch_size": BATCH_SIZE, "seed": n}}).get_json()["id"] for n in range(JOBS)]
        killer = Killer(workers, start, rng, max_kills=4)
        killer.start()

        def all_final():  # one list request, not twenty: the test must not eat the workers' CPU
            listed = client.get(f"/api/v1/jobs?limit={JOBS}").get_json()["items"]
            return len(listed) == JOBS and all(job["status"] in FINAL for job in listed)

        wait_until(all_final, 240, f"jobs still running after 240 s (seed {seed})", interval=1.0)
        killer.stopped.set()
        killer.join(timeout=200)
        assert killer.error is None, killer.error
    finally:
        if killer is not None:
            killer.stopped.set()
        for process in started:
            process.stop()

    jobs = [client.get(f"/api/v1/jobs/{i}").get_json() for i in ids]
    assert killer.kills >= 3, f"only {killer.kills} workers killed (seed {seed})"
    assert any(job["attempt"] > 1 for job in jobs), f"no job was ever resumed (seed {seed})"
    tracking = MlflowClient(settings.mlflow_tracking_uri)
    for job in jobs:
        check_history(job)
        check_metrics(tracking, job)
