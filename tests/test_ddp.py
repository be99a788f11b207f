"""Multi-device jobs: `resources.gpus: 2` trains with DDP over two gloo processes of one CPU worker, to the
same accuracy, checkpoints, metrics and single MLflow run as one process; a cancel stops every rank."""

from __future__ import annotations

import base64
import io
import time

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from trainyard.db import upgrade_schema
from trainyard.ml.datasets import FORMATS
from trainyard.model_registry import load_version
from trainyard_web import create_app
from conftest import authed_client, make_settings, processes_running, wait_for_job

pytestmark = pytest.mark.slow
ENDED = {"SUCCEEDED", "FAILED", "CANCELLED"}
RANK_MODULE = "trainyard_workers.distributed"
SPEC = {"kind": "train", "dataset": "digits", "architecture": "cnn",
        "params": {"epochs": 5, "batch_size": 32, "lr": 0.003, "seed": 7}}


@pytest.fixture
def settings(tmp_path, postgres, redis_broker_url):
    s = make_settings(tmp_path, database_url=postgres.create(), broker_url=redis_broker_url).model_copy(
        update={"heartbeat_seconds": 0.5})
    upgrade_schema(s.database_url)
    return s


@pytest.fixture
def client(settings):
    return authed_client(create_app(settings))


def submit(client, gpus: int, **params) -> int:
    spec = {**SPEC, "params": {**SPEC["params"], **params}, "resources": {"gpus": gpus},
            "model_name": f"ddp-digits-x{gpus}"}
    response = client.post("/api/v1/jobs", json=spec)
    assert response.status_code == 201, response.get_json()
    return response.get_json()["id"]


def rank_processes(worker) -> list[psutil.Process]:
    """The worker's DDP ranks 1..N-1: descendants running `python -m trainyard_workers.distributed`."""
    return processes_running(RANK_MODULE, worker.process.pid, recursive=True)


def job_log(client, job_id: int) -> list[str]:
    return [item["line"] for item in client.get(f"/api/v1/jobs/{job_id}/logs").get_json()["items"]]


