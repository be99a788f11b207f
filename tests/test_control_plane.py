"""The control plane at scale, on real PostgreSQL (and SQLite where it applies): claims under contention,
round trips per operation, the reconciler against a large stale backlog, heartbeats that stay HOT, tallies
that agree with the rows, and reads whose cost does not follow the backlog."""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg import pq
from sqlalchemy import event, func, insert, select, text, update

from trainyard import attempts, job_tallies, jobs, leases, reconciling, worker_registry
from trainyard.datasets import ensure_builtin_datasets
from trainyard.db import Database, upgrade_schema
from trainyard.models import Job, JobEvent, JobStatus, utcnow
from trainyard.specs import JobSpec
from trainyard_web import create_app
from conftest import authed_client, make_settings, redis_queue_messages

SPEC = JobSpec(dataset="digits", architecture="cnn", params={"epochs": 1}).model_dump(mode="json")


def seed_queued(db: Database, count: int, *, queue: str = "cpu", priorities: tuple[int, ...] = (1,),
                waiting_since=None, status: str = "QUEUED") -> list[int]:
    """`count` jobs inserted as the API would store them (the triggers write their events and tallies)."""
    since = waiting_since or utcnow()
    if db.dialect == "postgresql" and count > 5000:  # generated in the server: 100,000 rows in seconds
        with db.read_scope() as s:
            return list(s.scalars(text(
                "INSERT INTO job (kind, name, status, status_reason, dataset, architecture, spec, queue, priority, "
                "attempt, max_attempts, cancel_requested, progress, metrics, created_at, updated_at) "
                "SELECT 'train', 'seed-' || i, :status, 'submitted', 'digits', 'cnn', CAST(:spec AS json), :queue, "
                "(CAST(:priorities AS int[]))[1 + i % :np], 0, 3, false, CAST('{\"epoch\": 0, \"epochs\": 1}' AS json), "
                "CAST('{}' AS json), :since, :since FROM generate_series(0, :n - 1) AS i ORDER BY i RETURNING id"),
                {"status": status, "spec": json.dumps(SPEC), "queue": queue, "priorities": list(priorities),
                 "np": len(priorities), "since": since, "n": count}))
    rows = [{"kind": "train", "name": f"seed-{i}", "status": status, "status_reason": "submitted",
             "dataset": "digits", "architecture": "cnn", "spec": SPEC, "queue": queue,
             "priority": priorities[i % len(priorities)], "attempt": 0, "max_attempts": 3, "cancel_requested": False,
             "progress": {"epoch": 0, "epochs": 1}, "metrics": {}, "created_at": since, "updated_at": since}
            for i in range(count)]
    ids: list[int] = []
    with db.read_scope() as s:
        for start in range(0, count, 5000):
            ids += s.scalars(insert(Job).returning(Job.id, sort_by_parameter_order=True), rows[start:start + 5000])
    return ids


# ---- round trips ------------------------------------------------------------------------------------


class RoundTrips:
    """Counts PostgreSQL round trips (one ReadyForQuery answer each) on every connection an engine checks out,
    from libpq's own protocol trace; keeps the statements for the failure message."""

    FLAGS = pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE

    def __init__(self, engine) -> None:
        self._file = tempfile.NamedTemporaryFile("w+", prefix="pgtrace-", suffix=".log")
        self._pgconns: dict[int, object] = {}
        self._mark = 0
        event.listen(engine, "checkout", self._trace)

    def _trace(self, dbapi_connection, _record, _proxy) -> None:
        pgconn = dbapi_connection.pgconn
        if id(pgconn) not in self._pgconns:
            self._pgconns[id(pgconn)] = pgconn
            pgconn.trace(os.dup(self._file.fileno()))  # libpq writes through a stdio FILE of its own
            pgconn.set_trace_flags(self.FLAGS)

    def _lines(self) -> list[str]:
        # libpq's trace is buffered: close each connection's FILE (flushing it) and open a fresh one.
        for pgconn in self._pgconns.values():
            if pgconn.status == pq.ConnStatus.OK:
                pgconn.untrace()
                pgconn.trace(os.dup(self._file.fileno()))
                pgconn.set_trace_flags(self.FLAGS)
        return Path(self._file.name).read_text().splitlines()

    def start(self) -> None:
        self._mark = len(self._lines())

    def since_start(self) -> tuple[int, list[str]]:
        lines = self._lines()[self._mark:]
        sent = [line.split("\t", 3)[-1][:160] for line in lines if re.match(r"F\t\d+\t(Query|Parse)\t", line)]
        return sum(1 for line in lines if re.match(r"B\t\d+\tReadyForQuery", line)), sent


