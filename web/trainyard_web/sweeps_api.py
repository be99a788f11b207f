"""REST API v1 for sweeps: submit one, follow it, list them, cancel one."""

from __future__ import annotations

from apiflask import APIBlueprint
from flask import url_for

from trainyard import sweeps
from trainyard.auth import Role
from trainyard.sweep_specs import SweepSpec
from trainyard_web.runtime import platform
from trainyard_web.schemas import SweepListQuery, SweepOut, SweepPageOut
from trainyard_web.security import current_principal, requires

sweeps_api = APIBlueprint("sweeps", __name__, url_prefix="/api/v1", tag="Sweeps")


@sweeps_api.post("/sweeps")
@sweeps_api.input(SweepSpec, location="json", arg_name="spec")
@sweeps_api.output(SweepOut, status_code=201)
@sweeps_api.doc(summary="Submit a sweep: a hyperparameter search whose trials are train jobs",
                responses=[201, 422])
@requires(Role.MEMBER)
def submit_sweep(spec: SweepSpec):
    p = platform()
    sweep = sweeps.submit_sweep(p.db, spec, settings=p.settings, owner=current_principal().user)
    return SweepOut.model_validate(sweep), 201, {"Location": url_for("sweeps.get_sweep", sweep_id=sweep.id)}


@sweeps_api.get("/sweeps")
@sweeps_api.input(SweepListQuery, location="query", arg_name="query")
@sweeps_api.output(SweepPageOut)
@sweeps_api.doc(summary="List sweeps, newest first, with their trials counted by status")
@requires(Role.VIEWER)
def list_sweeps(query: SweepListQuery):
    items, next_before = sweeps.list_sweeps(platform().db, limit=query.limit, before=query.before)
    return SweepPageOut(items=[SweepOut.model_validate(s) for s in items], next_before=next_before)


@sweeps_api.get("/sweeps/<int:sweep_id>")
@sweeps_api.output(SweepOut)
@sweeps_api.doc(summary="A sweep with every trial: its values, status, objective and per-epoch reports",
                responses=[200, 404])
@requires(Role.VIEWER)
def get_sweep(sweep_id: int):
    return SweepOut.model_validate(sweeps.get_sweep(platform().db, sweep_id))


@sweeps_api.post("/sweeps/<int:sweep_id>/cancel")
@sweeps_api.output(SweepOut, status_code=202)
@sweeps_api.doc(summary="Cancel a sweep: no more trials start; queued and running ones are cancelled",
                responses=[202, 403, 404, 409])
@requires(Role.MEMBER)
def cancel_sweep(sweep_id: int):
    p = platform()
    return SweepOut.model_validate(sweeps.cancel_sweep(p.db, p.settings, sweep_id, actor=current_principal())), 202
