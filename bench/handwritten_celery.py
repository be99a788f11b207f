"""The hand-written worker baseline for measures 4 and 6: Celery with the platform's broker settings (acks
late, prefetch 1, priority queues) and a concurrency-1 prefork worker, whose one task does by hand, per job,
the same database writes and MlflowClient calls as the platform's engine does for a job whose body is a no-op:

1. claim the job row (`UPDATE job ... WHERE id = %s AND status = 'QUEUED' RETURNING ...`, stamping
   `started_at`) and write its RUNNING event, in one statement;
2. create an MLflow run (`MlflowClient.create_run` in the platform's experiment, its id looked up once per
   process) with the platform's tags, and log the spec as its params in one `log_batch`, as the platform does;
3. (the no-op body);
4. mark the run FINISHED (`set_terminated`);
5. write the SUCCEEDED row (with the run id, metrics and progress) and its event, in one statement.

No lease thread, worker registry, job-log capture or process recycling: the platform's extras.

Run a worker with: `celery -A handwritten_celery worker --queues=hw --concurrency=1` (BENCH_BROKER_URL,
BENCH_HW_DATABASE_URL and TRAINYARD_MLFLOW_TRACKING_URI set).
"""

from __future__ import annotations

import os
import socket

import mlflow.tracking  # noqa: F401  imported once in the parent, like the platform's worker_init does
from celery import Celery
from celery.signals import worker_process_init
from mlflow.entities import Param
from mlflow.tracking import MlflowClient

import handwritten
from trainyard.config import Settings
from trainyard.queueing import celery_config

BROKER_URL = os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/15")
DATABASE_URL = os.environ.get("BENCH_HW_DATABASE_URL", "")
TRACKING_URI = os.environ.get("TRAINYARD_MLFLOW_TRACKING_URI", "")
EXPERIMENT = os.environ.get("TRAINYARD_MLFLOW_EXPERIMENT", "trainyard")
QUEUE = "hw"

app = Celery("bench-handwritten")
app.conf.update(celery_config(Settings(broker_url=BROKER_URL, database_url="sqlite://", queue=QUEUE)))
app.conf.update(worker_concurrency=1)

_state: dict = {}  # per (forked) process: the database connection, the MLflow client and experiment id


def _conn():
    conn = _state.get("conn")
    if conn is None or conn.closed:
        conn = _state["conn"] = handwritten.connect(DATABASE_URL)
    return conn


def _mlflow() -> tuple[MlflowClient, str]:
    if "client" not in _state:
        client = MlflowClient(tracking_uri=TRACKING_URI)
        _state["client"] = client
        _state["experiment_id"] = client.get_experiment_by_name(EXPERIMENT).experiment_id
    return _state["client"], _state["experiment_id"]


@worker_process_init.connect(weak=False)
def _connect_early(**_) -> None:
    _conn()  # as the platform's pool process does, before the first message


@app.task(name="handwritten.run_job", ignore_result=True)
def run_job(job_id: int) -> None:
    conn = _conn()
    job = handwritten.claim_job(conn, job_id, f"{socket.gethostname()}:{os.getpid()}")
    if job is None:
        return
    client, experiment_id = _mlflow()
    run = client.create_run(experiment_id, run_name=f"job-{job['id']}-{job['name']}",
                            tags={"trainyard.job_id": str(job["id"]), "trainyard.attempt": str(job["attempt"]),
                                  "trainyard.kind": job["kind"]})
    run_id = run.info.run_id
    client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in handwritten.flatten("", job["spec"]).items()])
    # the job's body: nothing
    client.set_terminated(run_id, status="FINISHED")
    handwritten.finish_job(conn, job["id"], job["attempt"], run_id=run_id, metrics={},
                           progress={"epoch": 0, "epochs": 0})