@pytest.fixture
def pg_settings(tmp_path, postgres, redis_broker_url):
    settings = make_settings(tmp_path, database_url=postgres.create(), broker_url=redis_broker_url)
    upgrade_schema(settings.database_url)
    return settings


def test_round_trips_of_the_hot_paths(pg_settings):
    """Exact counts, so a change that adds a round trip fails here (the issue's ceilings: POST 5, GET 3,
    claim 2, renewal 1). POST: the token, the dataset check, the INSERT (its event and tally by trigger);
    GET: the token, the job with its events (one statement); a claim and a renewal: one statement each, no BEGIN/COMMIT."""
    app = create_app(pg_settings)
    client = authed_client(app, role="member", user="alice")
    trips = RoundTrips(app.extensions["trainyard"].db.engine)
    db = Database(pg_settings.database_url)
    worker_trips = RoundTrips(db.engine)

    def counted(call):
        trips.start()
        worker_trips.start()
        result = call()
        n, sent = trips.since_start()
        m, worker_sent = worker_trips.since_start()
        return result, n + m, sent + worker_sent

    body = {"kind": "train", "dataset": "digits", "architecture": "cnn", "params": {"epochs": 1}}
    client.post("/api/v1/jobs", json=body)  # warm: the token's last-use stamp, the pool's first connection
    client.get("/api/v1/jobs/1")

    response, n, sent = counted(lambda: client.post("/api/v1/jobs", json=body))
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["events"][0]["message"] == "submitted by alice"
    assert n == 3, f"POST /jobs took {n} round trips: {sent}"
    job_id = response.get_json()["id"]
    post_trips = n

    claimed, n, sent = counted(lambda: leases.claim_job(db, job_id, "w1", 60, most_urgent=True))
    assert claimed is not None and claimed.status == "RUNNING"
    assert n == 1, f"a claim took {n} round trips: {sent}"
    claim_trips = n

    state, n, sent = counted(lambda: leases.renew_lease(db, claimed.id, "w1", claimed.attempt, 60,
                                                      progress={"epoch": 1, "epochs": 1}))
    assert state.held
    assert n == 1, f"a lease renewal took {n} round trips: {sent}"

    response, n, sent = counted(lambda: client.get(f"/api/v1/jobs/{claimed.id}"))
    assert response.status_code == 200 and response.get_json()["status"] == "RUNNING"
    assert [e["to_status"] for e in response.get_json()["events"]] == ["QUEUED", "RUNNING"]
    assert n == 2, f"GET /jobs/{{id}} took {n} round trips: {sent}"
    get_trips = n

    queued = client.post("/api/v1/jobs", json=body).get_json()["id"]
    response, n, sent = counted(lambda: client.get(f"/api/v1/jobs/{queued}"))
    assert response.get_json()["waiting"]["jobs_ahead"] == 1  # the first warm-up job is still waiting
    # The job with its events, its place (two capped index counts in one statement) and the pool's worker rows.
    assert n == 4, f"GET /jobs/{{id}} of a queued job took {n} round trips: {sent}"
    print(f"\nround trips: POST /jobs {post_trips}, claim {claim_trips}, lease renewal 1, GET /jobs/{{id}} "
          f"{get_trips}, GET of a queued job {n}")
    db.dispose()


def test_a_read_on_a_connection_the_server_dropped_is_answered(pg_settings):
    """No pre-ping: a GET whose pooled connection died (a restart, an idle timeout) runs again, once."""
    app = create_app(pg_settings)
    client = authed_client(app)
    assert client.get("/api/v1/jobs").status_code == 200
    name = pg_settings.database_url.rsplit("/", 1)[1]
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as admin:
        killed = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s",
                               (name,)).fetchone()[0]
    assert killed >= 1  # the web app's pooled connection
    response = client.get("/api/v1/jobs")
    assert response.status_code == 200, response.get_json()
    # A write is not replayed: it answers 503 (retry later) if its connection was dead, or goes through.
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
    response = client.post("/api/v1/jobs", json={"kind": "train", "dataset": "digits", "architecture": "cnn"})
    assert response.status_code in (201, 503), response.get_json()
    assert client.get("/api/v1/jobs").status_code == 200


# ---- claims under contention ------------------------------------------------------------------------


