"""Sweep pages: the list, the sweep form (opened from a job with its spec as the base), and a sweep's live page
with its progress, best trial, charts and trials."""

from __future__ import annotations

from typing import Any

import yaml
from flask import abort, flash, g, redirect, render_template, request, url_for
from pydantic import ValidationError

from trainyard import datasets, jobs, sweeps
from trainyard.auth import Role
from trainyard.errors import NotFound, TrainyardError
from trainyard.ml.metrics import epoch_metric_names
from trainyard.sweep_specs import SweepSpec
from trainyard_web.runtime import platform
from trainyard_web.ui import ui
from trainyard_web.ui.charts import sweep_charts

# The form's fields, each a path in the sweep spec; `base` and `space` are YAML text.
SETTINGS = ("name", "algorithm", "objective.metric", "objective.direction", "objective.at", "early_stopping.type",
            "early_stopping.min_epochs", "max_trials", "max_parallel", "seed", "model_name")
NUMBERS = {"early_stopping.min_epochs", "max_trials", "max_parallel", "seed"}


def _sweep_or_404(sweep_id: int):
    try:
        return sweeps.get_sweep(platform().db, sweep_id)
    except NotFound:
        abort(404)


@ui.get("/sweeps")
def sweep_list():
    items, next_before = sweeps.list_sweeps(platform().db, limit=25, before=request.args.get("before", type=int))
    return render_template("sweeps/list.html", sweeps=items, next_before=next_before)


def _leader(sweep) -> Any:
    """The best trial: the sweep's once it ended, else the best completed so far."""
    if sweep.best_trial is not None:
        return next(t for t in sweep.trials if t.number == sweep.best_trial)
    objective = SweepSpec.model_validate(sweep.spec).objective
    completed = [t for t in sweep.trials if t.status == "SUCCEEDED" and t.value is not None]
    pick = max if objective.goal == "maximize" else min
    return pick(completed, key=lambda t: t.value) if completed else None


@ui.get("/sweeps/<int:sweep_id>")
def sweep_detail(sweep_id: int):
    sweep = _sweep_or_404(sweep_id)
    return render_template("sweeps/detail.html", sweep=sweep, active=sweep.status == "RUNNING", leader=_leader(sweep),
                           may_cancel=g.principal.may_act_for(sweep.owner) and g.principal.role != Role.VIEWER)


@ui.get("/sweeps/<int:sweep_id>/live")
def sweep_live(sweep_id: int):
    """What changes while a sweep runs (progress, best trial, trials); polled until it ends."""
    sweep = _sweep_or_404(sweep_id)
    return render_template("sweeps/live.html", sweep=sweep, active=sweep.status == "RUNNING", leader=_leader(sweep))


@ui.get("/sweeps/<int:sweep_id>/charts.json")
def sweep_chart_data(sweep_id: int):
    sweep = _sweep_or_404(sweep_id)
    return {"done": sweep.status != "RUNNING", "charts": sweep_charts(sweep)}


@ui.post("/sweeps/<int:sweep_id>/cancel")
def sweep_cancel(sweep_id: int):
    p = platform()
    try:
        sweeps.cancel_sweep(p.db, p.settings, sweep_id, actor=g.principal)
        flash(f"Sweep {sweep_id} cancelled; its running trials stop within a batch.", "ok")
    except TrainyardError as exc:
        flash(exc.detail, "error")
    return redirect(url_for("ui.sweep_detail", sweep_id=sweep_id))


