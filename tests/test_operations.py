"""Operating the platform: /metrics against what the database says, GPU readings on the heartbeat,
structured worker logs, and `trainyard logs`."""

from __future__ import annotations

import json
import sys
import threading
import types
from datetime import timedelta

import pytest
from conftest import authed_client, make_settings, make_token, wait_until
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text, update
from trainyard import attempts, job_logs, jobs, leases, worker_registry
from trainyard.cli import app as cli
from trainyard.db import Database, upgrade_schema
from trainyard.models import Job, JobStatus, Worker, utcnow
from trainyard.platform_metrics import DURATION_BUCKETS
from trainyard.specs import JobSpec
from trainyard_web import create_app
from trainyard_workers import gpu_stats, presence
from typer.testing import CliRunner
from werkzeug.serving import make_server

# ---- /metrics ------------------------------------------------------------------------------------------


def submit(db, settings, queue: str, gpus: int = 1) -> int:
    spec = JobSpec(dataset="digits", architecture="cnn", params={"epochs": 1},
                   resources={"queue": queue, "gpus": gpus})
    return jobs.submit_job(db, spec, lambda *_: None, settings=settings, owner="ops").id


def run_for(db, job_id: int, seconds: float, end) -> None:
    """Claim the job, back-date its start by `seconds`, and end it with `end`: the duration tally counts
    the run time it sees at that transition."""
    job = leases.claim_job(db, job_id, "w1", 60)
    with db.session_scope() as s:
        s.execute(update(Job).where(Job.id == job_id).values(started_at=utcnow() - timedelta(seconds=seconds)))
    assert end(db, job.id, job.attempt)


def scrape(client) -> dict[str, list]:
    response = client.get("/metrics")
    assert response.status_code == 200, response.data
    assert response.content_type.startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(response.get_data(as_text=True))}


def values(samples, name: str, *labels: str) -> dict:
    """{label values: value} of the samples called `name`."""
    return {tuple(s.labels[k] for k in labels): s.value for s in samples if s.name == name}


@pytest.fixture
def ops_settings(tmp_path, db_url):
    return make_settings(tmp_path, database_url=db_url).model_copy(update={"worker_stale_seconds": 30})


