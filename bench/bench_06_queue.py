"""Measure 6, queue throughput: no-op jobs/s end to end with every database write and the MLflow run, vs Celery
doing the same writes and MlflowClient calls by hand (the revised target), with 1 worker and with 2; and vs bare
Celery no-op tasks/s (kept as information).

The engine has no no-op job kind, so the platform side is:

- "no-op job body": N `train` jobs submitted through the jobs service (`jobs.submit_job`: spec checks, the
  job row and its event in one statement, then the Celery message), run by real worker processes in which the
  train body alone is replaced by a no-op (bench/noop_engine_worker.py). Claim, worker registry, job-log
  capture, lease keeper, MLflow run start/end, record_progress, finish_job, every job_event row and the
  per-queue tallies are real, and so is the CPU worker's renewal of its pool process every 100 jobs. The
  clock runs from the first submit to the last job's SUCCEEDED row.
- "smallest real job": the same with the unpatched worker and a real 1-epoch `cnn` on `digits` job (full
  mode only unless --with-real in --quick; it is dominated by training, not by the queue).

Hand-written (the target's baseline): bench/handwritten_celery.py — a Celery task with the platform's broker
settings and a concurrency-1 prefork worker (two of them in the 2-worker rows, as on the platform side) that
claims the job row (one `UPDATE ... RETURNING` with its event), creates the MLflow run in the platform's
experiment (id cached per process) with the platform's tags and the spec as params, marks it FINISHED, and writes
the SUCCEEDED row with its event; submitted from this process by one `INSERT ... RETURNING` of the job row and
its event (bench/handwritten.py) and `send_task`. Its own database: the platform's schema without the history
trigger. The same spec (as the platform stores it) and the same MLflow store.

Bare (information): N `bench.noop` tasks sent with the same broker settings to a concurrency-1 bare Celery
worker on the same Redis (bench/bare_celery.py); the clock runs from the first send until the N-th task has
counted itself in Redis.

At least 100 jobs a repetition on every row (--quick too), after 10 warm-up jobs a side (20 before the 2-worker
rows, whose second workers are new), not recorded. Where the time goes is read from the job rows of each
side (claim → SUCCEEDED, SUCCEEDED → next claim, time spent waiting in the queue); when a target is missed,
both sides' per-job work also runs in this process, timed, and the platform's under cProfile.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import statistics
import sys
import time

import redis
from celery import Celery
from sqlalchemy import create_engine, func, select

import handwritten
import harness
import profiling
import stack

MEASURE = "06 queue throughput"
JOBS = 100  # a repetition, every row
WARM_JOBS = 10  # a side, before the clock runs
SPEC = {"kind": "train", "dataset": "digits", "architecture": "cnn", "register": False, "params": {"epochs": 1}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--with-real", action="store_true", help="also measure the smallest real job in --quick")
    parser.add_argument("--jobs", type=int, default=JOBS, help=f"no-op jobs a repetition (at least {JOBS})")
    args = harness.parse_args(parser=parser)
    noop_jobs = max(args.jobs, JOBS)
    real_jobs = 2 if args.quick else 4
    with stack.temp_dir() as tmp, stack.postgres_database() as db_url, stack.postgres_database() as hw_db_url, \
            stack.redis_database() as broker_url, stack.Processes(tmp) as procs:
        settings = stack.platform_settings(tmp / "data", database_url=db_url, broker_url=broker_url, queue="cpu")
        stack.prepare_platform(settings)
        handwritten.drop_history_trigger(hw_db_url)
        env = stack.settings_env(settings)
        hw_env = {**env, "BENCH_BROKER_URL": broker_url, "BENCH_HW_DATABASE_URL": hw_db_url}
        bare_worker = procs.start("bare-worker", [sys.executable, "-m", "celery", "-A", "bare_celery", "worker",
                                                  "--queues=bare", "--concurrency=1", "--loglevel=INFO",
                                                  "--hostname=bare@%h"], {**env, "BENCH_BROKER_URL": broker_url})

        def noop_worker(index: int):
            return procs.start(f"noop-worker-{index}", [sys.executable, str(stack.BENCH_DIR / "noop_engine_worker.py"),
                                                        "worker", "--queues=cpu.noop", "--loglevel=INFO",
                                                        f"--hostname=noop{index}@%h"], env)

        def hw_worker(index: int):
            return procs.start(f"handwritten-worker-{index}", [
                sys.executable, "-m", "celery", "-A", "handwritten_celery", "worker", "--queues=hw",
                "--concurrency=1", "--loglevel=INFO", f"--hostname=handwritten{index}@%h"], hw_env)

        started = [noop_worker(1), hw_worker(1)]
        for proc in (*started, bare_worker):
            proc.wait_for_log(" ready.", timeout=180)

        from trainyard import jobs
        from trainyard.config import Settings
        from trainyard.db import Database
        from trainyard.models import Job, JobStatus
        from trainyard.queueing import CeleryDispatch, celery_config
        from trainyard.specs import JobSpec

        db = Database(db_url)
        dispatch = CeleryDispatch(settings)
        engine = create_engine(db_url)
        hw_engine = create_engine(hw_db_url)
        hw_conn = handwritten.connect(hw_db_url)
        hw_celery = Celery("bench-handwritten-client")
        hw_celery.conf.update(celery_config(Settings(broker_url=broker_url, database_url="sqlite://", queue="hw")))
        from bare_celery import app as bare_app

        bare_app.conf.broker_url = broker_url
        r = redis.Redis.from_url(broker_url)
        # Both sides store (and log to MLflow as params) the same spec: the platform's, as it stores it.
        stored_spec = JobSpec.model_validate({**SPEC, "resources": {"queue": "hw"}}).model_dump(mode="json")
        runs: dict[str, list[list[int]]] = {}  # side → the job ids of each run, for where the time goes

        def wait_succeeded(eng, ids: list[int], timeout: float) -> None:
            deadline = time.monotonic() + timeout
            with eng.connect() as conn:
                while True:
                    counts = dict(conn.execute(select(Job.status, func.count()).where(Job.id.in_(ids))
                                               .group_by(Job.status)).all())
                    if counts.get(JobStatus.SUCCEEDED, 0) == len(ids):
                        return
                    if counts.get(JobStatus.FAILED) or time.monotonic() > deadline:
                        raise RuntimeError(f"jobs did not all succeed: {counts}")
                    conn.rollback()
                    time.sleep(0.005)

        def platform_jobs(queue: str, count: int, params: dict, timeout: float, side: str):
            spec = JobSpec.model_validate({**SPEC, "resources": {"queue": queue}, "params": params})

            def run() -> float:
                t0 = time.perf_counter()
                ids = [jobs.submit_job(db, spec, dispatch, settings=settings, owner="bench").id for _ in range(count)]
                wait_succeeded(engine, ids, timeout)
                runs.setdefault(side, []).append(ids)
                return count / (time.perf_counter() - t0)
            return run

        def handwritten_jobs(count: int, side: str):
            def run() -> float:
                t0 = time.perf_counter()
                ids = []
                for _ in range(count):
                    job = handwritten.insert_job(hw_conn, stored_spec, owner="bench", queue="hw")
                    hw_celery.send_task("handwritten.run_job", args=[job["id"]], queue="hw", priority=4, retry=True,
                                        retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})
                    ids.append(job["id"])
                wait_succeeded(hw_engine, ids, 600)
                runs.setdefault(side, []).append(ids)
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

        def warm(*sides) -> None:
            """A few jobs a side, not recorded: each worker's pool process imports, connects and opens the MLflow
            store before the clock runs (a platform pool process renewed later pays that again, on the clock)."""
            for side in sides:
                side()
            runs.pop("warm", None)

        hand1 = f"no-op jobs/s, 1 worker: real engine vs hand-written Celery + SQL + MlflowClient ({noop_jobs} jobs/rep)"
        bare1 = f"no-op jobs/s, 1 worker: real engine vs bare Celery no-op tasks (information; {noop_jobs} jobs/rep)"
        hand2 = f"no-op jobs/s, 2 workers: real engine vs hand-written Celery + SQL + MlflowClient ({noop_jobs} jobs/rep)"
        warm(platform_jobs("cpu.noop", WARM_JOBS, {"epochs": 1}, 600, "warm"), handwritten_jobs(WARM_JOBS, "warm"),
             bare_tasks(WARM_JOBS))
        one = harness.compare_many(MEASURE, platform_jobs("cpu.noop", noop_jobs, {"epochs": 1}, 600, "platform-1"),
                                   {hand1: handwritten_jobs(noop_jobs, "handwritten-1"), bare1: bare_tasks(noop_jobs)},
                                   repeats=args.repeats, unit="jobs/s", higher_is_better=True, warmup=0,
                                   names={hand1: "hand-written, 1 worker", bare1: "bare Celery, 1 worker"})
        started += [noop_worker(2), hw_worker(2)]
        for proc in started[2:]:
            proc.wait_for_log(" ready.", timeout=180)
        # 2 × the warm-up jobs, so that both new workers get some (each takes the next message when idle)
        warm(platform_jobs("cpu.noop", 2 * WARM_JOBS, {"epochs": 1}, 600, "warm"),
             handwritten_jobs(2 * WARM_JOBS, "warm"))
        two = harness.compare_many(MEASURE, platform_jobs("cpu.noop", noop_jobs, {"epochs": 1}, 600, "platform-2"),
                                   {hand2: handwritten_jobs(noop_jobs, "handwritten-2")},
                                   repeats=args.repeats, unit="jobs/s", higher_is_better=True, warmup=0,
                                   names={hand2: "hand-written, 2 workers"})

        timings = {side: job_timings(engine if side.startswith("platform") else hw_engine, ids)
                   for side, ids in runs.items()}
        print("\n-- where the time goes, from the job rows (medians over the recorded runs, ms):")
        for side, figures in timings.items():
            print(f"   {side:14s} " + "  ".join(f"{k} {v:.1f}" for k, v in figures.items()))
        missed = []
        for result, (plat, hand) in ((one[hand1], ("platform-1", "handwritten-1")),
                                     (two[hand2], ("platform-2", "handwritten-2"))):
            result.extra.update({f"platform_{k}": round(v, 1) for k, v in timings[plat].items()})
            result.extra.update({f"handwritten_{k}": round(v, 1) for k, v in timings[hand].items()})
            if result.ratio < 0.7:
                missed.append(result)
        if missed:
            split = where_time_goes(settings, hw_db_url, broker_url, stored_spec, n=20 if args.quick else 100)
            for result in missed:
                result.extra.update(split)
        for result in (one[hand1], two[hand2]):
            met = result.ratio >= 0.7
            note = ("real engine with the train body replaced by a no-op (no no-op job kind exists); an MLflow run "
                    "per job on both sides")
            if not met:
                note += (f"; reaches {result.ratio:.3f} of hand-written; per job in-process: platform "
                         f"{result.extra['inproc_platform_ms']:.1f} ms ({result.extra['inproc_platform_cpu_ms']:.1f} "
                         f"CPU), hand-written {result.extra['inproc_handwritten_ms']:.1f} ms "
                         f"({result.extra['inproc_handwritten_cpu_ms']:.1f} CPU)")
            harness.report(result, "≥ 0.7 of hand-written", met, note)
        bare = one[bare1]
        harness.report(bare, "information (was ≥ 0.5 of bare)", None,
                       f"bare Celery no-op: no database, no MLflow; {bare.ratio:.3f} of it", information=True)

        if not args.quick or args.with_real:
            procs.platform_worker(settings, queues="cpu.real")
            real = harness.compare(MEASURE, f"smallest real job: cnn/digits 1 epoch ({real_jobs} jobs/rep)",
                                   platform_jobs("cpu.real", real_jobs, {"epochs": 1, "batch_size": 64}, 900, "real"),
                                   bare_tasks(noop_jobs), repeats=args.repeats, unit="jobs/s",
                                   higher_is_better=True, warmup=0)
            harness.report(real, "context only (vs bare Celery)", None,
                           "a real training job, not a no-op: shown for scale", information=True)
        dispatch.close()
        db.dispose()
        engine.dispose()
        hw_engine.dispose()
        hw_conn.close()
    return 0


def job_timings(eng, id_runs: list[list[int]]) -> dict[str, float]:
    """Over the jobs of the given runs: the time per job from a run's first claim to its last SUCCEEDED (the
    workers' throughput without the submitting), medians of queued (created → claimed), claim → SUCCEEDED, and SUCCEEDED →
    the same worker process's next claim when that job was already waiting (and the longest such gap: a pool
    process being replaced shows there); and how many pool processes ran a run's jobs (the RUNNING event
    names the process)."""
    from trainyard.models import Job, JobEvent

    queued, in_task, between, processes, cycles = [], [], [], [], []
    with eng.connect() as conn:
        for ids in id_runs:
            ran_by = dict(conn.execute(select(JobEvent.job_id, JobEvent.message).where(
                JobEvent.job_id.in_(ids), JobEvent.to_status == "RUNNING")).all())
            by_process: dict[str, list] = {}
            for job_id, created, start, finish in conn.execute(
                    select(Job.id, Job.created_at, Job.started_at, Job.finished_at).where(Job.id.in_(ids))
                    .order_by(Job.started_at)).all():
                queued.append((start - created).total_seconds())
                in_task.append((finish - start).total_seconds())
                by_process.setdefault(ran_by.get(job_id, ""), []).append((created, start, finish))
            processes.append(len(by_process))
            starts = sorted(start for seq in by_process.values() for _, start, _ in seq)
            ends = sorted(finish for seq in by_process.values() for _, _, finish in seq)
            cycles.append((ends[-1] - starts[0]).total_seconds() / len(ids))
            for seq in by_process.values():
                between.extend((seq[i + 1][1] - seq[i][2]).total_seconds() for i in range(len(seq) - 1)
                               if seq[i + 1][0] < seq[i][2])  # the next job was already waiting
    out = {"job_cycle_ms": 1000 * statistics.median(cycles),  # first claim → last SUCCEEDED, per job
           "queued_ms": 1000 * statistics.median(queued), "claim_to_succeeded_ms": 1000 * statistics.median(in_task),
           "slowest_claim_to_succeeded_ms": 1000 * max(in_task)}
    if between:
        out.update(succeeded_to_next_claim_ms=1000 * statistics.median(between), longest_gap_ms=1000 * max(between))
    out["pool_processes_per_run"] = max(processes)
    return out


def where_time_goes(settings, hw_db_url: str, broker_url: str, stored_spec: dict, *, n: int) -> dict:
    """Each side's per-job work in this process, no Celery, on jobs submitted to a queue no worker reads: the
    platform's engine.run_job (train body a no-op, followed by the gc.collect + gc.freeze its Celery task does)
    vs the hand-written task's body. Wall and CPU ms per job; the platform's under cProfile. Printed; the
    figures are returned for the JSON."""
    os.environ.update(BENCH_HW_DATABASE_URL=hw_db_url, BENCH_BROKER_URL=broker_url,
                      TRAINYARD_MLFLOW_TRACKING_URI=settings.mlflow_tracking_uri)
    import handwritten_celery
    from trainyard import jobs
    from trainyard.db import Database
    from trainyard.specs import JobSpec
    from trainyard_workers import engine as worker_engine
    from noop_engine_worker import noop_job

    worker_engine.JOB_KINDS["train"] = noop_job  # in this process only
    ctx = worker_engine.WorkerContext(settings)
    db = Database(settings.database_url)
    spec = JobSpec.model_validate({**SPEC, "resources": {"queue": "bench-inproc"}})
    hw_conn = handwritten.connect(hw_db_url)

    def platform_job() -> None:
        job_id = jobs.submit_job(db, spec, lambda *_: None, settings=settings, owner="bench").id
        t = time.perf_counter(), time.process_time()
        worker_engine.run_job(ctx, job_id, worker_name="inproc@bench")
        gc.collect()
        gc.freeze()
        return time.perf_counter() - t[0], time.process_time() - t[1]

    def handwritten_job() -> None:
        job_id = handwritten.insert_job(hw_conn, stored_spec, owner="bench", queue="bench-inproc")["id"]
        t = time.perf_counter(), time.process_time()
        handwritten_celery.run_job.run(job_id)
        return time.perf_counter() - t[0], time.process_time() - t[1]

    per_job = {}
    for name, one in (("platform", platform_job), ("handwritten", handwritten_job)):
        for _ in range(5):
            one()
        spent = [one() for _ in range(n)]
        per_job[name] = (1000 * statistics.median(w for w, _ in spent), 1000 * statistics.median(c for _, c in spent))
    profile = cProfile.Profile()
    for _ in range(n):
        job_id = jobs.submit_job(db, spec, lambda *_: None, settings=settings, owner="bench").id
        profile.enable()
        worker_engine.run_job(ctx, job_id, worker_name="inproc@bench")
        gc.collect()
        gc.freeze()
        profile.disable()
    print(f"\n-- where the time goes: one no-op job's work in this process, no Celery, median of {n} "
          "(wall / CPU ms per job)")
    for name, (wall, cpu) in per_job.items():
        print(f"   {name:12s} {wall:8.2f} ms wall  {cpu:8.2f} ms CPU")
    print(profiling.profile_summary(profile, n, "trainyard"))
    db.dispose()
    hw_conn.close()
    return {"inproc_platform_ms": round(per_job["platform"][0], 2), "inproc_platform_cpu_ms": round(per_job["platform"][1], 2),
            "inproc_handwritten_ms": round(per_job["handwritten"][0], 2),
            "inproc_handwritten_cpu_ms": round(per_job["handwritten"][1], 2)}


if __name__ == "__main__":
    sys.exit(main())
