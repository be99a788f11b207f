"""The worker pool: one pinned process per GPU, queues that route, priority that holds, a wait that explains itself."""

from __future__ import annotations

import re
import socket
from datetime import datetime

import psutil
import pytest

from trainyard.config import Settings
from trainyard.gpus import Device, gpu_type
from trainyard_workers.app import CPU_JOBS_PER_PROCESS, create_celery_app, jobs_per_process, max_memory_kib
from trainyard_workers.pool import PoolError, parse_indices, plan_workers
from trainyard_web import create_app
from trainyard.db import upgrade_schema
from conftest import WorkerProcess, authed_client, make_settings, wait_for_job, wait_until

H100, A100 = "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"
SIMULATED = f"{H100}:81559,{H100}:81559,{A100}:40960"
QUICK = {"kind": "train", "dataset": "digits", "architecture": "cnn", "register": False,
         "params": {"epochs": 1, "batch_size": 128}}


def test_gpu_types_come_from_the_model_name():
    assert [gpu_type(n) for n in (H100, A100, "NVIDIA GeForce RTX 4090", "Tesla V100-SXM2-16GB", "NVIDIA L4",
                                  "NVIDIA RTX A6000")] == ["h100", "a100", "rtx4090", "v100", "l4", "rtxa6000"]