def png(image: torch.Tensor) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image[0].numpy(), mode="L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_two_process_job_matches_one_process_and_logs_once(settings, client, start_worker):
    worker = start_worker(settings, queues="cpu,cpu.x2")
    started = time.monotonic()
    single_id, ddp_id = submit(client, 1), submit(client, 2)
    single = wait_for_job(client, single_id, ENDED, timeout=240)
    ddp = wait_for_job(client, ddp_id, ENDED, timeout=240)
    elapsed = time.monotonic() - started
    assert single["status"] == "SUCCEEDED", f"{single['error']}\n{worker.log()[-3000:]}"
    assert ddp["status"] == "SUCCEEDED", f"{ddp['error']}\n{worker.log()[-3000:]}"
    assert ddp["queue"] == "cpu.x2" and single["queue"] == "cpu"
    # The global batch is split, not multiplied: as many optimizer steps per epoch as one process takes
    assert ddp["progress"]["batches"] == single["progress"]["batches"]
    one, two = single["metrics"]["test_accuracy"], ddp["metrics"]["test_accuracy"]
    print(f"test accuracy: 1 process {one:.4f}, 2 processes {two:.4f}; both jobs in {elapsed:.0f} s")
    assert one >= 0.9 and two >= 0.9
    assert abs(one - two) <= 0.04, (one, two)

    # Only rank 0 logged: one MLflow run, exactly one value per epoch, the world size on it.
    tracking = MlflowClient(settings.mlflow_tracking_uri)
    run = tracking.get_run(ddp["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["trainyard.world_size"] == "2"
    assert tracking.get_run(single["mlflow_run_id"]).data.tags["trainyard.world_size"] == "1"
    for key in ("train_loss", "val_loss", "val_accuracy", "lr"):
        assert [m.step for m in tracking.get_metric_history(run.info.run_id, key)] == [1, 2, 3, 4, 5], key
    step_losses = [m.step for m in tracking.get_metric_history(run.info.run_id, "train_step_loss")]
    assert len(step_losses) == len(set(step_losses)) == 5 * ddp["progress"]["batches"]
    assert ddp["checkpoint_epoch"] == 5

    # The registered version is loadable from the unwrapped module's weights and serves predictions.
    assert ddp["model_name"] == "ddp-digits-x2" and ddp["model_version"] == 1
    loaded = load_version(settings, "ddp-digits-x2", 1)
    assert not any(name.startswith("module.") for name in loaded.module.state_dict())
    test = FORMATS.get("digits").obj.load(None, None).test
    x = (test.tensors[0].float() / 255 - loaded.mean.view(1, -1, 1, 1)) / loaded.std.view(1, -1, 1, 1)
    with torch.no_grad():
        predicted = loaded.module.eval()(x).argmax(dim=1)
    assert float((predicted == test.tensors[1]).float().mean()) == pytest.approx(two, abs=1e-6)
    response = client.post("/api/v1/models/ddp-digits-x2/predict?version=1",
                           json={"images": [png(image) for image in test.tensors[0][:8]]})
    assert response.status_code == 200, response.get_json()
    served = [int(p["top"][0]["label"]) for p in response.get_json()["predictions"]]
    assert served == predicted[:8].tolist()

    # The job's log shows both ranks; the other rank is gone with the job.
    lines = job_log(client, ddp_id)
    assert any("DDP over 2 cpu processes (gloo)" in line for line in lines), lines
    assert any("[rank 1]" in line and "rank 1 of 2 on cpu joined" in line for line in lines), lines
    assert any("[rank 1]" in line and "training over" in line for line in lines), lines
    assert not any("[rank" in line for line in job_log(client, single_id))
    assert rank_processes(worker) == []


def start_long_ddp_job(settings, client, start_worker):
    """A worker and a 2-process job that trains far longer than the test lasts, once it is past batch 2."""
    worker = start_worker(settings, queues="cpu,cpu.x2")
    job_id = submit(client, 2, epochs=1000, batch_size=8)
    deadline = time.monotonic() + 120
    while client.get(f"/api/v1/jobs/{job_id}").get_json()["progress"].get("batch", 0) < 2:
        assert time.monotonic() < deadline, f"job never started training\n{worker.log()[-3000:]}"
        time.sleep(0.2)
    return worker, job_id


def test_cancelling_a_ddp_job_stops_every_rank(settings, client, start_worker):
    worker, job_id = start_long_ddp_job(settings, client, start_worker)
    ranks = rank_processes(worker)
    assert len(ranks) == 1, ranks  # rank 1 runs beside rank 0 (the pool process)
    assert client.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 202
    done = wait_for_job(client, job_id, ENDED, timeout=30)
    assert done["status"] == "CANCELLED", f"{done['error']}\n{worker.log()[-3000:]}"
    assert [e["message"] for e in done["events"]][-2:] == ["cancel requested", "cancelled by request"]
    _, alive = psutil.wait_procs(ranks, timeout=10)
    assert alive == [] and rank_processes(worker) == []
    # Rank 1 stopped with rank 0 at the same batch (the agreed stop flag), rather than being killed.
    assert any("[rank 1]" in line and "stopped with the others" in line for line in job_log(client, job_id))
    assert MlflowClient(settings.mlflow_tracking_uri).get_run(done["mlflow_run_id"]).info.status == "KILLED"


def test_a_rank_that_dies_fails_the_job_with_the_reason(settings, client, start_worker):
    worker, job_id = start_long_ddp_job(settings, client, start_worker)
    [rank1] = rank_processes(worker)
    rank1.kill()  # as the OOM killer would
    done = wait_for_job(client, job_id, ENDED, timeout=60)
    assert done["status"] == "FAILED", done
    assert done["error"].startswith("RankFailed: rank 1 of 2 exited with code -9"), done["error"]
    assert MlflowClient(settings.mlflow_tracking_uri).get_run(done["mlflow_run_id"]).info.status == "FAILED"
    assert psutil.Process(worker.process.pid).is_running()  # the worker lives on for the next job
