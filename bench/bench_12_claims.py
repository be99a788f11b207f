"""Measure 12, claim contention: 64 claimers draining one queue's backlog at once, each job claimed exactly once.

PostgreSQL (a database migrated by the platform's own migrations, so the job triggers of migration 0007 run on
both sides): 5,000 QUEUED jobs in a queue of their own (priorities low/normal/high mixed), inserted with
the triggers on (each gets its submitted event and its tally). 64 threads, released together, each claim
until a claim returns None; one repetition's value is claims/s (5,000 / wall time from release to the last
thread's end). Connections are opened before the clock starts and closed after, on both sides.

- platform: `trainyard.leases.claim_job(db, <a job of the queue>, worker, 60, most_urgent=True)`, one
  `trainyard.db.Database` shared by the 64 threads (a pool of 64 connections, as 64 worker processes would
  each hold one);
- baseline: the UPDATE a competent engineer writes by hand, through one raw psycopg autocommit connection
  per thread (psycopg's defaults, so it is prepared server-side after 5 executions; the platform prepares
  nothing, for PgBouncer): `UPDATE job SET status='RUNNING', <the same columns the platform sets> WHERE
  id = (SELECT id FROM job WHERE queue=%s AND status='QUEUED' ORDER BY priority DESC, id LIMIT 1 FOR UPDATE
  SKIP LOCKED) RETURNING id`.

The ratio is platform/baseline throughput, target ≥ 0.7. For information, a third side runs the same
hand-written UPDATE with the job triggers off (`SET session_replication_role = replica`: no tallies, no
history), which shows what the triggers of migration 0007 cost a claim under contention. Checked on every repetition of both sides: every
job of the queue is RUNNING with attempt 1 and has exactly one QUEUED→RUNNING event, no id was returned
twice, and no claim returned None while more than 63 jobs (threads − 1, the most the other claims can hold
locked) were still QUEUED (after each None the QUEUED rows are counted at once).

SQLite (the embedded default, one writer at a time): the platform's claim from 4 threads draining 1,000
jobs; its throughput and the same exactly-once check, beside a bare `sqlite3` UPDATE (no SKIP LOCKED in
SQLite: `… WHERE id = (SELECT … LIMIT 1) AND status = 'QUEUED' RETURNING id`) for information.
"""

from __future__ import annotations

import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
from sqlalchemy import text

import harness
import stack

MEASURE = "12 claim contention"
PG_THREADS, PG_JOBS = 64, 5_000
SQLITE_THREADS, SQLITE_JOBS = 4, 1_000
LEASE_SECONDS = 60

SPEC = {"kind": "train", "dataset": "digits", "architecture": "cnn", "params": {"epochs": 2}}

# The platform's columns on a claim (leases.claim_job), written out by hand.
BARE_PG_CLAIM = (
    "UPDATE job SET status = 'RUNNING', status_reason = %(reason)s, attempt = attempt + 1, lease_owner = %(owner)s, "
    "lease_expires_at = now() + make_interval(secs => %(lease)s), started_at = now(), error = NULL, "
    "updated_at = now() WHERE id = (SELECT id FROM job WHERE queue = %(queue)s AND status = 'QUEUED' "
    "ORDER BY priority DESC, id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id")
BARE_SQLITE_CLAIM = (
    "UPDATE job SET status = 'RUNNING', status_reason = :reason, attempt = attempt + 1, lease_owner = :owner, "
    "lease_expires_at = :expires, started_at = :now, error = NULL, updated_at = :now "
    "WHERE id = (SELECT id FROM job WHERE queue = :queue AND status = 'QUEUED' ORDER BY priority DESC, id LIMIT 1) "
    "AND status = 'QUEUED' RETURNING id")