def test_metrics_equal_what_the_database_says(ops_settings):
    app = create_app(ops_settings)  # also registers the built-in datasets
    db = Database(ops_settings.database_url)
    try:
        ids = {q: [submit(db, ops_settings, q) for _ in range(n)] for q, n in (("cpu", 6), ("gpu.h100", 3))}
        ids["gpu.x2"] = [submit(db, ops_settings, "gpu", gpus=2)]
        finish = lambda d, j, a: attempts.finish_job(d, j, a, {}, {})
        run_for(db, ids["cpu"][0], 4.0, finish)
        run_for(db, ids["cpu"][1], 45.0, finish)
        run_for(db, ids["cpu"][2], 4000.0, lambda d, j, a: attempts.fail_job(d, j, a, "RuntimeError: boom"))
        run_for(db, ids["gpu.h100"][0], 700.0, attempts.mark_cancelled)
        leases.claim_job(db, ids["cpu"][3], "w1", 60)  # RUNNING
        leases.claim_job(db, ids["gpu.h100"][1], "w2", 60)  # RUNNING
        jobs.request_cancel(db, ids["cpu"][4])  # cancelled while queued: it never ran, so no duration

        gpu = "NVIDIA H100 80GB HBM3"
        worker_registry.register_worker(db, name="cpu@a", host="a", device="CPU (8 cores)", queues=["cpu"])
        worker_registry.register_worker(db, name="gpu0@b", host="b", device=gpu, queues=["gpu.h100", "gpu"],
                                        device_memory_mb=81559)
        worker_registry.register_worker(db, name="gpu1@b", host="b", device=gpu, queues=["gpu.h100", "gpu"],
                                        device_memory_mb=81559)
        worker_registry.register_worker(db, name="gpu0@lost", host="lost", device="NVIDIA A100-SXM4-40GB",
                                        queues=["gpu.a100"], device_memory_mb=40960)
        worker_registry.register_worker(db, name="cpu@gone", host="gone", device="CPU (2 cores)", queues=["cpu"])
        worker_registry.heartbeat(db, "gpu0@b", gpu_utilization=37.5, gpu_memory_used_mb=1234)
        worker_registry.heartbeat(db, "gpu0@lost", gpu_utilization=99.0, gpu_memory_used_mb=40000)
        worker_registry.worker_stopped(db, "cpu@gone")
        with db.session_scope() as s:  # silent for longer than worker_stale_seconds
            s.execute(update(Worker).where(Worker.name == "gpu0@lost").values(last_seen=utcnow() - timedelta(minutes=5)))

        metrics = scrape(authed_client(app, role="viewer", user="prometheus"))

        # Counted again here, independently of the service: plain SQL and Python.
        with db.engine.connect() as conn:
            by_queue_status = conn.execute(text("SELECT queue, status, COUNT(*) FROM job GROUP BY queue, status")).all()
            finished = conn.execute(text(
                "SELECT kind, status, started_at, finished_at FROM job WHERE status IN ('SUCCEEDED', 'FAILED', "
                "'CANCELLED') AND started_at IS NOT NULL")).all()
        queued = {(q,): float(n) for q, st, n in by_queue_status if st == "QUEUED"}
        running = {(q,): float(n) for q, st, n in by_queue_status if st == "RUNNING"}
        assert queued == {("cpu",): 1.0, ("gpu.h100",): 1.0, ("gpu.x2",): 1.0}  # the scenario is what we meant
        depth = values(metrics["trainyard_queue_depth"], "trainyard_queue_depth", "queue")
        assert {k: v for k, v in depth.items() if v} == queued
        assert depth[("gpu",)] == 0  # a live worker serves it: shown, empty
        assert ("gpu.a100",) not in depth  # only a lost worker serves it, and no job waits there
        running_metric = values(metrics["trainyard_queue_running_jobs"], "trainyard_queue_running_jobs", "queue")
        assert {k: v for k, v in running_metric.items() if v} == running

        statuses = {s: 0.0 for s in JobStatus}
        for _, st, n in by_queue_status:
            statuses[st] += n
        assert values(metrics["trainyard_jobs"], "trainyard_jobs", "status") == {(s,): n for s, n in statuses.items()}
        assert statuses["CANCELLED"] == 2 and statuses["SUCCEEDED"] == 2

        def as_datetime(v):  # SQLite hands back ISO text, PostgreSQL datetimes
            from datetime import datetime
            return datetime.fromisoformat(v) if isinstance(v, str) else v.replace(tzinfo=None)

        durations: dict[tuple, list[float]] = {}
        for kind, st, started, ended in finished:
            durations.setdefault((kind, st), []).append((as_datetime(ended) - as_datetime(started)).total_seconds())
        samples = metrics["trainyard_job_duration_seconds"]
        counts = values(samples, "trainyard_job_duration_seconds_count", "kind", "status")
        assert counts == {key: float(len(d)) for key, d in durations.items()}
        assert counts == {("train", "SUCCEEDED"): 2.0, ("train", "FAILED"): 1.0, ("train", "CANCELLED"): 1.0}
        sums = values(samples, "trainyard_job_duration_seconds_sum", "kind", "status")
        assert sums == pytest.approx({key: sum(d) for key, d in durations.items()}, abs=0.01)
        buckets = values(samples, "trainyard_job_duration_seconds_bucket", "kind", "status", "le")
        for (kind, st), taken in durations.items():
            for bound in DURATION_BUCKETS:
                assert buckets[(kind, st, repr(bound))] == sum(t <= bound for t in taken), (kind, st, bound)
            assert buckets[(kind, st, "+Inf")] == len(taken)
        assert buckets[("train", "SUCCEEDED", "10.0")] == 1 and buckets[("train", "SUCCEEDED", "60.0")] == 2

        assert values(metrics["trainyard_workers_alive"], "trainyard_workers_alive", "device") == {
            ("CPU",): 1.0, (gpu,): 2.0, ("NVIDIA A100-SXM4-40GB",): 0.0}
        labels = ("worker", "host", "device")
        assert values(metrics["trainyard_worker_gpu_utilization_ratio"], "trainyard_worker_gpu_utilization_ratio",
                      *labels) == {("gpu0@b", "b", gpu): 0.375}  # the lost worker's last reading is not shown
        assert values(metrics["trainyard_worker_gpu_memory_used_bytes"], "trainyard_worker_gpu_memory_used_bytes",
                      *labels) == {("gpu0@b", "b", gpu): 1234 * 2**20}
        assert values(metrics["trainyard_worker_gpu_memory_total_bytes"], "trainyard_worker_gpu_memory_total_bytes",
                      *labels) == {("gpu0@b", "b", gpu): 81559 * 2**20, ("gpu1@b", "b", gpu): 81559 * 2**20}

        # The REST API shows the same readings.
        pool = authed_client(app, role="viewer").get("/api/v1/workers").get_json()
        readings = {w["name"]: (w["gpu_utilization"], w["gpu_memory_used_mb"]) for w in pool["workers"]}
        assert readings["gpu0@b"] == (37.5, 1234) and readings["cpu@a"] == (None, None)
    finally:
        db.dispose()