def test_the_plan_pins_one_worker_per_gpu_and_names_it():
    devices = [Device(0, H100, 81559), Device(1, H100, 81559), Device(2, A100, 40960)]
    plans = plan_workers(devices, host="box", gpus=[0, 2])
    assert [(p.name, p.queues, p.env) for p in plans] == [
        ("gpu0@box", ["gpu.h100", "gpu"], {"CUDA_VISIBLE_DEVICES": "0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}),
        ("gpu2@box", ["gpu.a100", "gpu"], {"CUDA_VISIBLE_DEVICES": "2", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}),
    ]
    # --queues overrides; groups of two serve the .x2 queues that jobs of two devices go to.
    assert [p.queues for p in plan_workers(devices, host="box", queues=["vision"])] == [["vision"]] * 3
    pairs = plan_workers(devices[:2], host="box", gpus_per_worker=2)
    assert [(p.name, p.queues, p.env["CUDA_VISIBLE_DEVICES"]) for p in pairs] == [
        ("gpu0-1@box", ["gpu.h100.x2", "gpu.x2"], "0,1")]
    # No GPU: one CPU worker, hidden from CUDA, serving jobs of any size (gloo processes).
    [cpu] = plan_workers([], host="box")
    assert (cpu.name, cpu.env, cpu.queues[:2], cpu.queues[-1]) == (
        "cpu@box", {"CUDA_VISIBLE_DEVICES": ""}, ["cpu", "cpu.x2"], "cpu.x8")


@pytest.mark.parametrize("call, message", [
    (lambda d: plan_workers(d, host="box", gpus=[5]), "no GPU with index 5 on box; GPUs found: 0 (NVIDIA"),
    (lambda d: plan_workers(d, host="box", gpus_per_worker=2), "3 GPU(s) do not split into workers of 2"),
    (lambda d: plan_workers(d, host="box", gpus_per_worker=9), "--gpus-per-worker must be 1 to 8"),
    (lambda d: parse_indices("0,x"), "device indices like 0,2"),
    (lambda d: parse_indices("1,1"), "names a device twice"),
])
def test_a_pool_that_cannot_be_built_says_why(call, message):
    devices = [Device(0, H100, 81559), Device(1, H100, 81559), Device(2, A100, 40960)]
    with pytest.raises(PoolError, match=re.escape(message)):
        call(devices)


@pytest.mark.parametrize("visible, simulated, configured, expected", [
    ("0", None, 0, 1),  # pinned to a GPU: a fresh process per job
    ("0,1", None, 0, 1),
    ("", "H100", 0, CPU_JOBS_PER_PROCESS),  # every GPU hidden
    ("-1", None, 0, CPU_JOBS_PER_PROCESS),
    (None, "H100,H100", 0, 1),  # not pinned, but the host has GPUs
    (None, None, 0, CPU_JOBS_PER_PROCESS),
    ("0", None, 7, 7),  # TRAINYARD_JOBS_PER_PROCESS wins
])
def test_a_pool_process_lives_one_gpu_job_or_many_cpu_jobs(monkeypatch, tmp_path, visible, simulated, configured,
                                                          expected):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    settings = Settings(data_dir=tmp_path, simulated_gpus=simulated, jobs_per_process=configured)
    assert jobs_per_process(settings) == expected
    assert create_celery_app(settings).conf.worker_max_tasks_per_child == expected


@pytest.mark.parametrize("simulated, configured, expected", [
    (None, 2048, 2048 * 1024),  # a CPU worker: renewed when a job leaves it holding more than this
    (None, 0, None),  # never
    ("H100", 2048, None),  # a GPU worker's process goes after every job anyway
])
def test_a_cpu_pool_process_is_renewed_by_the_memory_a_job_leaves(monkeypatch, tmp_path, simulated, configured,
                                                                  expected):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    settings = Settings(data_dir=tmp_path, simulated_gpus=simulated, worker_max_memory_mb=configured)
    assert max_memory_kib(settings) == expected
    assert create_celery_app(settings).conf.worker_max_memory_per_child == expected


def test_the_pool_starts_pinned_named_processes_that_register(web_settings, tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINYARD_SIMULATED_GPUS", SIMULATED)
    api = authed_client(create_app(web_settings))
    pool = WorkerProcess(web_settings, tmp_path / "pool.log", command="pool", extra=("--gpus=0,2",))
    host = socket.gethostname()
    try:
        workers = wait_until(lambda: _alive(api, 2, pool), 120, "both GPU workers registered", interval=0.5)
        assert {(w["name"], w["device"], w["device_memory_mb"], tuple(w["queues"])) for w in workers} == {
            (f"gpu0@{host}", H100, 81559, ("gpu", "gpu.h100")),
            (f"gpu2@{host}", A100, 40960, ("gpu", "gpu.a100")),
        }
        children = psutil.Process(pool.process.pid).children()
        seen = {}
        for child in children:
            name = next(a.split("=", 1)[1] for a in child.cmdline() if a.startswith("--hostname="))
            env = child.environ()
            seen[name] = (env.get("CUDA_VISIBLE_DEVICES"), env.get("CUDA_DEVICE_ORDER"))
        assert seen == {f"gpu0@{host}": ("0", "PCI_BUS_ID"), f"gpu2@{host}": ("2", "PCI_BUS_ID")}
    finally:
        pool.stop()
    assert pool.process.returncode is not None
    after = api.get("/api/v1/workers").get_json()["workers"]
    assert {w["name"]: w["alive"] for w in after} == {f"gpu0@{host}": False, f"gpu2@{host}": False}


def _alive(api, count: int, process: WorkerProcess):
    if process.process.poll() is not None:
        pytest.fail(f"the pool exited with {process.process.returncode}:\n{process.log()}")
    alive = [w for w in api.get("/api/v1/workers").get_json()["workers"] if w["alive"]]
    return alive if len(alive) == count else None


@pytest.fixture
def pg_settings(tmp_path, postgres, redis_broker_url):
    """The real deployment's stores: PostgreSQL and Redis."""
    settings = make_settings(tmp_path, database_url=postgres.create(), broker_url=redis_broker_url)
    upgrade_schema(settings.database_url)
    return settings


def test_queues_route_priority_orders_and_waiting_jobs_say_why(web_settings, start_worker):
    api = authed_client(create_app(web_settings))

    def submit(queue: str, priority: str = "normal") -> int:
        response = api.post("/api/v1/jobs", json={**QUICK, "priority": priority, "resources": {"queue": queue}})
        assert response.status_code == 201, response.get_json()
        return response.get_json()["id"]

    normal = [submit("qa") for _ in range(3)]
    urgent = submit("qa", "high")
    other = submit("qb")
    orphan = submit("gpu.a100")

    # Before any worker: each job knows its place, and that nobody serves its queue.
    waits = {job_id: api.get(f"/api/v1/jobs/{job_id}").get_json()["waiting"] for job_id in [*normal, urgent, orphan]}
    assert [waits[j]["jobs_ahead"] for j in [urgent, *normal]] == [0, 1, 2, 3]
    assert all(w["served_by"] == [] for w in waits.values())
    assert "no worker serves queue gpu.a100" in waits[orphan]["message"]

    worker_a = start_worker(web_settings, queues="qa")
    worker_b = start_worker(web_settings, queues="qb")
    done = {j: wait_for_job(api, j, {"SUCCEEDED", "FAILED", "CANCELLED"}) for j in [*normal, urgent, other]}
    assert {j["status"] for j in done.values()} == {"SUCCEEDED"}, [j["error"] for j in done.values()]

    names = {tuple(w["queues"]): w["name"] for w in api.get("/api/v1/workers").get_json()["workers"]}
    ran_on = {j: job["events"][1]["message"] for j, job in done.items()}
    assert all(names[("qa",)] in ran_on[j] for j in [*normal, urgent]), ran_on
    assert names[("qb",)] in ran_on[other], ran_on
    # A CPU worker keeps its pool process from job to job: the four qa jobs ran in one process.
    assert len({re.search(r"\(pid (\d+)\)", ran_on[j]).group(1) for j in [*normal, urgent]}) == 1, ran_on

    # The high-priority job, submitted after three normal ones, started first; the rest in order.
    started = sorted([*normal, urgent], key=lambda j: datetime.fromisoformat(done[j]["started_at"]))
    assert started == [urgent, *normal]

    # The job nobody serves is still waiting, and says so; the live workers do not change that.
    orphan_job = api.get(f"/api/v1/jobs/{orphan}").get_json()
    assert orphan_job["status"] == "QUEUED"
    assert orphan_job["waiting"]["served_by"] == [] and orphan_job["waiting"]["jobs_ahead"] == 0
    assert worker_a.process.poll() is None and worker_b.process.poll() is None