@dataclass
class Drain:
    """What one repetition saw."""

    queue: str
    first_id: int
    last_id: int
    claimed: list[int] = field(default_factory=list)
    queued_at_none: list[int] = field(default_factory=list)  # QUEUED rows counted right after each None
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Tally:
    """Every repetition's checks, per side."""

    runs: int = 0
    failures: list[str] = field(default_factory=list)
    nones: int = 0
    early_nones: int = 0
    max_queued_at_none: int = 0


def libpq_url(sqlalchemy_url: str) -> str:
    return sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://", 1)


def seed_queue(db, queue: str, count: int) -> tuple[int, int]:
    """`count` QUEUED jobs in `queue` (priority = id mod 3), inserted with the triggers on; their id range."""
    import json

    from trainyard.specs import JobSpec

    from trainyard.models import utcnow

    spec = json.dumps(JobSpec.model_validate(SPEC).model_dump(mode="json"))
    if db.dialect == "postgresql":
        series = "generate_series(1, :count) AS g(i)"
        now, spec_value = "now()", "CAST(:spec AS json)"
    else:
        series = ("(WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < :count) "
                  "SELECT i FROM s) AS g")
        now, spec_value = ":now", ":spec"  # the format SQLAlchemy stores a DateTime in on SQLite
    with db.session_scope() as s:
        s.execute(text(
            f"INSERT INTO job (kind, name, status, status_reason, dataset, architecture, spec, queue, priority, "
            f"attempt, max_attempts, cancel_requested, progress, metrics, owner, created_at, updated_at) "
            f"SELECT 'train', 'cnn-digits-' || g.i, 'QUEUED', 'submitted by bench', 'digits', 'cnn', {spec_value}, "
            f":queue, g.i % 3, 0, 3, false, '{{\"epoch\": 0, \"epochs\": 2}}', '{{}}', 'bench', {now}, {now} "
            f"FROM {series} ORDER BY g.i"),
            {"count": count, "queue": queue, "spec": spec, "now": utcnow().strftime("%Y-%m-%d %H:%M:%S.%f")})
        lo, hi, n = s.execute(text("SELECT min(id), max(id), count(*) FROM job WHERE queue = :queue"),
                              {"queue": queue}).one()
    if n != count or hi - lo + 1 != count:
        raise RuntimeError(f"seeded {n} jobs in {queue} over ids {lo}..{hi}, wanted {count}")
    return lo, hi


def check(db, drain: Drain, count: int, threads: int, tally: Tally, side: str, *, events: bool = True) -> None:
    """Exactly once, no early None; failures are recorded (the run goes on, the row reports them). Without
    `events` (a side that ran with the triggers off) the history is not looked at."""
    problems = list(drain.errors[:3])
    if len(drain.claimed) != count:
        problems.append(f"{len(drain.claimed)} claims returned a job, wanted {count}")
    if len(set(drain.claimed)) != len(drain.claimed):
        problems.append(f"{len(drain.claimed) - len(set(drain.claimed))} ids returned twice")
    with db.read_scope() as s:
        running = s.execute(text("SELECT count(*) FROM job WHERE queue = :q AND status = 'RUNNING' AND attempt = 1"),
                            {"q": drain.queue}).scalar_one()
        left = s.execute(text("SELECT count(*) FROM job WHERE queue = :q AND status <> 'RUNNING'"),
                         {"q": drain.queue}).scalar_one()
        once, more = s.execute(text(
            "SELECT sum(CASE WHEN c = 1 THEN 1 ELSE 0 END), sum(CASE WHEN c > 1 THEN 1 ELSE 0 END) FROM "
            "(SELECT job_id, count(*) AS c FROM job_event WHERE job_id BETWEEN :lo AND :hi "
            "AND from_status = 'QUEUED' AND to_status = 'RUNNING' GROUP BY job_id) AS e"),
            {"lo": drain.first_id, "hi": drain.last_id}).one()
    if running != count or left:
        problems.append(f"{running} RUNNING with attempt 1 and {left} in another state, wanted {count} and 0")
    if events and ((once or 0) != count or more):
        problems.append(f"{once or 0} jobs with exactly one QUEUED→RUNNING event, {more or 0} with more")
    early = [n for n in drain.queued_at_none if n > threads - 1]
    if early:
        problems.append(f"{len(early)} claims returned None with up to {max(early)} jobs still QUEUED")
    tally.runs += 1
    tally.nones += len(drain.queued_at_none)
    tally.early_nones += len(early)
    tally.max_queued_at_none = max([tally.max_queued_at_none, *drain.queued_at_none])
    if problems:
        tally.failures.append(f"{side} {drain.queue}: " + "; ".join(problems))
        print(f"  !! {side} {drain.queue}: " + "; ".join(problems), flush=True)