def drain(db: Database, hint: int, claimers: int) -> tuple[list[int], list[int], float]:
    """`claimers` threads claim until each gets nothing; (claimed ids, QUEUED counts seen after each empty
    claim, seconds)."""
    claimed: list[int] = []
    waiting_after_empty: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(claimers)
    errors: list[BaseException] = []

    def claimer(index: int) -> None:
        try:
            barrier.wait()
            while True:
                job = leases.claim_job(db, hint, f"w{index}", 60, most_urgent=True)
                if job is None:
                    with db.read_scope() as s:
                        left = s.scalar(select(func.count()).select_from(Job).where(Job.status == JobStatus.QUEUED))
                    with lock:
                        waiting_after_empty.append(left)
                    return
                with lock:
                    claimed.append(job.id)
        except BaseException as exc:  # surfaced below: a thread's failure must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(claimers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    return claimed, waiting_after_empty, time.perf_counter() - t0


@pytest.mark.parametrize("backend, claimers, count", [("postgres", 64, 5000), ("sqlite", 8, 600)])
def test_concurrent_claimers_take_every_job_exactly_once(backend, claimers, count, tmp_path, request):
    url = request.getfixturevalue("postgres").create() if backend == "postgres" else \
        f"sqlite:///{tmp_path / 'platform.db'}"
    upgrade_schema(url)
    db = Database(url, pool_size=claimers, max_overflow=4)
    ids = seed_queued(db, count, priorities=(0, 1, 2))

    claimed, waiting_after_empty, seconds = drain(db, ids[0], claimers)

    assert len(claimed) == count and set(claimed) == set(ids), "a job was claimed twice or not at all"
    # An empty answer only once every job left is being taken by another claim in flight.
    assert max(waiting_after_empty) <= (claimers - 1 if backend == "postgres" else 0), waiting_after_empty
    with db.read_scope() as s:
        assert s.scalar(select(func.count()).select_from(Job).where(
            Job.status == JobStatus.RUNNING, Job.attempt == 1)) == count
        starts = Counter(s.scalars(select(JobEvent.job_id).where(JobEvent.to_status == JobStatus.RUNNING)))
    assert set(starts.values()) == {1} and len(starts) == count
    print(f"\n{backend}: {claimers} claimers drained {count} jobs in {seconds:.2f} s "
          f"({count / seconds:,.0f} claims/s); empty claims saw {max(waiting_after_empty)} jobs still queued")
    db.dispose()


def test_claims_take_the_highest_priority_then_the_oldest(db):
    low = seed_queued(db, 3, priorities=(0,))
    normal = seed_queued(db, 3, queue="other", priorities=(1,))  # another queue: never taken from here
    high = seed_queued(db, 2, priorities=(2,))
    taken = [leases.claim_job(db, low[-1], "w", 60, most_urgent=True) for _ in range(6)]
    assert [j.id for j in taken[:5]] == [*high, *low]
    assert taken[5] is None and normal  # the other queue's jobs still wait


# ---- the reconciler against a large backlog ---------------------------------------------------------


def test_reconciler_pass_over_100k_stale_queued_jobs_sends_a_bounded_number(pg_settings):
    from trainyard.queueing import CeleryDispatch

    db = Database(pg_settings.database_url)
    long_ago = utcnow() - timedelta(hours=2)
    seed_queued(db, 100_000, priorities=(0, 1, 2), waiting_since=long_ago)
    seed_queued(db, 20, queue="gpu", waiting_since=long_ago)
    lost = seed_queued(db, 30, queue="gpu", status="RUNNING")
    with db.read_scope() as s:  # 30 jobs whose workers died: their leases ran out a minute ago
        s.execute(update(Job).where(Job.id.in_(lost)).values(attempt=1, lease_owner="dead:1",
                                                             lease_expires_at=utcnow() - timedelta(minutes=1)))
        s.execute(text("ANALYZE job"))
    for name, queues in (("idle-1", ["cpu"]), ("idle-2", ["cpu"]), ("busy", ["cpu"])):
        worker_registry.register_worker(db, name=name, host="h", device="CPU", queues=queues)
    worker_registry.show_current_job(db, "busy", lost[0])
    dispatch = CeleryDispatch(pg_settings)
    wakeups = reconciling.WakeUps()

    t0 = time.perf_counter()
    report = reconciling.reconcile(db, dispatch, wakeups=wakeups, stale_after_seconds=30)
    seconds = time.perf_counter() - t0

    assert sorted(report.requeued) == lost  # each lost lease re-queued, with one message each
    assert report.woken == {"cpu": 2, "gpu": 1}  # one wake-up per idle worker; one where none is registered
    sent = len(redis_queue_messages(pg_settings.broker_url, "cpu")) + \
        len(redis_queue_messages(pg_settings.broker_url, "gpu"))
    assert sent == 30 + 3
    with db.read_scope() as s:
        assert s.scalar(select(func.count()).select_from(Job).where(Job.id.in_(lost),
                                                                     Job.status == JobStatus.QUEUED)) == 30
    again = reconciling.reconcile(db, dispatch, wakeups=wakeups, stale_after_seconds=30)
    assert again.requeued == [] and again.woken == {}  # a queue is woken at most once per resend period
    print(f"\nreconciler pass over 100,050 waiting jobs: {seconds * 1000:.0f} ms, {sent} messages "
          f"(30 re-queued, {sum(report.woken.values())} wake-ups)")
    dispatch.close()
    db.dispose()


