"""Sweeps on SQLite and PostgreSQL with a real Redis broker: the checks that refuse a bad sweep, the driver's
trial starts under contention, early stopping through Optuna's pruners, a sweep that stops itself, and
cancelling. Trials are run here through the same services a worker uses (claim, report, finish)."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select

from trainyard import attempts, leases, sweep_driver, sweeps
from trainyard.config import Settings
from trainyard.datasets import ensure_builtin_datasets
from trainyard.auth import Principal, Role
from trainyard.errors import Conflict, Forbidden, InvalidSpec
from trainyard.models import Job, JobStatus, Sweep, SweepTrial
from trainyard.queueing import CeleryDispatch
from trainyard.sweep_specs import SweepSpec
from conftest import authed_client

BASE = {"dataset": "digits", "architecture": "cnn", "register": False, "params": {"epochs": 4, "batch_size": 32}}


def sweep_spec(**overrides) -> SweepSpec:
    # register: none — trials run by hand here log no model (the worker tests register the best one)
    spec = {"name": "lr search", "base": BASE, "algorithm": "random", "max_trials": 6, "max_parallel": 2, "register": "none",
            "space": {"params.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-1},
                      "params.batch_size": {"type": "choice", "values": [16, 32, 64]}}}
    return SweepSpec.model_validate({**spec, **overrides})


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


def run_trial(db, job_id: int, curve: list[float], *, fail: str | None = None) -> str:
    """Claim the trial's job and report `curve` epoch by epoch as its worker would; end it as the worker
    would (PRUNED when the sweep says stop, FAILED with `fail`, else SUCCEEDED). Its final status."""
    job = leases.claim_job(db, job_id, "test-worker", 60)
    assert job is not None and job.id == job_id
    if fail:
        attempts.fail_job(db, job.id, job.attempt, fail)
        return JobStatus.FAILED
    for epoch, value in enumerate(curve, start=1):
        metrics = {"val_accuracy": value, "val_loss": 1 - value, "train_loss": 1 - value}
        if sweeps.report_epoch(db, job.id, epoch, metrics, last=epoch == len(curve)):
            attempts.prune_job(db, job.id, job.attempt, f"stopped early at epoch {epoch}", metrics, {})
            return JobStatus.PRUNED
    attempts.finish_job(db, job.id, job.attempt, metrics, {})
    return JobStatus.SUCCEEDED


def open_sweep(db, settings, spec: SweepSpec) -> int:
    """A submitted sweep whose MLflow parent run the driver has opened (trials start after it)."""
    sweep = sweeps.submit_sweep(db, spec, settings=settings, owner="alice")
    sweep_driver._open_mlflow_run(db, settings, db_row(db, sweep.id), spec)
    return sweep.id


def db_row(db, sweep_id: int) -> Sweep:
    with db.read_scope() as s:
        return s.get(Sweep, sweep_id)


def active_trials(db, sweep_id: int) -> list[int]:
    with db.read_scope() as s:
        return list(s.scalars(select(Job.id).where(Job.sweep_id == sweep_id, Job.status.in_(
            [JobStatus.QUEUED, JobStatus.RUNNING])).order_by(Job.id)))


@pytest.mark.parametrize(("change", "field"), [
    ({"space": {"params.lrr": {"type": "choice", "values": [0.1]}}}, "space.params.lrr"),
    ({"space": {"dataset": {"type": "choice", "values": ["digits"]}}}, "space.dataset"),
    ({"space": {"params.lr": {"type": "uniform", "low": 0.5, "high": 20}}}, "space.params.lr"),
    ({"space": {"params.optimizer": {"type": "choice", "values": ["adam", "adagrad"]}}}, "space.params.optimizer"),
    ({"space": {"params.optimizer": {"type": "uniform", "low": 0.1, "high": 0.2}}}, "space.params.optimizer"),
    ({"space": {"architecture_options.depth": {"type": "int", "low": 1, "high": 3}}}, "space.architecture_options.depth"),
    ({"space": {"params.epochs": {"type": "int", "low": 1, "high": 3}}}, "space.params.epochs"),
    ({"algorithm": "grid", "max_trials": 4}, "space.params.lr"),
    ({"algorithm": "grid", "max_trials": 5, "space": {"params.batch_size": {"type": "int", "low": 16, "high": 64,
                                                                              "step": 16}, "params.optimizer": {
        "type": "choice", "values": ["adam", "sgd"]}}}, "max_trials"),
    ({"objective": {"metric": "val_mean_iou"}}, "objective.metric"),
    ({"base": {**BASE, "dataset": "no-such-set"}}, "base.dataset"),
    ({"base": {**BASE, "kind": "evaluate"}}, "base.kind"),
    ({"early_stopping": {"type": "median", "min_epochs": 4}}, "early_stopping.min_epochs"),
])
def test_a_bad_sweep_is_refused_naming_the_field_and_creates_nothing(platform_db, settings, change, field):
    with pytest.raises(InvalidSpec) as refused:
        sweeps.submit_sweep(platform_db, sweep_spec(**change), settings=settings)
    assert field in [e["field"] for e in refused.value.errors], refused.value.errors
    with platform_db.read_scope() as s:
        assert s.scalar(select(func.count()).select_from(Sweep)) == 0
        assert s.scalar(select(func.count()).select_from(Job)) == 0


def test_a_grid_smaller_than_the_budget_runs_each_point_once(platform_db, settings):
    spec = sweep_spec(algorithm="grid", max_trials=50,
                      space={"params.batch_size": {"type": "choice", "values": [16, 32]},
                             "params.lr": {"type": "uniform", "low": 0.001, "high": 0.003, "step": 0.001}})
    sweep_id = open_sweep(platform_db, settings, spec)
    assert sweeps.get_sweep(platform_db, sweep_id).max_trials == 6
    seen = []
    while True:
        sweep_driver.start_trials(platform_db, lambda *a: None, settings, sweep_id)
        running = active_trials(platform_db, sweep_id)
        if not running:
            break
        for job_id in running:
            run_trial(platform_db, job_id, [0.5, 0.6, 0.7, 0.8])
        sweep_driver.settle_trials(platform_db, sweep_id)
    for trial in sweeps.get_sweep(platform_db, sweep_id).trials:
        seen.append((trial.params["params.batch_size"], trial.params["params.lr"]))
    assert sorted(seen) == sorted((b, lr) for b in (16, 32) for lr in (0.001, 0.002, 0.003))


def test_concurrent_drivers_start_each_trial_once_and_never_exceed_max_parallel(platform_db, settings, dispatch):
    sweep_id = open_sweep(platform_db, settings, sweep_spec(max_trials=12, max_parallel=3))
    most_active, errors, done = 0, [], threading.Event()

    def drive() -> None:
        try:
            while not done.is_set():
                sweep_driver.advance(platform_db, dispatch, settings, sweep_id)
        except Exception as exc:  # reported below: a driver must never fail on a lost race
            errors.append(exc)

    drivers = [threading.Thread(target=drive) for _ in range(4)]
    for thread in drivers:
        thread.start()
    try:
        finished = 0
        while finished < 12:
            running = active_trials(platform_db, sweep_id)
            most_active = max(most_active, len(running))
            seen = sweeps.get_sweep(platform_db, sweep_id).trials  # read whole while the drivers start trials
            assert [t.number for t in seen] == list(range(1, len(seen) + 1))
            if running:
                run_trial(platform_db, running[0], [0.5, 0.6, 0.7, 0.8])
                finished += 1
    finally:
        done.set()
        for thread in drivers:
            thread.join()
    assert not errors, errors
    assert most_active <= 3
    with platform_db.read_scope() as s:
        trials = s.execute(select(Job.trial, Job.id).where(Job.sweep_id == sweep_id).order_by(Job.trial)).all()
    assert [t for t, _ in trials] == list(range(1, 13))  # twelve trials, each started once, numbered in order
    assert db_row(platform_db, sweep_id).trials_started == 12


def test_median_early_stopping_stops_a_clearly_worse_trial_and_keeps_its_reports(platform_db, settings, dispatch):
    spec = sweep_spec(max_trials=3, max_parallel=1,
                      early_stopping={"type": "median", "min_epochs": 1, "startup_trials": 1})
    sweep_id = open_sweep(platform_db, settings, spec)
    curves = [[0.6, 0.8, 0.9, 0.95], [0.1, 0.1, 0.1, 0.1], [0.7, 0.85, 0.9, 0.96]]
    outcomes = []
    for curve in curves:
        (job_id,) = sweep_driver.start_trials(platform_db, dispatch, settings, sweep_id)
        outcomes.append(run_trial(platform_db, job_id, curve))
        sweep_driver.settle_trials(platform_db, sweep_id)
    assert outcomes == [JobStatus.SUCCEEDED, JobStatus.PRUNED, JobStatus.SUCCEEDED]
    stopped = sweeps.get_sweep(platform_db, sweep_id).trials[1]
    # Stopped at the end of its min_epochs-th epoch, the first it was compared at; its report is kept.
    assert stopped.status == JobStatus.PRUNED and stopped.reports == [(1, 0.1)]
    with platform_db.read_scope() as s:
        assert s.scalar(select(SweepTrial.state).where(SweepTrial.sweep_id == sweep_id,
                                                       SweepTrial.number == 2)) == "PRUNED"


def test_successive_halving_keeps_its_rungs_between_decisions(platform_db, settings, dispatch):
    spec = sweep_spec(max_trials=4, max_parallel=1, algorithm="random",
                      early_stopping={"type": "asha", "min_epochs": 1, "reduction_factor": 2})
    sweep_id = open_sweep(platform_db, settings, spec)
    outcomes = []
    for curve in ([0.9] * 4, [0.95] * 4, [0.2] * 4, [0.3] * 4):
        (job_id,) = sweep_driver.start_trials(platform_db, dispatch, settings, sweep_id)
        outcomes.append(run_trial(platform_db, job_id, curve))
        sweep_driver.settle_trials(platform_db, sweep_id)
    # The rungs a trial passed live in its stored attributes: each decision (a new study) compares against them.
    with platform_db.read_scope() as s:
        attrs = s.scalar(select(SweepTrial.system_attrs).where(SweepTrial.sweep_id == sweep_id,
                                                               SweepTrial.number == 1))
    assert "completed_rung_0" in attrs
    assert outcomes[:2] == [JobStatus.SUCCEEDED, JobStatus.SUCCEEDED]
    assert outcomes[2:] == [JobStatus.PRUNED, JobStatus.PRUNED]


def test_a_sweep_whose_trials_keep_failing_stops_itself_and_says_why(platform_db, settings, dispatch):
    sweep_id = open_sweep(platform_db, settings, sweep_spec(max_trials=10, max_parallel=1, max_failures_in_a_row=3))
    sweep_driver.advance(platform_db, dispatch, settings, sweep_id)
    for _ in range(3):
        (job_id,) = active_trials(platform_db, sweep_id)
        run_trial(platform_db, job_id, [], fail="RuntimeError: CUDA out of memory")
        sweep_driver.advance(platform_db, dispatch, settings, sweep_id)  # the next trial, or the end
    sweep = sweeps.get_sweep(platform_db, sweep_id)
    assert sweep.status == "FAILED" and sweep.trials_started == 3
    assert "3 trials failed in a row" in sweep.status_reason and "CUDA out of memory" in sweep.status_reason
    assert sweep_driver.start_trials(platform_db, dispatch, settings, sweep_id) == []


def test_cancel_stops_the_sweep_and_its_queued_and_running_trials(platform_db, settings, dispatch):
    sweep_id = open_sweep(platform_db, settings, sweep_spec(max_trials=6, max_parallel=2))
    first, second = sweep_driver.start_trials(platform_db, dispatch, settings, sweep_id)
    # The rule lives in the service, for every entry point: only a member (or admin) who owns it cancels it.
    for actor in (Principal("alice", Role.VIEWER, 1), Principal("bob", Role.MEMBER, 2)):
        with pytest.raises(Forbidden):
            sweeps.cancel_sweep(platform_db, settings, sweep_id, actor=actor)
    assert sweeps.get_sweep(platform_db, sweep_id).status == "RUNNING"
    leases.claim_job(platform_db, first, "test-worker", 60)
    sweeps.cancel_sweep(platform_db, settings, sweep_id)
    with platform_db.read_scope() as s:
        running, queued = s.get(Job, first), s.get(Job, second)
        assert (running.status, running.cancel_requested) == (JobStatus.RUNNING, True)  # stops within a batch
        assert queued.status == JobStatus.CANCELLED
    assert sweeps.get_sweep(platform_db, sweep_id).status == "CANCELLED"
    assert sweep_driver.advance(platform_db, dispatch, settings, sweep_id) == ([], None)
    with pytest.raises(Conflict):
        sweeps.cancel_sweep(platform_db, settings, sweep_id)


def test_the_api_submits_lists_shows_and_cancels_sweeps_for_their_owner(web_app):
    alice, bob = authed_client(web_app, "member", "alice"), authed_client(web_app, "member", "bob")
    viewer = authed_client(web_app, "viewer", "carol")
    good = sweep_spec().model_dump(mode="json", exclude_none=True)
    bad = {**good, "space": {"params.lrr": {"type": "choice", "values": [0.1]}}}
    refused = alice.post("/api/v1/sweeps", json=bad)
    assert refused.status_code == 422 and [e["field"] for e in refused.get_json()["errors"]] == ["space.params.lrr"]
    shapeless = alice.post("/api/v1/sweeps", json={**good, "space": {"params.lr": {"type": "uniform", "low": 1}}})
    assert shapeless.status_code == 422 and "space.params.lr" in shapeless.get_json()["detail"]
    assert viewer.post("/api/v1/sweeps", json=good).status_code == 403
    assert alice.get("/api/v1/sweeps").get_json()["items"] == []  # nothing was created by the refusals

    created = alice.post("/api/v1/sweeps", json=good)
    assert created.status_code == 201, created.get_json()
    sweep = created.get_json()
    assert (sweep["status"], sweep["owner"], sweep["trials"], sweep["max_trials"]) == ("RUNNING", "alice", [], 6)
    assert viewer.get(f"/api/v1/sweeps/{sweep['id']}").get_json()["name"] == "lr search"
    assert [s["id"] for s in viewer.get("/api/v1/sweeps").get_json()["items"]] == [sweep["id"]]
    assert viewer.get("/api/v1/sweeps/999").status_code == 404
    assert viewer.get(f"/api/v1/jobs?sweep={sweep['id']}").get_json()["items"] == []

    assert viewer.post(f"/api/v1/sweeps/{sweep['id']}/cancel").status_code == 403
    assert bob.post(f"/api/v1/sweeps/{sweep['id']}/cancel").status_code == 403  # not his
    cancelled = alice.post(f"/api/v1/sweeps/{sweep['id']}/cancel")
    assert cancelled.status_code == 202 and cancelled.get_json()["status"] == "CANCELLED"
    assert alice.post(f"/api/v1/sweeps/{sweep['id']}/cancel").status_code == 409


def test_a_trial_that_trained_its_whole_budget_completes_even_where_a_rung_falls_on_its_last_epoch(
        platform_db, settings, dispatch):
    # Rungs at epochs 1, 2 and 4 (reduction factor 2): the second trial ties the first at rungs 1 and 2, and is
    # behind it at epoch 4, its last. Spent training is not "stopped early": it completes, with its model.
    spec = sweep_spec(max_trials=2, max_parallel=1, early_stopping={"type": "asha", "min_epochs": 1,
                                                                     "reduction_factor": 2})
    sweep_id = open_sweep(platform_db, settings, spec)
    outcomes = []
    for curve in ([0.5, 0.6, 0.7, 0.8], [0.5, 0.6, 0.7, 0.75]):
        (job_id,) = sweep_driver.start_trials(platform_db, dispatch, settings, sweep_id)
        outcomes.append(run_trial(platform_db, job_id, curve))
        sweep_driver.settle_trials(platform_db, sweep_id)
    assert outcomes == [JobStatus.SUCCEEDED, JobStatus.SUCCEEDED]
