"""Checks of a sweep spec that need the job spec's own rules and the database: every searched field exists in
the job spec and every value the space can take passes the spec's bounds and the train checks, a grid fits the
trial budget, and the objective is a metric the task records each epoch. Errors name the field (422)."""

from __future__ import annotations

import copy
from typing import Any

from pydantic import ValidationError

from trainyard.config import Settings
from trainyard.datasets import get_dataset
from trainyard.db import Database
from trainyard.errors import InvalidSpec
from trainyard.ml.metrics import epoch_metric_names
from trainyard.spec_checks import checked_spec
from trainyard.specs import JobSpec, TrainParams
from trainyard.sweep_specs import Dimension, SweepSpec

SEARCHABLE_ROOTS = ("params", "architecture", "architecture_options")
_FLOAT_FIELDS = {name for name, field in TrainParams.model_fields.items() if field.annotation in (float, float | None)}
_INT_FIELDS = {name for name, field in TrainParams.model_fields.items() if field.annotation in (int, int | None)}


def _invalid(errors: list[dict[str, str]]) -> InvalidSpec:
    return InvalidSpec("; ".join(f"{e['field']}: {e['message']}" for e in errors), errors=errors)


def with_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The base spec (as JSON) with each `path: value` of `params` set (paths like params.lr)."""
    spec = copy.deepcopy(base)
    for path, value in params.items():
        *parents, leaf = path.split(".")
        node = spec
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return spec


def _path_problem(path: str, dim: Dimension) -> str | None:
    """Why `path` cannot be searched with `dim`, or None."""
    root, _, rest = path.partition(".")
    if root not in JobSpec.model_fields:
        return f"the job spec has no field {root!r}; searchable: params.<name>, architecture, architecture_options.<name>"
    if root not in SEARCHABLE_ROOTS:
        return f"{root} is fixed for a sweep (set it in base); searchable: params.*, architecture, architecture_options.*"
    if root == "architecture":
        return None if not rest and dim.type == "choice" else "architecture is searched as a choice of names"
    if not rest or "." in rest:
        return f"name one field: {root}.<name>"
    if root == "params":
        if rest not in TrainParams.model_fields:
            return f"the job spec's params have no field {rest!r}; they are: {', '.join(TrainParams.model_fields)}"
        if rest == "epochs":
            return "params.epochs is each trial's budget: set it in base (early stopping shortens trials)"
        if dim.type in ("uniform", "loguniform") and rest not in _FLOAT_FIELDS:
            return f"params.{rest} is not a number range; search it as " + ("int" if rest in _INT_FIELDS else "choice")
        if dim.type == "int" and rest not in _INT_FIELDS | _FLOAT_FIELDS:
            return f"params.{rest} is not a number; search it as a choice"
    return None


def _check_values(db: Database, base: JobSpec, path: str, dim: Dimension, settings: Settings) -> str | None:
    """Each value `dim` can reach (choices, a range's ends) set in the base spec must pass the spec's schema
    and the train checks (bounds, registered names, the architecture's options, image sizes)."""
    base_json = base.model_dump(mode="json")
    for value in dim.bounds():
        try:
            checked_spec(db, JobSpec.model_validate(with_params(base_json, {path: value})), settings)
        except ValidationError as exc:
            first = exc.errors()[0]
            return f"{value!r} is not allowed: {first['msg']}"
        except InvalidSpec as exc:
            return f"{value!r} is not allowed: {exc.detail}"
    return None


def checked_sweep(db: Database, spec: SweepSpec, settings: Settings) -> SweepSpec:
    """The sweep spec to store (base checked and resolved, budgets settled), or InvalidSpec naming each field
    at fault; nothing is written."""
    if spec.base.kind != "train":
        raise _invalid([{"field": "base.kind", "message": "a sweep searches train jobs"}])
    try:
        base = checked_spec(db, spec.base, settings)
    except InvalidSpec as exc:
        raise _invalid([{**e, "field": f"base.{e['field']}"} for e in exc.errors or []] or
                       [{"field": "base", "message": exc.detail}]) from None
    errors = []
    for path, dim in spec.space.items():
        problem = _path_problem(path, dim) or _check_values(db, base, path, dim, settings)
        if problem:
            errors.append({"field": f"space.{path}", "message": problem})
    grid = spec.grid_size()
    if spec.algorithm == "grid":
        continuous = [path for path, dim in spec.space.items() if dim.grid_values() is None]
        errors += [{"field": f"space.{path}", "message": "a grid needs discrete values: give the range a step, "
                                                         "or make it a choice"} for path in continuous]
        if grid is not None and grid > spec.max_trials:
            errors.append({"field": "max_trials", "message": f"the grid has {grid} points but max_trials is "
                                                             f"{spec.max_trials}: raise it or shrink the space"})
    dataset = get_dataset(db, base.dataset)
    recorded = epoch_metric_names(dataset.task, dataset.num_classes)
    if spec.objective.metric not in recorded:
        errors.append({"field": "objective.metric",
                       "message": f"{spec.objective.metric!r} is not recorded each epoch of a {dataset.task} job "
                                  f"on {dataset.name!r}; choose one of: {', '.join(recorded)}"})
    if spec.early_stopping.type != "none" and spec.early_stopping.min_epochs >= base.params.epochs:
        errors.append({"field": "early_stopping.min_epochs",
                       "message": f"trials run {base.params.epochs} epochs; early stopping can only act after "
                                  f"min_epochs ({spec.early_stopping.min_epochs}), so it must be fewer"})
    if errors:
        raise _invalid(errors)
    # A grid visits each point once: a budget beyond its size would only repeat points.
    return spec.model_copy(update={"base": base, "max_trials": min(spec.max_trials, grid or spec.max_trials),
                                   "model_name": spec.model_name or base.model_name})