def drain(threads: int, claim_fns: list[Callable[[], int | None]], count_queued: Callable[[int], int],
          result: Drain) -> None:
    """Run `threads` claimers, released together, each claiming until None; fills `result`."""
    barrier = threading.Barrier(threads + 1)
    lock = threading.Lock()

    def claimer(index: int) -> None:
        mine: list[int] = []
        try:
            barrier.wait()
            while True:
                job_id = claim_fns[index]()
                if job_id is None:
                    queued = count_queued(index)
                    with lock:
                        result.queued_at_none.append(queued)
                    break
                mine.append(job_id)
        except Exception as exc:  # recorded; the check reports it
            with lock:
                result.errors.append(f"thread {index}: {type(exc).__name__}: {exc}"[:300])
        finally:
            with lock:
                result.claimed.extend(mine)

    workers = [threading.Thread(target=claimer, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    result.seconds = time.perf_counter() - t0


def warm_pool(db, threads: int) -> None:
    """Open the pool's connections (all at once: each thread holds one until every thread has one)."""
    barrier = threading.Barrier(threads)

    def hold() -> None:
        with db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            barrier.wait()

    workers = [threading.Thread(target=hold) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def postgres_sides(url: str, repeats: int) -> tuple[harness.Result, harness.Result, dict[str, Tally]]:
    """The platform, the hand-written claim, and (information) the hand-written claim with the job triggers
    off; returns (platform vs hand-written, platform vs triggers off, tallies by side)."""
    from trainyard import leases
    from trainyard.db import Database

    admin = Database(url, pool_size=2, max_overflow=0)  # seeding and checks
    tallies = {"platform": Tally(), "baseline": Tally(), "no-triggers": Tally()}
    runs = {side: 0 for side in tallies}

    def new_drain(side: str) -> Drain:
        runs[side] += 1
        queue = f"drain.{side}.{runs[side]}"
        lo, hi = seed_queue(admin, queue, PG_JOBS)
        return Drain(queue, lo, hi)

    def platform() -> float:
        result = new_drain("platform")
        db = Database(url, pool_size=PG_THREADS, max_overflow=0)
        try:
            warm_pool(db, PG_THREADS)

            def claim_fn(index: int) -> Callable[[], int | None]:
                def claim() -> int | None:
                    job = leases.claim_job(db, result.first_id, f"claimer-{index}@bench", LEASE_SECONDS,
                                         most_urgent=True)
                    return None if job is None else job.id
                return claim

            def count_queued(_index: int) -> int:
                with db.read_scope() as s:
                    return s.execute(text("SELECT count(*) FROM job WHERE queue = :q AND status = 'QUEUED'"),
                                     {"q": result.queue}).scalar_one()

            drain(PG_THREADS, [claim_fn(i) for i in range(PG_THREADS)], count_queued, result)
        finally:
            db.dispose()
        check(admin, result, PG_JOBS, PG_THREADS, tallies["platform"], "platform")
        return PG_JOBS / result.seconds

    def hand_written(side: str, setup: tuple[str, ...] = ()) -> Callable[[], float]:
        def run() -> float:
            result = new_drain(side)
            conns = [psycopg.connect(libpq_url(url), autocommit=True) for _ in range(PG_THREADS)]
            try:
                for conn in conns:
                    for statement in setup:
                        conn.execute(statement)

                def claim_fn(index: int) -> Callable[[], int | None]:
                    conn = conns[index]
                    params = {"reason": f"started on claimer-{index}@bench", "owner": f"claimer-{index}@bench",
                              "lease": LEASE_SECONDS, "queue": result.queue}

                    def claim() -> int | None:
                        row = conn.execute(BARE_PG_CLAIM, params).fetchone()
                        return None if row is None else row[0]
                    return claim

                def count_queued(index: int) -> int:
                    return conns[index].execute("SELECT count(*) FROM job WHERE queue = %s AND status = 'QUEUED'",
                                                (result.queue,)).fetchone()[0]

                drain(PG_THREADS, [claim_fn(i) for i in range(PG_THREADS)], count_queued, result)
            finally:
                for conn in conns:
                    conn.close()
            check(admin, result, PG_JOBS, PG_THREADS, tallies[side], side, events=not setup)
            return PG_JOBS / result.seconds
        return run

    label = f"PostgreSQL, {PG_THREADS} threads draining {PG_JOBS:,} jobs (claims/s): claim_job vs "
    main_label = label + "hand-written UPDATE … FOR UPDATE SKIP LOCKED"
    info_label = (label + "information: the same hand-written UPDATE with the job triggers off "
                  "(session_replication_role = replica: no tallies, no events)")
    try:
        results = harness.compare_many(
            MEASURE, platform, {main_label: hand_written("baseline"),
                                info_label: hand_written("no-triggers", ("SET session_replication_role = replica",))},
            repeats=repeats, unit="claims/s", higher_is_better=True,
            names={main_label: "hand-written", info_label: "hand-written, triggers off"})
    finally:
        admin.dispose()
    return results[main_label], results[info_label], tallies


def sqlite_side(path, repeats: int) -> tuple[harness.Result, Tally, Tally]:
    from datetime import timedelta

    from trainyard import leases
    from trainyard.db import Database, upgrade_schema
    from trainyard.models import utcnow

    url = f"sqlite:///{path}"
    upgrade_schema(url)
    admin = Database(url)
    tallies = {"platform": Tally(), "baseline": Tally()}
    runs = {"platform": 0, "baseline": 0}

    def new_drain(side: str) -> Drain:
        runs[side] += 1
        queue = f"drain.{side}.{runs[side]}"
        lo, hi = seed_queue(admin, queue, SQLITE_JOBS)
        return Drain(queue, lo, hi)

    def platform() -> float:
        result = new_drain("platform")
        db = Database(url, pool_size=SQLITE_THREADS, max_overflow=0)
        try:
            warm_pool(db, SQLITE_THREADS)

            def claim_fn(index: int) -> Callable[[], int | None]:
                def claim() -> int | None:
                    job = leases.claim_job(db, result.first_id, f"claimer-{index}@bench", LEASE_SECONDS,
                                         most_urgent=True)
                    return None if job is None else job.id
                return claim

            def count_queued(_index: int) -> int:
                with db.read_scope() as s:
                    return s.execute(text("SELECT count(*) FROM job WHERE queue = :q AND status = 'QUEUED'"),
                                     {"q": result.queue}).scalar_one()

            drain(SQLITE_THREADS, [claim_fn(i) for i in range(SQLITE_THREADS)], count_queued, result)
        finally:
            db.dispose()
        check(admin, result, SQLITE_JOBS, SQLITE_THREADS, tallies["platform"], "platform")
        return SQLITE_JOBS / result.seconds

    def baseline() -> float:
        result = new_drain("baseline")
        # The platform's connection settings (trainyard.db._sqlite_pragmas), autocommit, one per thread.
        conns = []
        for _ in range(SQLITE_THREADS):
            conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
            for pragma in ("journal_mode=WAL", "busy_timeout=30000", "foreign_keys=ON", "synchronous=NORMAL"):
                conn.execute(f"PRAGMA {pragma}")
            conns.append(conn)
        try:
            def claim_fn(index: int) -> Callable[[], int | None]:
                conn = conns[index]

                def claim() -> int | None:
                    now = utcnow()
                    row = conn.execute(BARE_SQLITE_CLAIM, {
                        "reason": f"started on claimer-{index}@bench", "owner": f"claimer-{index}@bench",
                        "expires": (now + timedelta(seconds=LEASE_SECONDS)).strftime("%Y-%m-%d %H:%M:%S.%f"),
                        "now": now.strftime("%Y-%m-%d %H:%M:%S.%f"), "queue": result.queue}).fetchone()
                    return None if row is None else row[0]
                return claim

            def count_queued(index: int) -> int:
                return conns[index].execute("SELECT count(*) FROM job WHERE queue = ? AND status = 'QUEUED'",
                                            (result.queue,)).fetchone()[0]

            drain(SQLITE_THREADS, [claim_fn(i) for i in range(SQLITE_THREADS)], count_queued, result)
        finally:
            for conn in conns:
                conn.close()
        check(admin, result, SQLITE_JOBS, SQLITE_THREADS, tallies["baseline"], "baseline")
        return SQLITE_JOBS / result.seconds

    try:
        result = harness.compare(MEASURE, f"SQLite, {SQLITE_THREADS} threads draining {SQLITE_JOBS:,} jobs: claim_job "
                                 "vs bare sqlite3 UPDATE (claims/s)",
                                 platform, baseline, repeats=repeats, unit="claims/s", higher_is_better=True)
    finally:
        admin.dispose()
    return result, tallies["platform"], tallies["baseline"]


def describe(tally: Tally) -> str:
    if tally.failures:
        return f"NOT exactly once in {len(tally.failures)} of {tally.runs} runs: {tally.failures[0][:200]}"
    return (f"exactly once in all {tally.runs} runs; {tally.nones} Nones, none early "
            f"(at most {tally.max_queued_at_none} QUEUED at a None)")


def main() -> int:
    args = harness.parse_args(__doc__)
    with stack.temp_dir() as tmp, stack.postgres_database() as url:
        pg, pg_info, pg_tallies = postgres_sides(url, args.repeats)
        lite, lite_platform, lite_baseline = sqlite_side(tmp / "trainyard.db", args.repeats)

    def mark(result: harness.Result, plat: Tally, base: Tally) -> None:
        result.extra["platform_exactly_once"] = "yes" if not plat.failures else "NO"
        result.extra["baseline_exactly_once"] = "yes" if not base.failures else "NO"
        result.extra["early_nones"] = plat.early_nones

    mark(pg, pg_tallies["platform"], pg_tallies["baseline"])
    mark(lite, lite_platform, lite_baseline)
    print()
    pg_met = pg.ratio >= 0.7 and not pg_tallies["platform"].failures
    harness.report(pg, "≥ 0.7 of the hand-written claim's throughput; exactly once", pg_met,
                   f"ratio = platform/hand-written claims/s; platform: {describe(pg_tallies['platform'])}; "
                   f"hand-written: {describe(pg_tallies['baseline'])}")
    harness.report(pg_info, "none (information)", None,
                   f"ratio = platform/triggers-off claims/s: the triggers' row locks on job_tally serialise the "
                   f"claims of a queue; triggers off: {describe(pg_tallies['no-triggers'])} (history not checked)",
                   information=True)
    lite_met = not lite_platform.failures
    harness.report(lite, "exactly once (throughput for information)", lite_met,
                   f"platform {lite.platform_median:.0f} claims/s; platform: {describe(lite_platform)}; "
                   f"bare sqlite3: {describe(lite_baseline)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