def test_metrics_need_a_token(web_app):
    client = web_app.test_client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer not-a-token"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Basic eDp5"}).status_code == 401
    spec = authed_client(web_app, role="viewer").get("/api/v1/openapi.json").get_json()
    assert "/metrics" not in spec["paths"]  # not JSON, so not in the API document


# ---- GPU readings on the heartbeat (NVML is the one thing faked: there is no GPU here) --------------------


def fake_nvml(utilization: dict[int, int], used_mb: dict[int, int]) -> types.ModuleType:
    nvml = types.ModuleType("pynvml")
    nvml.nvmlInit = nvml.nvmlShutdown = lambda: None
    nvml.nvmlDeviceGetCount = lambda: len(utilization)
    nvml.nvmlDeviceGetHandleByIndex = lambda index: index
    nvml.nvmlDeviceGetName = lambda handle: "NVIDIA H100 80GB HBM3"
    nvml.nvmlDeviceGetUtilizationRates = lambda handle: types.SimpleNamespace(gpu=utilization[handle], memory=0)
    nvml.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(
        total=81559 * 2**20, used=used_mb[handle] * 2**20, free=0)
    return nvml


def test_gpu_reading_is_of_the_pinned_devices_and_none_on_a_cpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml({0: 10, 1: 60, 2: 80}, {0: 1, 1: 500, 2: 300}))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_stats.read_gpu() == gpu_stats.GpuReading(None, None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert gpu_stats.read_gpu() == gpu_stats.GpuReading(60.0, 500)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,2")
    assert gpu_stats.read_gpu() == gpu_stats.GpuReading(70.0, 500)

    def no_driver():
        raise OSError("NVML Shared Library Not Found")

    monkeypatch.setattr(sys.modules["pynvml"], "nvmlInit", no_driver)
    assert gpu_stats.read_gpu() == gpu_stats.GpuReading(None, None)


def test_heartbeat_records_the_gpu_reading(tmp_path, monkeypatch):
    settings = make_settings(tmp_path)
    upgrade_schema(settings.database_url)
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml({0: 5, 1: 42}, {0: 1, 1: 2048}))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setattr(presence, "BEAT_SECONDS", 0.05)
    beating = presence.Presence(settings, "gpu1@host", ["gpu"])
    db = Database(settings.database_url)
    try:
        beating.start()
        worker = wait_until(lambda: next((w for w in worker_registry.pool_status(db, stale_after_seconds=30).workers
                                          if w.gpu_utilization is not None), None), 10, "no GPU reading recorded")
        assert (worker.gpu_utilization, worker.gpu_memory_used_mb, worker.device_memory_mb) == (42.0, 2048, 81559)
    finally:
        beating.stop()
        db.dispose()