def _initial_form(source: int | None) -> dict[str, str]:
    """The form for a new sweep: a job's spec as the base (when opened from a job), a search space around its
    learning rate and batch size, and its task's primary validation metric as the objective."""
    spec: dict[str, Any] = {"dataset": "digits", "architecture": "cnn", "params": {"epochs": 10}}
    name = "sweep"
    if source:
        try:
            job = jobs.get_job(platform().db, source)
        except NotFound:
            abort(404)
        spec = {k: v for k, v in job.spec.items() if k not in ("name", "kind") and v not in (None, {}, [])}
        name = f"{job.name} sweep"
    params = spec.get("params", {})
    lr = float(params.get("lr", 1e-3))
    batch = int(params.get("batch_size", 32))
    space = {"params.lr": {"type": "loguniform", "low": float(f"{lr / 10:.3g}"), "high": float(f"{min(lr * 10, 10):.3g}")},
             "params.batch_size": {"type": "choice", "values": sorted({max(1, batch // 2), batch, batch * 2})}}
    metric = "val_mean_iou" if _task(spec.get("dataset")) == "segmentation" else "val_accuracy"
    return {"name": name[:200], "algorithm": "tpe", "objective.metric": metric, "objective.direction": "",
            "objective.at": "best", "early_stopping.type": "median", "early_stopping.min_epochs": "1",
            "max_trials": "12", "max_parallel": "2", "seed": "0", "model_name": "",
            "base": yaml.safe_dump(spec, sort_keys=False), "space": yaml.safe_dump(space, sort_keys=False)}


def _task(dataset: str | None) -> str | None:
    return next((d.task for d in datasets.list_datasets(platform().db) if d.name == dataset), None)


def _metric_choices(form: dict[str, str]) -> list[str]:
    registered = datasets.list_datasets(platform().db)
    try:
        dataset = (yaml.safe_load(form.get("base") or "") or {}).get("dataset")
    except (yaml.YAMLError, AttributeError):
        dataset = None
    chosen = next((d for d in registered if d.name == dataset), None)
    tasks = [(chosen.task, chosen.num_classes)] if chosen else sorted({(d.task, d.num_classes) for d in registered})
    return sorted({m for task, n in tasks for m in epoch_metric_names(task, n)})


@ui.get("/sweeps/new")
def sweep_new():
    g.principal.require(Role.MEMBER, "Starting a sweep")
    source = request.args.get("from", type=int)
    form = _initial_form(source)
    return render_template("sweeps/new.html", form=form, errors={}, source=source, metrics=_metric_choices(form))


def _parse(form: dict[str, str]) -> tuple[SweepSpec | None, dict[str, str]]:
    """The sweep spec the form describes, or the errors by the form's field names."""
    data: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for key in ("base", "space"):
        try:
            data[key] = yaml.safe_load(form.get(key) or "") or {}
        except yaml.YAMLError as exc:
            errors[key] = f"not valid YAML: {exc}".splitlines()[0]
    for path in SETTINGS:
        raw = (form.get(path) or "").strip()
        if not raw:
            continue
        *parents, leaf = path.split(".")
        node = data
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = int(raw) if path in NUMBERS and raw.lstrip("-").isdigit() else raw
    if errors:
        return None, errors
    try:
        return SweepSpec.model_validate(data), {}
    except ValidationError as exc:
        for error in exc.errors():
            errors.setdefault(".".join(str(part) for part in error["loc"]) or "form", error["msg"])
        return None, errors


def _form_field(error_field: str) -> str:
    """The form field an error names: space.params.lr is in the space box, base.* in the base box."""
    for box in ("space", "base"):
        if error_field == box or error_field.startswith(box + "."):
            return box
    return error_field if error_field in SETTINGS else "form"


@ui.post("/sweeps/new")
def sweep_submit():
    g.principal.require(Role.MEMBER, "Starting a sweep")
    form = {key: request.form.get(key, "") for key in (*SETTINGS, "base", "space")}
    spec, errors = _parse(form)
    if spec is not None:
        p = platform()
        try:
            sweep = sweeps.submit_sweep(p.db, spec, settings=p.settings, owner=g.principal.user)
        except TrainyardError as exc:
            errors = {e["field"]: e["message"] for e in exc.errors or []} or {"form": exc.detail}
        else:
            flash(f"Sweep {sweep.id} submitted; its first trials start within seconds.", "ok")
            return redirect(url_for("ui.sweep_detail", sweep_id=sweep.id))
    by_field: dict[str, list[str]] = {}
    for field, message in errors.items():
        by_field.setdefault(_form_field(field), []).append(f"{field}: {message}" if field != _form_field(field)
                                                           else message)
    return render_template("sweeps/new.html", form=form, errors=by_field, source=None,
                           metrics=_metric_choices(form)), 422
