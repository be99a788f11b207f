"""The sweep driver: settles ended trials, starts new ones up to `max_parallel` and `max_trials`, stops a sweep
whose trials keep failing, and ends a sweep once its last trial has: the best trial's model is registered and
the sweep's MLflow run closed.

It runs in a process of its own (`python -m trainyard_workers sweeper`, started by `trainyard up` and by
docker-compose), one pass every TRAINYARD_SWEEP_SECONDS: not inside a web request (a sweep outlives any
request), and not as a Celery task (one would wait behind hours of training on the same workers). A worker
that ends a trial also calls `start_trials` at once, so the next trial does not wait for the next pass.

Nothing is kept in memory between passes: every decision reads the sweep's rows and rebuilds Optuna's view
(`trainyard.sweep_study`). Starting trials is one transaction — the jobs, their trial rows and a
compare-and-set of `sweep.trials_started` from the count the decision was made on — so two drivers, a worker
and a driver, or a driver killed at any point can never start a trial twice or exceed `max_parallel`; the
broker messages go out after commit, and a lost one is re-sent by the next pass (`wake_queued_trials`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select, update

from trainyard import model_registry, tracking
from trainyard.config import Settings
from trainyard.datasets import get_dataset
from trainyard.db import Database
from trainyard.errors import InvalidSpec
from trainyard.jobs import Dispatch, insert_job, send_after_commit
from trainyard.ml.metrics import PRIMARY_METRIC
from trainyard.models import (
    TERMINAL_STATUSES,
    Job,
    JobStatus,
    Sweep,
    SweepReport,
    SweepStatus,
    SweepTrial,
    utcnow,
)
from trainyard.spec_checks import checked_spec
from trainyard.specs import JobSpec
from trainyard.sweep_checks import with_params
from trainyard.sweep_specs import SweepSpec
from trainyard.sweep_study import TrialRecord, ask, best_number
from trainyard.sweeps import cancel_active_trials, study_trials

log = logging.getLogger(__name__)

_OUTCOME = {JobStatus.SUCCEEDED: "COMPLETE", JobStatus.PRUNED: "PRUNED", JobStatus.FAILED: "FAIL",
            JobStatus.CANCELLED: "FAIL"}


@dataclass
class PassReport:
    started: dict[int, list[int]] = field(default_factory=dict)  # sweep → job ids of trials started
    ended: dict[int, str] = field(default_factory=dict)  # sweep → its final status


def drive(db: Database, dispatch: Dispatch, settings: Settings) -> PassReport:
    """One pass over every running sweep."""
    report = PassReport()
    with db.read_scope() as s:
        running = s.scalars(select(Sweep.id).where(Sweep.status == SweepStatus.RUNNING).order_by(Sweep.id)).all()
    for sweep_id in running:
        try:
            started, ended = advance(db, dispatch, settings, sweep_id)
        except Exception:  # one sweep's trouble (MLflow away, say) must not stall the others
            log.exception("sweep %s: pass failed; trying again next pass", sweep_id)
            continue
        if started:
            report.started[sweep_id] = started
        if ended:
            report.ended[sweep_id] = ended
    return report


def advance(db: Database, dispatch: Dispatch, settings: Settings, sweep_id: int) -> tuple[list[int], str | None]:
    """Settle, start, stop or end one sweep: (job ids started, final status if it ended now)."""
    settle_trials(db, sweep_id)
    with db.read_scope() as s:
        sweep = s.get(Sweep, sweep_id)
        if sweep is None or sweep.status != SweepStatus.RUNNING:
            return [], None
        spec = SweepSpec.model_validate(sweep.spec)
        trials = study_trials(s, sweep_id)
        errors = dict(s.execute(select(SweepTrial.number, SweepTrial.error).where(SweepTrial.sweep_id == sweep_id)).all())
    if sweep.mlflow_run_id is None:
        _open_mlflow_run(db, settings, sweep, spec)
    failed_in_a_row = _failures_in_a_row(trials)
    if failed_in_a_row >= spec.max_failures_in_a_row:
        last = next(t for t in reversed(trials) if t.state == "FAIL")
        reason = (f"stopped: {failed_in_a_row} trials failed in a row; the last (trial {last.number}): "
                  f"{errors.get(last.number) or 'see its job'}")
        cancel_active_trials(db, sweep_id)
        return [], _end(db, settings, sweep, spec, trials, SweepStatus.FAILED, reason)
    started = start_trials(db, dispatch, settings, sweep_id, sweep=sweep, spec=spec, trials=trials)
    if started or sweep.trials_started < sweep.max_trials or any(t.state == "RUNNING" for t in trials):
        return started, None
    best = best_number(spec, trials)
    if best is None:
        return [], _end(db, settings, sweep, spec, trials, SweepStatus.FAILED,
                        f"no trial completed ({len(trials)} ended); see the trials' jobs")
    return [], _end(db, settings, sweep, spec, trials, SweepStatus.SUCCEEDED, f"finished; best: trial {best}",
                    best=best)


def settle_trials(db: Database, sweep_id: int) -> None:
    """Give every trial whose job ended its final state and objective value (once: conditional on RUNNING)."""
    with db.read_scope() as s:
        spec = SweepSpec.model_validate(s.scalar(select(Sweep.spec).where(Sweep.id == sweep_id)))
        ended = s.execute(
            select(SweepTrial.number, Job.status, Job.error).outerjoin(Job, Job.id == SweepTrial.job_id)
            .where(SweepTrial.sweep_id == sweep_id, SweepTrial.state == "RUNNING")
        ).all()
        for number, status, error in ended:
            if status is not None and JobStatus(status) not in TERMINAL_STATUSES:
                continue
            values = [v for _, v in sorted(s.execute(select(SweepReport.step, SweepReport.value).where(
                SweepReport.sweep_id == sweep_id, SweepReport.number == number)).all())]
            state = _OUTCOME.get(status, "FAIL")
            reason = None
            if status is None:
                reason = "its job was deleted"
            elif state == "FAIL":
                reason = (error or "").splitlines()[0][:500] if error else f"its job was {status.lower()}"
            elif not values:
                state, reason = "FAIL", f"it recorded no {spec.objective.metric}"
            value = None if state == "FAIL" else _objective(spec, values, state)
            s.execute(update(SweepTrial).where(SweepTrial.sweep_id == sweep_id, SweepTrial.number == number,
                                               SweepTrial.state == "RUNNING")
                      .values(state=state, value=value, error=reason))


def _objective(spec: SweepSpec, values: list[float], state: str) -> float:
    """A trial's value: the best or the last epoch's objective (a stopped trial's is its last)."""
    if spec.objective.at == "last" or state == "PRUNED":
        return values[-1]
    return max(values) if spec.objective.goal == "maximize" else min(values)


def _failures_in_a_row(trials: list[TrialRecord]) -> int:
    """Failed trials since the last one that did not fail, among the ended ones in trial order."""
    count = 0
    for trial in reversed([t for t in trials if t.state != "RUNNING"]):
        if trial.state != "FAIL":
            break
        count += 1
    return count


def after_trial(db: Database, dispatch: Dispatch, settings: Settings, sweep_id: int) -> list[int]:
    """A trial's job just ended (called by its worker): settle it and start the next trials now, rather than
    at the driver's next pass. Ending the sweep stays the driver's."""
    settle_trials(db, sweep_id)
    return start_trials(db, dispatch, settings, sweep_id)


def start_trials(db: Database, dispatch: Dispatch, settings: Settings, sweep_id: int, *, sweep: Sweep | None = None,
                 spec: SweepSpec | None = None, trials: list[TrialRecord] | None = None) -> list[int]:
    """Start as many trials as `max_parallel` and `max_trials` allow; the job ids started (dispatched)."""
    if sweep is None:
        with db.read_scope() as s:
            sweep = s.get(Sweep, sweep_id)
            if sweep is None or sweep.status != SweepStatus.RUNNING:
                return []
            spec, trials = SweepSpec.model_validate(sweep.spec), study_trials(s, sweep_id)
    active = sum(t.state == "RUNNING" for t in trials)
    room = min(sweep.max_parallel - active, sweep.max_trials - sweep.trials_started)
    if room <= 0 or sweep.mlflow_run_id is None:  # trials start once the parent run exists to nest under
        return []
    asked = ask(spec, trials, room)
    started: list[tuple[int, str, int]] = []
    with db.session_scope() as s:
        moved = s.execute(
            update(Sweep).where(Sweep.id == sweep_id, Sweep.status == SweepStatus.RUNNING,
                                Sweep.trials_started == sweep.trials_started)
            .values(trials_started=sweep.trials_started + len(asked), updated_at=utcnow())).rowcount
        if moved != 1:
            s.rollback()  # another driver (or a worker) started trials from the same count first
            return []
        for choice in asked:
            job_spec, error = _trial_spec(db, settings, spec, choice.params, choice.number, sweep)
            job_row = None
            if job_spec is not None:
                job_row = insert_job(s.connection(), job_spec, owner=sweep.owner, sweep_id=sweep_id,
                                     trial=choice.number, message=f"trial {choice.number} of sweep {sweep_id}")
                started.append((job_row.id, job_row.queue, job_row.priority))
            s.add(SweepTrial(sweep_id=sweep_id, number=choice.number, job_id=job_row.id if job_row else None,
                             params=choice.params, distributions=choice.distributions,
                             system_attrs=choice.system_attrs, state="RUNNING" if job_row else "FAIL",
                             error=error, created_at=utcnow()))
    for job_id, queue, priority in started:
        send_after_commit(dispatch, job_id, queue, priority)
    return [job_id for job_id, _, _ in started]


def _trial_spec(db: Database, settings: Settings, spec: SweepSpec, params: dict[str, Any], number: int,
                sweep: Sweep) -> tuple[JobSpec | None, str | None]:
    """The trial's job spec, or why this combination of values is refused (each value passed on its own when
    the sweep was checked; together they may not, e.g. an architecture and an image size)."""
    base = spec.base.model_dump(mode="json")
    base.update(name=f"{sweep.name} trial {number}"[:200], register=spec.register == "all",
                model_name=spec.model_name)
    try:
        return checked_spec(db, JobSpec.model_validate(with_params(base, params)), settings), None
    except ValidationError as exc:
        return None, f"these values do not make a valid job: {exc.errors()[0]['msg']}"
    except InvalidSpec as exc:
        return None, f"these values do not make a valid job: {exc.detail}"


def wake_queued_trials(db: Database, dispatch: Dispatch) -> int:
    """One message per queued trial of a running sweep: a driver killed between its commit and its sends
    leaves trials without one. Messages are only wake-ups (a claim takes the most urgent job), so an extra
    one costs a no-op. Called when the driver starts."""
    with db.read_scope() as s:
        queued = s.execute(select(Job.id, Job.queue, Job.priority).join(Sweep, Sweep.id == Job.sweep_id).where(
            Sweep.status == SweepStatus.RUNNING, Job.status == JobStatus.QUEUED)).all()
    return sum(send_after_commit(dispatch, *row) for row in queued)


def _open_mlflow_run(db: Database, settings: Settings, sweep: Sweep, spec: SweepSpec) -> None:
    run_id = tracking.start_sweep_run(settings, sweep_id=sweep.id, name=sweep.name, spec=sweep.spec)
    with db.read_scope() as s:
        stored = s.execute(update(Sweep).where(Sweep.id == sweep.id, Sweep.mlflow_run_id.is_(None))
                           .values(mlflow_run_id=run_id)).rowcount == 1
    if stored:
        sweep.mlflow_run_id = run_id
    else:  # another driver opened one first: ours goes
        tracking.tracking_client(settings).delete_run(run_id)
        with db.read_scope() as s:
            sweep.mlflow_run_id = s.scalar(select(Sweep.mlflow_run_id).where(Sweep.id == sweep.id))


def _end(db: Database, settings: Settings, sweep: Sweep, spec: SweepSpec, trials: list[TrialRecord],
         status: SweepStatus, reason: str, best: int | None = None) -> str | None:
    """End the sweep: register the best trial's model (unless asked not to), close its run, record it."""
    values: dict[str, Any] = {}
    if best is not None:
        values = {"best_trial": best, "best_value": trials[best - 1].value}
        if spec.register != "none":
            values.update(_register_best(db, settings, sweep, spec, best))
    with db.read_scope() as s:
        ended = s.execute(update(Sweep).where(Sweep.id == sweep.id, Sweep.status == SweepStatus.RUNNING).values(
            status=status, status_reason=reason, finished_at=utcnow(), updated_at=utcnow(), **values)).rowcount
    if not ended:
        return None  # cancelled meanwhile
    if sweep.mlflow_run_id:
        best_trial = trials[best - 1] if best is not None else None
        tracking.end_sweep_run(
            settings, sweep.mlflow_run_id, "FINISHED" if status == SweepStatus.SUCCEEDED else "FAILED",
            best=best_trial.params if best_trial else None,
            metrics={f"best_{spec.objective.metric}": best_trial.value, "best_trial": best} if best_trial else None)
    log.info("sweep %s %s: %s", sweep.id, status, reason)
    return status


def _register_best(db: Database, settings: Settings, sweep: Sweep, spec: SweepSpec, best: int) -> dict[str, Any]:
    """The best trial's model as a version of the sweep's model name, tagged with the sweep (once: a version
    from the same run is reused if a driver died after registering)."""
    with db.read_scope() as s:
        job = s.execute(select(Job.id, Job.mlflow_run_id, Job.metrics, Job.model_name, Job.model_version,
                               Job.spec).join(SweepTrial, SweepTrial.job_id == Job.id)
                        .where(SweepTrial.sweep_id == sweep.id, SweepTrial.number == best)).one()
    if job.model_version is not None:  # register: all — the trial registered itself
        return {"model_name": job.model_name, "model_version": job.model_version}
    trial_spec = JobSpec.model_validate(job.spec)
    name = spec.model_name or f"{trial_spec.dataset}-{trial_spec.architecture}"
    client = tracking.tracking_client(settings)
    existing = [v for v in client.search_model_versions(f"run_id = '{job.mlflow_run_id}'") if v.name == name]
    if existing:
        version = int(existing[0].version)
    else:
        model_uri = tracking.logged_model_uri(settings, job.mlflow_run_id)
        if model_uri is None:
            raise RuntimeError(f"trial {best}'s run {job.mlflow_run_id} logged no model")
        primary = "test_" + PRIMARY_METRIC[get_dataset(db, trial_spec.dataset).task]
        version = model_registry.register_version(
            settings, name=name, model_uri=model_uri, run_id=job.mlflow_run_id, job_id=job.id,
            primary_metric=primary, metrics={k: v for k, v in job.metrics.items() if isinstance(v, int | float)},
            tags={"trainyard.architecture": trial_spec.architecture, "trainyard.dataset": trial_spec.dataset,
                  tracking.SWEEP_ID_TAG: str(sweep.id), "trainyard.sweep_trial": str(best)},
        ).version
    with db.read_scope() as s:
        s.execute(update(Job).where(Job.id == job.id).values(model_name=name, model_version=version))
    return {"model_name": name, "model_version": version}
