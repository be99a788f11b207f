"""The jobs service's state machine on SQLite and PostgreSQL, with a real Redis broker."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import select

from trainyard import attempts, jobs, leases, reconciling
from trainyard.config import Settings
from trainyard.datasets import ensure_builtin_datasets
from trainyard.errors import Conflict, InvalidSpec, NotFound
from trainyard.models import Job, utcnow
from trainyard.queueing import CeleryDispatch
from trainyard.specs import JobSpec
from conftest import redis_queue_messages

SPEC = JobSpec(dataset="digits", architecture="cnn", params={"epochs": 2})


@pytest.fixture
def settings(tmp_path, redis_broker_url):
    return Settings(data_dir=tmp_path, broker_url=redis_broker_url)


@pytest.fixture
def dispatch(settings):
    d = CeleryDispatch(settings)
    yield d
    d.close()


@pytest.fixture
def platform_db(db):
    ensure_builtin_datasets(db)
    return db


def queue_length(dispatch: CeleryDispatch) -> int:
    return len(redis_queue_messages(dispatch.app.conf.broker_url))


def test_message_is_sent_only_after_the_row_is_committed(platform_db, dispatch, settings):
    seen = {}

    def dispatch_and_look(job_id: int, queue: str, priority: int) -> None:
        # A separate session must already see the job: the message never outruns the commit.
        with platform_db.session_scope() as s:
            seen["status"] = s.scalar(select(Job.status).where(Job.id == job_id))
        dispatch(job_id, queue, priority)

    job = jobs.submit_job(platform_db, SPEC, dispatch_and_look, settings=settings)
    assert seen["status"] == "QUEUED"
    assert queue_length(dispatch) == 1
    assert job.name == "cnn-digits" and job.events[0].message == "submitted"


def test_claim_is_compare_and_set(platform_db, dispatch, settings):
    job = jobs.submit_job(platform_db, SPEC, dispatch, settings=settings)
    first = leases.claim_job(platform_db, job.id, "w1", 30)
    assert first is not None and first.status == "RUNNING" and first.attempt == 1 and first.lease_owner == "w1"
    assert first.lease_expires_at > utcnow() + timedelta(seconds=20)
    assert leases.claim_job(platform_db, job.id, "w2", 30) is None  # a second delivery does nothing
    assert [(e.from_status, e.to_status, e.attempt) for e in jobs.get_job(platform_db, job.id).events] == [
        (None, "QUEUED", 0), ("QUEUED", "RUNNING", 1)]


def test_concurrent_claims_have_one_winner(platform_db, dispatch, settings):
    job = jobs.submit_job(platform_db, SPEC, dispatch, settings=settings)
    barrier = threading.Barrier(8)
    winners = []

    def claim(name: str) -> None:
        barrier.wait()
        if leases.claim_job(platform_db, job.id, name, 30) is not None:
            winners.append(name)

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    final = jobs.get_job(platform_db, job.id)
    assert final.attempt == 1 and final.lease_owner == winners[0]
    assert sum(e.to_status == "RUNNING" for e in final.events) == 1


def test_lease_renewal_progress_and_cancel_flag(platform_db, dispatch, settings):
    job = leases.claim_job(platform_db, jobs.submit_job(platform_db, SPEC, dispatch, settings=settings).id, "w1", 30)
    state = leases.renew_lease(platform_db, job.id, "w1", job.attempt, 30, progress={"epoch": 1, "epochs": 2})
    assert state.held and not state.cancel_requested
    assert jobs.get_job(platform_db, job.id).progress == {"epoch": 1, "epochs": 2}
    assert not leases.renew_lease(platform_db, job.id, "intruder", job.attempt, 30).held
    cancelled = jobs.request_cancel(platform_db, job.id)
    assert cancelled.status == "RUNNING" and cancelled.cancel_requested
    assert leases.renew_lease(platform_db, job.id, "w1", job.attempt, 30).cancel_requested
    assert jobs.request_cancel(platform_db, job.id).cancel_requested  # asking twice is harmless
    assert attempts.mark_cancelled(platform_db, job.id, job.attempt)
    final = jobs.get_job(platform_db, job.id)
    assert final.status == "CANCELLED" and final.lease_owner is None and final.finished_at
    assert [e.message for e in final.events][-2:] == ["cancel requested", "cancelled by request"]


def test_outcomes_are_guarded_by_attempt(platform_db, dispatch, settings):
    job = leases.claim_job(platform_db, jobs.submit_job(platform_db, SPEC, dispatch, settings=settings).id, "w1", 30)
    assert not attempts.finish_job(platform_db, job.id, job.attempt + 1, {"val_accuracy": 1.0}, {})  # stale attempt
    assert attempts.finish_job(platform_db, job.id, job.attempt, {"val_accuracy": 0.97}, {"epoch": 2, "epochs": 2})
    assert not attempts.fail_job(platform_db, job.id, job.attempt, "late failure")  # already finished
    final = jobs.get_job(platform_db, job.id)
    assert final.status == "SUCCEEDED" and final.metrics == {"val_accuracy": 0.97} and final.error is None
    with pytest.raises(Conflict, match="already SUCCEEDED"):
        jobs.request_cancel(platform_db, job.id)


def test_failure_records_the_error(platform_db, dispatch, settings):
    job = leases.claim_job(platform_db, jobs.submit_job(platform_db, SPEC, dispatch, settings=settings).id, "w1", 30)
    assert attempts.fail_job(platform_db, job.id, job.attempt, "RuntimeError: boom\n\ntraceback...")
    final = jobs.get_job(platform_db, job.id)
    assert final.status == "FAILED" and final.error.startswith("RuntimeError: boom")
    assert final.events[-1].message == "RuntimeError: boom"


def test_unknown_dataset_and_job(platform_db, dispatch, settings):
    with pytest.raises(InvalidSpec, match="No dataset named 'mnist'"):
        jobs.submit_job(platform_db, SPEC.model_copy(update={"dataset": "mnist"}), dispatch, settings=settings)
    assert queue_length(dispatch) == 0
    with pytest.raises(NotFound):
        jobs.get_job(platform_db, 12345)
    with pytest.raises(NotFound):
        jobs.request_cancel(platform_db, 12345)


def running_job(db, dispatch, settings, lease_seconds: float = 30):
    job = jobs.submit_job(db, SPEC, dispatch, settings=settings)
    return leases.claim_job(db, job.id, "w1", lease_seconds)


def test_reconciler_requeues_expired_leases_and_spares_live_ones(platform_db, dispatch, settings):
    lost = running_job(platform_db, dispatch, settings)
    alive = running_job(platform_db, dispatch, settings)
    later = utcnow() + timedelta(seconds=31)
    leases.renew_lease(platform_db, alive.id, "w1", alive.attempt, 60)  # a late heartbeat keeps it
    sent = queue_length(dispatch)
    assert reconciling.requeue_lost_jobs(platform_db, dispatch, now=later) == [lost.id]
    assert queue_length(dispatch) == sent + 1
    requeued = jobs.get_job(platform_db, lost.id)
    assert requeued.status == "QUEUED" and requeued.lease_owner is None and requeued.attempt == 1
    assert requeued.events[-1].message.startswith("lease expired (worker w1 lost)")
    assert jobs.get_job(platform_db, alive.id).status == "RUNNING"
    again = leases.claim_job(platform_db, lost.id, "w2", 30)
    assert again.attempt == 2  # the next claim is a new attempt


def test_reconciler_fails_jobs_out_of_attempts_and_honours_cancel(platform_db, dispatch, settings):
    spent = jobs.submit_job(platform_db, SPEC.model_copy(update={"max_attempts": 1}), dispatch, settings=settings)
    leases.claim_job(platform_db, spent.id, "w1", 30)
    cancelled = running_job(platform_db, dispatch, settings)
    jobs.request_cancel(platform_db, cancelled.id)
    later = utcnow() + timedelta(seconds=31)
    assert reconciling.requeue_lost_jobs(platform_db, dispatch, now=later) == []
    failed = jobs.get_job(platform_db, spent.id)
    assert failed.status == "FAILED" and "attempt 1 of 1" in failed.error
    assert jobs.get_job(platform_db, cancelled.id).status == "CANCELLED"


def test_reconciler_resends_long_silent_queued_jobs(platform_db, dispatch, settings):
    waiting = jobs.submit_job(platform_db, SPEC, dispatch, settings=settings)
    before = queue_length(dispatch)
    assert reconciling.requeue_lost_jobs(platform_db, dispatch) == []  # fresh: its message is surely there
    assert reconciling.requeue_lost_jobs(platform_db, dispatch, now=utcnow() + timedelta(minutes=6)) == [waiting.id]
    assert queue_length(dispatch) == before + 1


def test_release_and_retry(platform_db, dispatch, settings):
    job = running_job(platform_db, dispatch, settings)
    assert attempts.release_job(platform_db, job.id, job.attempt, "worker stopped; re-queued", dispatch)
    released = jobs.get_job(platform_db, job.id)
    assert released.status == "QUEUED" and released.max_attempts == job.max_attempts + 1  # not a spent attempt
    job = leases.claim_job(platform_db, job.id, "w2", 30)
    jobs.request_cancel(platform_db, job.id)
    assert not attempts.release_job(platform_db, job.id, job.attempt, "stopping", dispatch)
    assert jobs.get_job(platform_db, job.id).status == "CANCELLED"  # a cancel wins over a hand-back
    retried = jobs.retry_job(platform_db, job.id, dispatch)
    assert retried.status == "QUEUED" and retried.error is None and not retried.cancel_requested
    with pytest.raises(Conflict, match="only a FAILED or CANCELLED"):
        jobs.retry_job(platform_db, job.id, dispatch)
    with pytest.raises(NotFound):
        jobs.retry_job(platform_db, 2**70, dispatch)


def test_a_job_is_read_with_its_whole_history_in_order(platform_db, dispatch, settings):
    """get_job reads the job and its history in one statement (a JSON array): the same times, to the
    microsecond and in UTC, and the same order as the job_event rows."""
    from trainyard.models import JobEvent

    job = jobs.submit_job(platform_db, SPEC, dispatch, settings=settings, owner="ann")
    claimed = leases.claim_job(platform_db, job.id, "w1", 60)
    attempts.finish_job(platform_db, job.id, claimed.attempt, {"val_accuracy": 0.5}, {"epoch": 2, "epochs": 2})
    view = jobs.get_job(platform_db, job.id)
    with platform_db.read_scope() as s:
        rows = s.execute(select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id)).scalars().all()
        expected = [(r.at, r.from_status, r.to_status, r.attempt, r.message) for r in rows]
    got = [(e.at, e.from_status, e.to_status, e.attempt, e.message) for e in view.events]
    assert got == expected and len(got) == 3
    assert [e.to_status for e in view.events] == ["QUEUED", "RUNNING", "SUCCEEDED"]
    assert all(e.at.utcoffset() == timedelta(0) for e in view.events)
    assert view.metrics == {"val_accuracy": 0.5} and view.priority == "normal"
    with pytest.raises(NotFound):
        jobs.get_job(platform_db, job.id + 1000)
