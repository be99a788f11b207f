"""Measure 10, scale of the control plane: `GET /api/v1/jobs` (first page) and the Jobs UI page (`/`) with
100,000 jobs in PostgreSQL vs with 100.

Two PostgreSQL databases migrated by the platform's own migrations (upgrade_schema); one gets 100 jobs,
the other 100,000, bulk-inserted with SQLAlchemy core (realistic rows: specs from the JobSpec schema, a mix
of statuses weighted to SUCCEEDED, metrics, progress, three job_event rows per finished job), then ANALYZEd.
Each database is served by its own real web app under gunicorn (2 workers × 4 threads, identical settings).
One repetition = N sequential requests on a keep-alive connection (API with a bearer token; the UI logged in
through the login form); its value is the median latency in ms.

"platform" is the 100,000-job side and "baseline" the 100-job side: the ratio is latency(100k)/latency(100).
"""

from __future__ import annotations

import statistics
import sys
import time
from datetime import timedelta

import httpx
from sqlalchemy import create_engine, insert, text

import harness
import stack

MEASURE = "10 control-plane scale"
BIG, SMALL = 100_000, 100
STATUS_MIX = ["SUCCEEDED"] * 14 + ["FAILED"] * 3 + ["CANCELLED"] * 2 + ["RUNNING"]


def populate(db_url: str, count: int) -> float:
    """Insert `count` jobs (and their events) straight into the tables; returns the seconds it took."""
    from trainyard.models import Job, JobEvent, utcnow
    from trainyard.specs import JobSpec, PRIORITY_LEVELS

    archs = ["cnn", "resnet18", "alexnet", "vgg11"]
    specs = {a: JobSpec.model_validate({"kind": "train", "dataset": "digits", "architecture": a,
                                        "params": {"epochs": 10}}).model_dump(mode="json") for a in archs}
    t0 = time.perf_counter()
    engine = create_engine(db_url)
    base = utcnow() - timedelta(days=30)
    chunk = 10_000
    with engine.begin() as conn:
        for start in range(0, count, chunk):
            jobs_rows, event_rows = [], []
            for i in range(start, min(count, start + chunk)):
                status = STATUS_MIX[i % len(STATUS_MIX)]
                arch = archs[i % len(archs)]
                created = base + timedelta(seconds=20 * i)
                finished = created + timedelta(minutes=3) if status != "RUNNING" else None
                jobs_rows.append({
                    "id": i + 1, "kind": "train", "name": f"{arch}-digits-{i + 1}", "status": status,
                    "dataset": "digits", "architecture": arch, "spec": specs[arch], "queue": "cpu",
                    "priority": PRIORITY_LEVELS["normal"], "attempt": 1, "max_attempts": 3,
                    "lease_owner": "host:1" if status == "RUNNING" else None,
                    "lease_expires_at": created + timedelta(minutes=60) if status == "RUNNING" else None,
                    "cancel_requested": status == "CANCELLED", "progress": {"epoch": 10, "epochs": 10},
                    "metrics": {"val_accuracy": 0.97, "val_loss": 0.11, "train_loss": 0.05} if status == "SUCCEEDED" else {},
                    "mlflow_run_id": f"{i:032x}", "checkpoint_path": None, "checkpoint_sha256": None,
                    "checkpoint_epoch": None, "model_name": None, "model_version": None, "owner": f"user{i % 7}",
                    "error": "RuntimeError: boom" if status == "FAILED" else None, "created_at": created,
                    "started_at": created + timedelta(seconds=1), "finished_at": finished,
                    "updated_at": finished or created,
                })
                event_rows.append({"job_id": i + 1, "at": created, "from_status": None, "to_status": "QUEUED",
                                   "attempt": 0, "message": "submitted"})
                event_rows.append({"job_id": i + 1, "at": created + timedelta(seconds=1), "from_status": "QUEUED",
                                   "to_status": "RUNNING", "attempt": 1, "message": "started on host"})
                if finished:
                    event_rows.append({"job_id": i + 1, "at": finished, "from_status": "RUNNING",
                                       "to_status": status, "attempt": 1, "message": ""})
            conn.execute(insert(Job.__table__), jobs_rows)
            conn.execute(insert(JobEvent.__table__), event_rows)
        conn.execute(text("SELECT setval(pg_get_serial_sequence('job', 'id'), :n)"), {"n": count})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE"))
    engine.dispose()
    return time.perf_counter() - t0


def main() -> int:
    args = harness.parse_args(__doc__)
    requests_per_rep = 30 if args.quick else 100
    with stack.temp_dir() as tmp, stack.postgres_database() as big_url, stack.postgres_database() as small_url, \
            stack.redis_database() as broker_url, stack.Processes(tmp) as procs:
        servers = {}
        for side, url, count in (("big", big_url, BIG), ("small", small_url, SMALL)):
            settings = stack.platform_settings(tmp / side, database_url=url, broker_url=broker_url, queue="cpu")
            stack.prepare_platform(settings)
            seconds = populate(url, count)
            print(f"inserted {count} jobs into {side} database in {seconds:.1f}s", flush=True)
            token = stack.make_token(settings)
            base = procs.gunicorn(f"web-{side}", "trainyard_web:create_app()", stack.settings_env(settings))
            api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60)
            ui = httpx.Client(base_url=base, timeout=60)
            stack.ui_login(ui, base, token)
            servers[side] = (api, ui)

        def timed(client_index: int, side: str, path: str):
            def run() -> float:
                client = servers[side][client_index]
                times = []
                for _ in range(requests_per_rep):
                    t0 = time.perf_counter()
                    response = client.get(path)
                    times.append(time.perf_counter() - t0)
                    if response.status_code != 200 or (client_index == 1 and "<table" not in response.text):
                        raise RuntimeError(f"{side} {path}: {response.status_code} {response.text[:300]}")
                return 1000 * statistics.median(times)
            return run

        for index, label, path in ((0, "GET /api/v1/jobs first page", "/api/v1/jobs"), (1, "Jobs UI page /", "/")):
            result = harness.compare(MEASURE, f"{label}: 100,000 vs 100 jobs (median of {requests_per_rep} requests)",
                                     timed(index, "big", path), timed(index, "small", path), repeats=args.repeats,
                                     unit="ms", higher_is_better=False, warmup=1)
            met = result.ratio <= 1.5
            harness.report(result, "≤ 1.5×", met,
                           "" if met else f"{result.ratio:.2f}× slower with 100,000 jobs: something scans the table")
        for api, ui in servers.values():
            api.close()
            ui.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
