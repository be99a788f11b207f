"""Measure 6, queue throughput: jobs/s end to end with every database write, vs bare Celery no-op tasks/s.

The engine has no no-op job kind, so two honest stand-ins are measured:

- "no-op job body": N `train` jobs submitted through the jobs service (`jobs.submit_job`: job row + event
  in one transaction, then the Celery message), run by a real worker process in which the train body alone
  is replaced by a no-op (bench/noop_engine_worker.py). Claim, worker registry, job-log capture, lease
  keeper, MLflow run start/end, record_progress, finish_job and all job_event rows are real. The clock runs
  from the first submit to the last job's SUCCEEDED row.
- "smallest real job": the same with the unpatched worker and a real 1-epoch `cnn` on `digits` job (full
  mode only unless --with-real in --quick; it is dominated by training, not by the queue).

Baseline: N `bench.noop` tasks sent with the same broker settings to a concurrency-1 bare Celery worker on
the same Redis (bench/bare_celery.py); the clock runs from the first send until the N-th task has counted
itself in Redis.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import redis
from sqlalchemy import create_engine, func, select

import harness
import stack

MEASURE = "06 queue throughput"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--with-real", action="store_true", help="also measure the smallest real job in --quick")
    args = harness.parse_args(parser=parser)
    noop_jobs = 6 if args.quick else 30
    real_jobs = 2 if args.quick else 4
    with stack.temp_dir() as tmp, stack.postgres_database() as db_url, stack.redis_database() as broker_url, \
            stack.Processes(tmp) as procs:
        settings = stack.platform_settings(tmp / "data", database_url=db_url, broker_url=broker_url, queue="cpu")
        stack.prepare_platform(settings)
        env = stack.settings_env(settings)
        bare_worker = procs.start("bare-worker", [sys.executable, "-m", "celery", "-A", "bare_celery", "worker",
                                                  "--queues=bare", "--concurrency=1", "--loglevel=INFO",
                                                  "--hostname=bare@%h"], {**env, "BENCH_BROKER_URL": broker_url})
        noop_worker = procs.start("noop-worker", [sys.executable, str(stack.BENCH_DIR / "noop_engine_worker.py"),
                                                  "worker", "--queues=cpu.noop", "--loglevel=INFO",
                                                  "--hostname=noop@%h"], env)
        noop_worker.wait_for_log(" ready.", timeout=180)
        bare_worker.wait_for_log("ready.", timeout=180)

        from trainyard import jobs
        from trainyard.db import Database
        from trainyard.models import Job, JobStatus
        from trainyard.queueing import CeleryDispatch
        from trainyard.specs import JobSpec

        db = Database(db_url)
        dispatch = CeleryDispatch(settings)
        engine = create_engine(db_url)
        from bare_celery import app as bare_app

        bare_app.conf.broker_url = broker_url
        r = redis.Redis.from_url(broker_url)

        def wait_succeeded(ids: list[int], timeout: float) -> None:
            deadline = time.monotonic() + timeout
            with engine.connect() as conn:
                while True:
                    rows = conn.execute(select(Job.status, func.count()).where(Job.id.in_(ids))
                                        .group_by(Job.status)).all()
                    counts = dict(rows)
                    if counts.get(JobStatus.SUCCEEDED, 0) == len(ids):
                        return
                    if counts.get(JobStatus.FAILED) or time.monotonic() > deadline:
                        raise RuntimeError(f"jobs did not all succeed: {counts}")
                    conn.rollback()
                    time.sleep(0.005)

        def platform_jobs(queue: str, count: int, params: dict, timeout: float):
            spec = JobSpec.model_validate({"kind": "train", "dataset": "digits", "architecture": "cnn",
                                           "register": False, "resources": {"queue": queue}, "params": params})

            def run() -> float:
                t0 = time.perf_counter()
                ids = [jobs.submit_job(db, spec, dispatch, settings=settings, owner="bench").id for _ in range(count)]
                wait_succeeded(ids, timeout)
                return count / (time.perf_counter() - t0)
            return run

        def bare_tasks(count: int):
            def run() -> float:
                key = f"bench:noop:{time.time_ns()}"
                t0 = time.perf_counter()
                for _ in range(count):
                    bare_app.send_task("bench.noop", args=[key], queue="bare")
                deadline = time.monotonic() + 120
                while int(r.get(key) or 0) < count:
                    if time.monotonic() > deadline:
                        raise RuntimeError("bare no-op tasks did not all run")
                    time.sleep(0.001)
                return count / (time.perf_counter() - t0)
            return run

        result = harness.compare(MEASURE, f"no-op job body via the real engine ({noop_jobs} jobs/rep)",
                                 platform_jobs("cpu.noop", noop_jobs, {"epochs": 1}, 600), bare_tasks(noop_jobs),
                                 repeats=args.repeats, unit="jobs/s", higher_is_better=True,
                                 warmup=1)  # the worker's first job warms its pool process (imports, connections)
        with engine.connect() as conn:  # where a no-op job's time goes, from the job rows themselves
            rows = conn.execute(select(Job.created_at, Job.started_at, Job.finished_at)
                                .where(Job.queue == "cpu.noop").order_by(Job.started_at)).all()
        in_task = [(f - s).total_seconds() for _, s, f in rows if s and f]
        between = [(rows[i + 1][1] - rows[i][2]).total_seconds() for i in range(len(rows) - 1)
                   if rows[i + 1][0] < rows[i][2]]  # next job already waiting when this one finished
        result.extra.update(median_claim_to_finish_s=round(statistics.median(in_task), 3))
        if between:
            result.extra.update(median_finish_to_next_claim_s=round(statistics.median(between), 3))
        met = result.ratio >= 0.5
        harness.report(result, "≥ 0.5", met,
                       "engine path with the train body replaced by a no-op in the worker process (no no-op job "
                       "kind exists); a CPU worker's warm pool process; an MLflow run per job"
                       + ("" if met else f"; reaches {result.ratio:.3f} of bare Celery"))

        if not args.quick or args.with_real:
            procs.platform_worker(settings, queues="cpu.real")
            real = harness.compare(MEASURE, f"smallest real job: cnn/digits 1 epoch ({real_jobs} jobs/rep)",
                                   platform_jobs("cpu.real", real_jobs, {"epochs": 1, "batch_size": 64}, 900),
                                   bare_tasks(noop_jobs), repeats=args.repeats, unit="jobs/s",
                                   higher_is_better=True, warmup=0)
            harness.report(real, "≥ 0.5 (context only)", None,
                           "a real training job, not a no-op: shown for scale, the target applies to the row above")
        dispatch.close()
        db.dispose()
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