# ---- heartbeats ---------------------------------------------------------------------------------------


def test_lease_renewals_are_hot_updates(pg_settings):
    db = Database(pg_settings.database_url)
    seed_queued(db, 200)  # neighbours on the same pages, as in a real table
    job = leases.claim_job(db, seed_queued(db, 1, queue="gpu")[0], "w1", 60)
    name = pg_settings.database_url.rsplit("/", 1)[1]

    def updates() -> tuple[int, int]:
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{name}", autocommit=True) as conn:
            return conn.execute("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
                                "WHERE relname = 'job'").fetchone()

    db.dispose()  # a backend that exits flushes its statistics
    time.sleep(1.5)
    before = updates()
    for epoch in range(500):
        assert leases.renew_lease(db, job.id, "w1", job.attempt, 60, progress={"epoch": epoch, "batch": 3}).held
    db.dispose()
    deadline = time.monotonic() + 30
    while (after := updates())[0] - before[0] < 500 and time.monotonic() < deadline:
        time.sleep(0.5)
    total, hot = after[0] - before[0], after[1] - before[1]
    assert total >= 500
    # With an index on a column the renewal writes, none is HOT. Without, all are on a quiet server (500 of
    # 500 seen here); a snapshot held elsewhere can keep a full page from being pruned and cost a few.
    assert hot / total >= 0.8, f"only {hot} of {total} lease renewals were HOT updates"
    print(f"\n{hot} of {total} lease renewals were HOT")


# ---- tallies and bounded reads ---------------------------------------------------------------------


def test_tallies_follow_every_transition_and_recount_agrees(db, tmp_path):
    ensure_builtin_datasets(db)
    settings = make_settings(tmp_path)
    spec = JobSpec.model_validate(SPEC)
    noop = lambda *_: None  # noqa: E731
    ids = [jobs.submit_job(db, spec, noop, settings=settings).id for _ in range(8)]
    a, b, c, d = (leases.claim_job(db, i, "w", 60) for i in ids[:4])
    attempts.finish_job(db, a.id, a.attempt, {}, {})
    attempts.fail_job(db, b.id, b.attempt, "boom")
    jobs.request_cancel(db, ids[5])
    attempts.release_job(db, c.id, c.attempt, "stopping", noop)
    jobs.retry_job(db, b.id, noop)
    reconciling.reconcile(db, noop, now=utcnow() + timedelta(minutes=2))  # d's lease has run out
    check = job_tallies.check(db)
    assert check.consistent, (check.counted, check.kept)
    assert check.counted[("cpu", "QUEUED")] == 6 and check.counted[("cpu", "SUCCEEDED")] == 1
    with db.read_scope() as s:  # a tally wrong by hand is put right by a recount
        s.execute(text("UPDATE job_tally SET n = n + 5 WHERE status = 'QUEUED'"))
    assert not job_tallies.check(db).consistent
    assert job_tallies.recount(db).consistent
    history = jobs.get_job(db, d.id).events
    assert [(e.from_status, e.to_status, e.attempt) for e in history] == [
        (None, "QUEUED", 0), ("QUEUED", "RUNNING", 1), ("RUNNING", "QUEUED", 1)]


def test_a_queued_jobs_place_is_counted_up_to_a_cap(db):
    ids = seed_queued(db, worker_registry.AHEAD_CAP + 50, priorities=(1,))
    urgent = seed_queued(db, 1, priorities=(2,))[0]
    assert worker_registry.queue_wait(db, urgent, stale_after_seconds=30).jobs_ahead == 0
    near = worker_registry.queue_wait(db, ids[10], stale_after_seconds=30)
    assert (near.jobs_ahead, near.jobs_ahead_capped) == (11, False)  # ten older, one of higher priority
    far = worker_registry.queue_wait(db, ids[-1], stale_after_seconds=30)
    assert far.jobs_ahead == worker_registry.AHEAD_CAP and far.jobs_ahead_capped
    assert far.message.startswith("1,000+ jobs ahead of it in queue cpu")
