"""A job end to end through real parts: REST API → broker → Celery worker process → engine → MLflow."""

from __future__ import annotations

import time
from contextlib import ExitStack

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from trainyard.db import upgrade_schema
from trainyard.ml.datasets import FORMATS
from trainyard.queueing import CeleryDispatch
from trainyard.tracking import JOB_ID_TAG
from trainyard_web import create_app
from conftest import WorkerProcess, authed_client, claimed_redis_database, make_settings, wait_for_job, wait_until


@pytest.fixture(scope="module", params=["sqlite+sqla-broker", "postgres+redis"])
def settings(request, tmp_path_factory):
    """One platform per backend, shared by this module's tests: each test submits jobs of its own."""
    tmp = tmp_path_factory.mktemp("e2e")
    with ExitStack() as stack:
        if request.param == "sqlite+sqla-broker":
            s = make_settings(tmp)  # the embedded defaults: SQLite everywhere
        else:
            broker_url = stack.enter_context(claimed_redis_database(request.getfixturevalue("redis_server")))
            s = make_settings(tmp, database_url=request.getfixturevalue("postgres").create(), broker_url=broker_url)
        s = s.model_copy(update={"heartbeat_seconds": 0.5})
        upgrade_schema(s.database_url)
        yield s


@pytest.fixture(scope="module")
def worker(settings):
    """The platform's one worker process, started once for the module: it takes one job at a time."""
    process = WorkerProcess(settings, settings.data_dir.parent / "worker.log")
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture
def client(settings):
    return authed_client(create_app(settings))


def test_job_trains_to_success_and_mlflow_holds_the_run(settings, client, worker):
    response = client.post("/api/v1/jobs", json={
        "kind": "train", "dataset": "digits", "architecture": "cnn", "params": {"epochs": 4}})
    assert response.status_code == 201
    job = wait_for_job(client, response.get_json()["id"], {"SUCCEEDED", "FAILED", "CANCELLED"})
    assert job["status"] == "SUCCEEDED", job["error"]
    assert job["attempt"] == 1 and job["progress"]["epoch"] == 4
    assert job["metrics"]["val_accuracy"] >= 0.9
    assert [e["to_status"] for e in job["events"]] == ["QUEUED", "RUNNING", "SUCCEEDED"]

    # The job's own log holds its worker's lines; the worker registered itself, idle again now.
    lines = [item["line"] for item in client.get(f"/api/v1/jobs/{job['id']}/logs").get_json()["items"]]
    assert any("epoch 4/4: train_loss=" in line for line in lines), lines

    def idle_pool():  # the worker clears its current job just after the job's final state is written
        pool = client.get("/api/v1/workers").get_json()
        return pool if all(w["current_job"] is None for w in pool["workers"]) else None

    pool = wait_until(idle_pool, 10, "the worker never showed itself idle")
    assert [(w["alive"], w["queues"], w["current_job"]) for w in pool["workers"]] == [(True, ["cpu"], None)]
    assert pool["workers"][0]["device"].startswith("CPU")

    client_ml = MlflowClient(settings.mlflow_tracking_uri)
    run = client_ml.get_run(job["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags[JOB_ID_TAG] == str(job["id"])
    assert run.data.params["params.epochs"] == "4" and run.data.params["architecture"] == "cnn"
    history = client_ml.get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert history[-1].value == pytest.approx(job["metrics"]["val_accuracy"])
    for name in ("train_loss", "val_loss", "test_accuracy"):
        assert name in run.data.metrics

    # The model was logged as a torch.export program (no pickle) that accepts any batch size.
    models = client_ml.search_logged_models(experiment_ids=[run.info.experiment_id])
    model = next(m for m in models if m.source_run_id == run.info.run_id)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    loaded = mlflow.pytorch.load_model(model.model_uri)
    # Preprocess exactly as recorded with the model: uint8 → 0..1 → (x - mean) / std.
    recorded = mlflow.models.get_model_info(model.model_uri).metadata["trainyard"]
    assert recorded["classes"] == [str(i) for i in range(10)] and recorded["image_shape"] == [1, 8, 8]
    test = FORMATS.get("digits").obj.load(None, None).test
    x = (test.tensors[0].float() / 255 - recorded["mean"][0]) / recorded["std"][0]
    with torch.no_grad():
        predictions = loaded(x).argmax(dim=1)
    accuracy = float((predictions == test.tensors[1]).float().mean())
    assert accuracy == pytest.approx(job["metrics"]["test_accuracy"], abs=1e-6)


def test_running_job_is_cancelled_within_a_batch(settings, client, worker):
    job = client.post("/api/v1/jobs", json={
        "kind": "train", "dataset": "digits", "architecture": "cnn",
        "params": {"epochs": 1000, "batch_size": 8}}).get_json()
    deadline = time.monotonic() + 120
    while client.get(f"/api/v1/jobs/{job['id']}").get_json()["progress"].get("batch", 0) < 1:
        assert time.monotonic() < deadline, "job never started training"
        time.sleep(0.2)
    assert client.post(f"/api/v1/jobs/{job['id']}/cancel").status_code == 202
    done = wait_for_job(client, job["id"], {"CANCELLED", "SUCCEEDED", "FAILED"}, timeout=30)
    assert done["status"] == "CANCELLED"
    assert done["progress"]["epoch"] < 1000
    assert [e["message"] for e in done["events"]][-2:] == ["cancel requested", "cancelled by request"]
    assert MlflowClient(settings.mlflow_tracking_uri).get_run(done["mlflow_run_id"]).info.status == "KILLED"


def test_second_delivery_of_a_message_does_not_train_twice(settings, client, worker):
    job = client.post("/api/v1/jobs", json={
        "kind": "train", "dataset": "digits", "architecture": "cnn", "params": {"epochs": 1}}).get_json()
    dispatch = CeleryDispatch(settings)
    dispatch(job["id"], "cpu", 1)  # the same job id, delivered again
    dispatch.close()
    done = wait_for_job(client, job["id"], {"SUCCEEDED", "FAILED", "CANCELLED"})
    assert done["status"] == "SUCCEEDED" and done["attempt"] == 1
    deadline = time.monotonic() + 60
    while f"message for job {job['id']}: nothing claimable" not in worker.log():
        assert time.monotonic() < deadline, worker.log()
        time.sleep(0.2)
    assert [e["to_status"] for e in client.get(f"/api/v1/jobs/{job['id']}").get_json()["events"]] == [
        "QUEUED", "RUNNING", "SUCCEEDED"]
    tracking = MlflowClient(settings.mlflow_tracking_uri)
    experiment_id = tracking.get_run(done["mlflow_run_id"]).info.experiment_id
    runs = tracking.search_runs([experiment_id], filter_string=f"tags.`{JOB_ID_TAG}` = '{job['id']}'")
    assert len(runs) == 1