# ---- `trainyard logs` and structured worker logs --------------------------------------------------------


@pytest.fixture
def live(tmp_path):
    settings = make_settings(tmp_path).model_copy(update={"heartbeat_seconds": 0.5})
    upgrade_schema(settings.database_url)
    app = create_app(settings)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {"TRAINYARD_API_URL": f"http://127.0.0.1:{server.server_port}", "TRAINYARD_DATA_DIR": str(tmp_path / "cli"),
           "TRAINYARD_TOKEN": make_token(settings, "viewer", "reader")}
    yield settings, env, authed_client(app)
    server.shutdown()


def trainyard(args: list[str], env: dict[str, str]):
    return CliRunner().invoke(cli, args, env=env)


def test_logs_prints_a_job_log_by_attempt_and_follow_ends_with_the_job(live):
    settings, env, client = live
    job_id = client.post("/api/v1/jobs", json={"dataset": "digits", "architecture": "cnn"}).get_json()["id"]
    db = Database(settings.database_url)
    try:
        now = utcnow()
        job_logs.append(db, job_id, 1, [(now, "INFO x: first [attempt] line"), (now, "INFO x: lost worker")])
        job_logs.append(db, job_id, 2, [(now, "INFO x: resumed from epoch 1")])
    finally:
        db.dispose()
    everything = trainyard(["logs", str(job_id)], env)
    assert everything.exit_code == 0, everything.output
    lines = everything.output.splitlines()
    assert [line[20:] for line in lines] == ["[attempt 1] INFO x: first [attempt] line", "[attempt 1] INFO x: lost worker",
                                             "[attempt 2] INFO x: resumed from epoch 1"]
    second = trainyard(["logs", str(job_id), "--attempt", "2"], env)
    assert second.exit_code == 0 and second.output.splitlines() == lines[2:]

    assert client.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 202
    followed = trainyard(["logs", str(job_id), "--follow", "--interval", "0.1"], env)
    assert followed.exit_code == 1 and followed.output.splitlines() == lines  # ended, but not SUCCEEDED

    missing = trainyard(["logs", "999"], env)
    assert missing.exit_code == 1 and "999" in missing.output


def test_follow_prints_a_running_job_to_its_end_and_worker_logs_are_json(live, start_worker):
    settings, env, client = live
    worker = start_worker(settings)
    job_id = client.post("/api/v1/jobs", json={"dataset": "digits", "architecture": "cnn",
                                               "params": {"epochs": 1}}).get_json()["id"]
    followed = trainyard(["logs", str(job_id), "-f", "--interval", "0.2"], env)
    job = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert job["status"] == "SUCCEEDED", f"{job['error']}\n{worker.log()[-3000:]}"
    assert followed.exit_code == 0, followed.output

    # Every line of the job's own log was printed, the last ones (written as it ended) too; they are text.
    stored = client.get(f"/api/v1/jobs/{job_id}/logs").get_json()["items"]
    assert stored and [line[20:] for line in followed.output.splitlines()] == [
        f"[attempt 1] {item['line']}" for item in stored]
    assert any("epoch 1/1: train_loss=" in item["line"] for item in stored)
    assert not any(item["line"].startswith("{") for item in stored)

    # The worker's stderr is JSON lines (not a terminal); while the job ran, each carries job_id and attempt.
    records = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    assert any(r["event"].endswith(" ready.") and r["logger"].startswith("celery") for r in records)
    during = [r for r in records if r.get("job_id") == job_id]
    assert {r["attempt"] for r in during} == {1}
    events = [r["event"] for r in during]
    assert any(e.startswith(f"job {job_id} attempt 1 started") for e in events), events
    assert any("epoch 1/1: train_loss=" in e for e in events), events
    assert all({"level", "timestamp", "logger"} <= r.keys() for r in records)
    # Outside the job the context is gone: nothing logged about startup carries a job id.
    assert not any("job_id" in r for r in records if "ready." in r["event"])
