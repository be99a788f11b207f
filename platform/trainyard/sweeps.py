"""Sweeps service: submit, read, list and cancel sweeps, and the per-epoch report by which a running trial
learns whether its sweep stops it early. Starting trials and ending sweeps is the driver's
(`trainyard.sweep_driver`), run by its own process.

A sweep's trials are ordinary train jobs (`job.sweep_id`, `job.trial`); what Optuna chose for each lives in
`sweep_trial`, each epoch's objective in `sweep_report`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from trainyard import tracking
from trainyard.auth import Principal, Role
from trainyard.config import Settings
from trainyard.db import Database
from trainyard.errors import Conflict, Forbidden, NotFound
from trainyard.jobs import request_cancel
from trainyard.models import Job, JobStatus, Sweep, SweepReport, SweepStatus, SweepTrial, to_view, utcnow
from trainyard.sweep_checks import checked_sweep
from trainyard.sweep_specs import SweepSpec
from trainyard.sweep_study import TrialRecord, should_prune

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialView:
    number: int
    job_id: int | None
    status: str  # the job's status (QUEUED, RUNNING, SUCCEEDED, PRUNED, FAILED, CANCELLED), or FAILED if none
    params: dict[str, Any]
    value: float | None  # the objective: at the best or last epoch (once ended), else the latest report
    epochs: int  # epochs reported so far
    error: str | None
    reports: list[tuple[int, float]] = field(default_factory=list)  # (epoch, objective)


@dataclass(frozen=True)
class SweepView:
    id: int
    name: str
    status: str
    spec: dict[str, Any]
    max_trials: int
    max_parallel: int
    trials_started: int
    owner: str | None
    status_reason: str | None
    mlflow_run_id: str | None
    best_trial: int | None
    best_value: float | None
    model_name: str | None
    model_version: int | None
    created_at: datetime
    finished_at: datetime | None
    counts: dict[str, int] = field(default_factory=dict)  # trials by status
    trials: list[TrialView] = field(default_factory=list)


def submit_sweep(db: Database, spec: SweepSpec, *, settings: Settings, owner: str | None = None) -> SweepView:
    """Check the sweep (422 naming the field, nothing written) and store it RUNNING; the driver starts its
    trials within a second or so."""
    spec = checked_sweep(db, spec, settings)
    now = utcnow()
    with db.session_scope() as s:
        row = Sweep(name=spec.name, status=SweepStatus.RUNNING, spec=spec.model_dump(mode="json"),
                    max_trials=spec.max_trials, max_parallel=spec.max_parallel, trials_started=0, owner=owner,
                    status_reason=f"submitted by {owner}" if owner else "submitted", created_at=now,
                    updated_at=now)
        s.add(row)
        s.flush()
        sweep_id = row.id
    return get_sweep(db, sweep_id)


def get_sweep(db: Database, sweep_id: int) -> SweepView:
    """The sweep with its trials (params, status, objective and per-epoch reports)."""
    with db.read_scope() as s:
        row = s.get(Sweep, sweep_id) if 0 < sweep_id <= 2**63 - 1 else None
        if row is None:
            raise NotFound(f"No sweep with id {sweep_id}.")
        trials = _trial_views(s, sweep_id)
        return _view(row, trials)


def list_sweeps(db: Database, *, limit: int = 50, before: int | None = None) -> tuple[list[SweepView], int | None]:
    """Newest first, without trial details (counts only); keyset pagination on id."""
    with db.read_scope() as s:
        query = select(Sweep).order_by(Sweep.id.desc()).limit(limit + 1)
        if before is not None:
            query = query.where(Sweep.id < before)
        rows = s.scalars(query).all()
        ids = [r.id for r in rows[:limit]]
        counts: dict[int, dict[str, int]] = defaultdict(dict)
        if ids:
            status = func.coalesce(Job.status, JobStatus.FAILED.value)  # a trial that never got a job failed
            for sweep_id, trial_status, n in s.execute(
                    select(SweepTrial.sweep_id, status, func.count()).outerjoin(Job, Job.id == SweepTrial.job_id)
                    .where(SweepTrial.sweep_id.in_(ids)).group_by(SweepTrial.sweep_id, status)):
                counts[sweep_id][trial_status] = n
        items = [_view(r, [], counts=counts[r.id]) for r in rows[:limit]]
    return items, (items[-1].id if len(rows) > limit else None)


def cancel_sweep(db: Database, settings: Settings, sweep_id: int, *, actor: Principal | None = None) -> SweepView:
    """Stop starting trials and cancel the queued and running ones (running ones stop within a batch)."""
    with db.read_scope() as s:
        row = s.get(Sweep, sweep_id) if 0 < sweep_id <= 2**63 - 1 else None
        if row is None:
            raise NotFound(f"No sweep with id {sweep_id}.")
        if actor is not None:
            actor.require(Role.MEMBER, "Cancelling a sweep")
        if actor is not None and not actor.may_act_for(row.owner):
            raise Forbidden(f"Sweep {sweep_id} is {row.owner or 'nobody'}'s; only its owner or an admin may cancel it.")
        if row.status != SweepStatus.RUNNING:
            raise Conflict(f"Sweep {sweep_id} is already {row.status}; there is nothing to cancel.")
        reason = f"cancelled by {actor.user}" if actor is not None else "cancelled"
        # Conditional on RUNNING, as the driver's trial starts are: after this, no trial starts.
        done = s.execute(update(Sweep).where(Sweep.id == sweep_id, Sweep.status == SweepStatus.RUNNING)
                         .values(status=SweepStatus.CANCELLED, status_reason=reason, finished_at=utcnow(),
                                 updated_at=utcnow())).rowcount == 1
        if not done:
            raise Conflict(f"Sweep {sweep_id} ended while it was being cancelled; look at it again.")
        run_id = row.mlflow_run_id
    cancel_active_trials(db, sweep_id)
    if run_id:
        try:
            tracking.end_sweep_run(settings, run_id, "KILLED")
        except Exception:  # the sweep is cancelled whatever MLflow says; its run stays open in MLflow's UI
            log.warning("sweep %s: could not close its MLflow run %s", sweep_id, run_id, exc_info=True)
    return get_sweep(db, sweep_id)


def cancel_active_trials(db: Database, sweep_id: int) -> None:
    with db.read_scope() as s:
        active = s.scalars(select(Job.id).where(Job.sweep_id == sweep_id,
                                                Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))).all()
    for job_id in active:
        try:
            request_cancel(db, job_id)
        except Conflict:
            pass  # it ended meanwhile


def report_epoch(db: Database, job_id: int, epoch: int, metrics: dict[str, float], *, last: bool = False) -> bool:
    """A trial's epoch ended: store its objective for that epoch (once; a resumed attempt's repeat keeps the
    first) and ask the sweep's pruner. True: stop the trial now. False for a job that is no trial, and after
    its `last` epoch: a trial that has trained its whole budget completes (successive halving would otherwise
    "stop" it at a rung that falls on its last epoch, after the training was spent, and lose its model)."""
    with db.read_scope() as s:
        job = s.execute(select(Job.sweep_id, Job.trial).where(Job.id == job_id)).first()
        if job is None or job.sweep_id is None:
            return False
        spec = SweepSpec.model_validate(s.scalar(select(Sweep.spec).where(Sweep.id == job.sweep_id)))
        value = metrics.get(spec.objective.metric)
        if value is None:
            return False
        values = {"sweep_id": job.sweep_id, "number": job.trial, "step": epoch, "value": float(value)}
        upsert = pg_insert if s.bind.dialect.name == "postgresql" else sqlite_insert
        s.execute(upsert(SweepReport).values(**values).on_conflict_do_nothing())
        if spec.early_stopping.type == "none" or last:
            return False
        trials = study_trials(s, job.sweep_id)
    prune, attrs = should_prune(spec, trials, job.trial)
    with db.read_scope() as s:
        # Successive halving records the rungs a trial passed in its attributes: the next decision needs them.
        s.execute(update(SweepTrial).where(SweepTrial.sweep_id == job.sweep_id, SweepTrial.number == job.trial)
                  .values(system_attrs=attrs))
    return prune


def trial_run_tags(db: Database, job: Any) -> dict[str, str]:
    """MLflow tags for a trial's run: nested under its sweep's run (MLflow's parentRunId), with its sweep and
    number; none for a job that is no trial."""
    if job.sweep_id is None:
        return {}
    with db.read_scope() as s:
        parent = s.scalar(select(Sweep.mlflow_run_id).where(Sweep.id == job.sweep_id))
    tags = {tracking.SWEEP_ID_TAG: str(job.sweep_id), "trainyard.sweep_trial": str(job.trial)}
    return {**tags, tracking.PARENT_RUN_TAG: parent} if parent else tags


def study_trials(s: Session, sweep_id: int) -> list[TrialRecord]:
    """Every trial of the sweep as Optuna sees it: a trial whose job has not ended is RUNNING."""
    reports: dict[int, dict[int, float]] = defaultdict(dict)
    for number, step, value in s.execute(select(SweepReport.number, SweepReport.step, SweepReport.value)
                                         .where(SweepReport.sweep_id == sweep_id)):
        reports[number][step] = value
    rows = s.scalars(select(SweepTrial).where(SweepTrial.sweep_id == sweep_id).order_by(SweepTrial.number)).all()
    return [TrialRecord(number=t.number, state=t.state, params=dict(t.params), distributions=dict(t.distributions),
                        system_attrs=dict(t.system_attrs or {}), value=t.value, reports=reports[t.number])
            for t in rows]


def _trial_views(s: Session, sweep_id: int) -> list[TrialView]:
    # The trials and their jobs in one statement: trials started between two reads must not be half seen.
    rows = s.execute(select(SweepTrial, Job.status, Job.error).outerjoin(Job, Job.id == SweepTrial.job_id)
                     .where(SweepTrial.sweep_id == sweep_id).order_by(SweepTrial.number)).all()
    reports: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for number, step, value in s.execute(select(SweepReport.number, SweepReport.step, SweepReport.value)
                                         .where(SweepReport.sweep_id == sweep_id).order_by(SweepReport.step)):
        reports[number].append((step, value))
    views = []
    for trial, job_status, job_error in rows:
        curve = reports[trial.number]
        views.append(TrialView(
            number=trial.number, job_id=trial.job_id, status=job_status or JobStatus.FAILED,
            params=dict(trial.params), value=trial.value if trial.value is not None else (curve[-1][1] if curve else None),
            epochs=len(curve), error=trial.error or ((job_error or "").splitlines() or [None])[0], reports=curve))
    return views


def _view(row: Sweep, trials: list[TrialView], counts: dict[str, int] | None = None) -> SweepView:
    if counts is None:
        counts = defaultdict(int)
        for trial in trials:
            counts[trial.status] += 1
    return to_view(SweepView, row, counts=dict(counts), trials=trials)
