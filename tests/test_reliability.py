"""Lost workers: a SIGKILLed worker's job resumes on another from its last checkpoint, in the same MLflow run."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from trainyard import jobs
from trainyard.db import Database, upgrade_schema
from trainyard_web import create_app
from trainyard_workers.checkpoints import load_checkpoint
from conftest import WorkerProcess, authed_client, make_settings, wait_for_job, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def platform(tmp_path, postgres, redis_broker_url):
    settings = make_settings(tmp_path, database_url=postgres.create(), broker_url=redis_broker_url).model_copy(
        update={"heartbeat_seconds": 0.5, "lease_seconds": 4.0, "reconcile_seconds": 1.0})
    upgrade_schema(settings.database_url)
    processes: list[WorkerProcess] = []

    def start(name: str, command: str = "worker", wait: bool = True) -> WorkerProcess:
        process = WorkerProcess(settings, tmp_path / f"{name}.log", command=command)
        processes.append(process)
        if command == "worker" and wait:
            process.wait_ready()
        return process

    yield settings, authed_client(create_app(settings)), start
    for process in processes:
        process.stop()


def test_killed_worker_job_resumes_from_its_checkpoint_on_another(platform):
    settings, client, start = platform
    first = start("worker-a")
    start("reconciler", command="reconciler")
    job_id = client.post("/api/v1/jobs", json={"kind": "train", "dataset": "digits", "architecture": "cnn",
                                               "params": {"epochs": 4, "batch_size": 4}}).get_json()["id"]
    wait_until(lambda: client.get(f"/api/v1/jobs/{job_id}").get_json()["status"] == "RUNNING", 240,
               "job never started")
    # The other worker starts once the first holds the job, and imports torch while epochs 1-2 train.
    second = start("worker-b", wait=False)

    def in_epoch_3():
        job = client.get(f"/api/v1/jobs/{job_id}").get_json()
        return job if job["progress"].get("epoch") == 2 and job["progress"].get("batch", 0) >= 20 else None

    before = wait_until(in_epoch_3, 240, "job never reached epoch 3")
    assert before["checkpoint_epoch"] == 2 and before["attempt"] == 1
    first.kill()  # mid-epoch 3: the epoch-2 checkpoint is the last complete one
    second.wait_ready()
    job = wait_for_job(client, job_id, {"SUCCEEDED", "FAILED", "CANCELLED"}, timeout=300)
    assert job["status"] == "SUCCEEDED", f"{job['error']}\n{second.log()[-3000:]}"
    assert job["attempt"] == 2
    transitions = [(e["from_status"], e["to_status"], e["attempt"]) for e in job["events"]]
    assert transitions == [(None, "QUEUED", 0), ("QUEUED", "RUNNING", 1), ("RUNNING", "QUEUED", 1),
                           ("QUEUED", "RUNNING", 2), ("RUNNING", "SUCCEEDED", 2)]
    assert "resumes from epoch 2" in second.log()

    tracking = MlflowClient(settings.mlflow_tracking_uri)
    run = tracking.get_run(job["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "val_loss", "val_accuracy", "lr"):
        steps = [m.step for m in tracking.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == [1, 2, 3, 4], (key, steps)  # exactly one value per epoch
    step_losses = [m.step for m in tracking.get_metric_history(run.info.run_id, "train_step_loss")]
    assert len(step_losses) == len(set(step_losses))  # no batch logged twice
    assert job["metrics"]["val_accuracy"] >= 0.9


def test_a_job_out_of_attempts_fails_with_the_reason(platform):
    settings, client, start = platform
    worker = start("worker-a")
    start("reconciler", command="reconciler")
    job_id = client.post("/api/v1/jobs", json={"kind": "train", "dataset": "digits", "architecture": "cnn",
                                               "max_attempts": 1, "params": {"epochs": 50, "batch_size": 4}}
                         ).get_json()["id"]
    wait_until(lambda: client.get(f"/api/v1/jobs/{job_id}").get_json()["progress"].get("batch", 0) > 0, 240,
               "job never started")
    worker.kill()
    job = wait_for_job(client, job_id, {"SUCCEEDED", "FAILED", "CANCELLED"}, timeout=60)
    assert job["status"] == "FAILED" and "attempt 1 of 1" in job["error"]
    assert job["events"][-1]["message"].startswith("lease expired")


def test_sigterm_hands_the_job_back_to_resume_elsewhere(platform):
    settings, client, start = platform
    first = start("worker-a")
    job_id = client.post("/api/v1/jobs", json={"kind": "train", "dataset": "digits", "architecture": "cnn",
                                               "params": {"epochs": 3, "batch_size": 4}}).get_json()["id"]
    wait_until(lambda: (j := client.get(f"/api/v1/jobs/{job_id}").get_json())["progress"].get("epoch") == 1
               and j["progress"].get("batch", 0) >= 20, 240, "job never reached epoch 2")
    first.process.terminate()  # SIGTERM to the worker, as a deploy or a preemption notice does
    assert first.process.wait(timeout=60) == 0, first.log()[-3000:]
    handed_back = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert handed_back["status"] == "QUEUED" and handed_back["checkpoint_epoch"] == 1
    assert "stopped; re-queued" in handed_back["events"][-1]["message"]
    start("worker-b")
    job = wait_for_job(client, job_id, {"SUCCEEDED", "FAILED", "CANCELLED"}, timeout=300)
    assert job["status"] == "SUCCEEDED" and job["attempt"] == 2, job["error"]
    tracking = MlflowClient(settings.mlflow_tracking_uri)
    steps = [m.step for m in tracking.get_metric_history(job["mlflow_run_id"], "val_accuracy")]
    assert sorted(steps) == [1, 2, 3]


def test_cancel_is_honoured_for_a_job_whose_worker_was_lost(platform):
    settings, client, start = platform
    worker = start("worker-a")
    start("reconciler", command="reconciler")
    job_id = client.post("/api/v1/jobs", json={"kind": "train", "dataset": "digits", "architecture": "cnn",
                                               "params": {"epochs": 50, "batch_size": 4}}).get_json()["id"]
    wait_until(lambda: client.get(f"/api/v1/jobs/{job_id}").get_json()["progress"].get("batch", 0) > 0, 240,
               "job never started")
    worker.kill()
    assert client.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 202
    job = wait_for_job(client, job_id, {"SUCCEEDED", "FAILED", "CANCELLED"}, timeout=60)
    assert job["status"] == "CANCELLED"


def test_retry_runs_a_cancelled_job_again_from_its_checkpoint(platform):
    settings, client, start = platform
    start("worker-a")
    job_id = client.post("/api/v1/jobs", json={"kind": "train", "dataset": "digits", "architecture": "cnn",
                                               "params": {"epochs": 3, "batch_size": 4}}).get_json()["id"]
    wait_until(lambda: client.get(f"/api/v1/jobs/{job_id}").get_json()["checkpoint_epoch"] == 1, 240,
               "no first checkpoint")
    client.post(f"/api/v1/jobs/{job_id}/cancel")
    cancelled = wait_for_job(client, job_id, {"CANCELLED", "SUCCEEDED", "FAILED"}, timeout=60)
    assert cancelled["status"] == "CANCELLED"
    retried = client.post(f"/api/v1/jobs/{job_id}/retry")
    assert retried.status_code == 202 and retried.get_json()["status"] == "QUEUED"
    job = wait_for_job(client, job_id, {"SUCCEEDED", "FAILED", "CANCELLED"}, timeout=240)
    assert job["status"] == "SUCCEEDED" and job["attempt"] == 2, job["error"]
    assert any(e["message"].startswith("retried from the epoch-") for e in job["events"])
    again = client.post(f"/api/v1/jobs/{job_id}/retry")
    assert again.status_code == 409 and "SUCCEEDED" in again.get_json()["detail"]
    assert client.post("/api/v1/jobs/999999/retry").status_code == 404


def test_a_torn_checkpoint_falls_back_to_the_one_before(platform):
    settings, client, start = platform
    first = start("worker-a")
    job_id = client.post("/api/v1/jobs", json={"kind": "train", "dataset": "digits", "architecture": "cnn",
                                               "params": {"epochs": 3, "batch_size": 4}}).get_json()["id"]
    wait_until(lambda: (j := client.get(f"/api/v1/jobs/{job_id}").get_json())["progress"].get("epoch") == 2
               and j["progress"].get("batch", 0) >= 20, 240, "job never reached epoch 3")
    first.process.terminate()  # hand the job back: the next attempt starts only once the checkpoint is torn
    assert first.process.wait(timeout=60) == 0, first.log()[-3000:]
    handed_back = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert handed_back["status"] == "QUEUED" and handed_back["checkpoint_epoch"] == 2
    tracking = MlflowClient(settings.mlflow_tracking_uri)
    run_id = handed_back["mlflow_run_id"]
    assert [m.step for m in tracking.get_metric_history(run_id, "train_loss")] == [1, 2]
    db = Database(settings.database_url)
    newest = Path(jobs.get_job(db, job_id).checkpoint_path)  # not in the API: where files live is the platform's
    db.dispose()
    assert (newest.parent / "attempt-1-epoch-1.pt").exists()  # the one before is kept for this
    # Each checkpoint carries every epoch's metrics so far: a resume re-logs any that never reached MLflow.
    history = load_checkpoint(newest)["epoch_history"]
    assert sorted(history) == [1, 2] and history[1]["train_loss"] == pytest.approx(
        tracking.get_metric_history(run_id, "train_loss")[0].value)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # torn: half of it reached the disk

    second = start("worker-b")
    job = wait_for_job(client, job_id, {"SUCCEEDED", "FAILED", "CANCELLED"}, timeout=300)
    assert job["status"] == "SUCCEEDED" and job["attempt"] == 2, f"{job['error']}\n{second.log()[-3000:]}"
    notes = [e for e in job["events"] if "fell back to the epoch-1 checkpoint" in e["message"]]
    assert len(notes) == 1 and notes[0]["attempt"] == 2 and newest.name in notes[0]["message"], job["events"]
    assert "resumes from epoch 1" in second.log()
    for key in ("train_loss", "val_loss", "val_accuracy", "lr"):
        steps = [m.step for m in tracking.get_metric_history(run_id, key)]
        assert sorted(steps) == [1, 2, 3], (key, steps)  # epoch 2, trained twice, is logged once
    step_losses = [m.step for m in tracking.get_metric_history(run_id, "train_step_loss")]
    assert len(step_losses) == len(set(step_losses)) == 3 * job["progress"]["batches"]
    # The torn file is gone; the last two checkpoints of the finished job stay.
    assert sorted(p.name for p in newest.parent.glob("*.pt")) == ["attempt-2-epoch-2.pt", "attempt-2-epoch-3.pt"]
