"""Checks a job spec's schema cannot make: against datasets, earlier jobs, the model registry and files.

Each job kind has its checker; a checker returns the spec to store, with references resolved (an alias
becomes the version it pointed at when the job was submitted, so a job is reproducible).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from trainyard import model_registry
from trainyard.config import Settings
from trainyard.datasets import DatasetView, get_dataset, resolve_under_roots
from trainyard.db import Database
from trainyard.errors import InvalidSpec, NotFound
from trainyard.ml.architectures import ARCHITECTURES, validate_options
from trainyard.models import Job, JobStatus
from trainyard.specs import JobSpec, TrainParams


def _invalid(field: str, detail: str) -> InvalidSpec:
    return InvalidSpec(detail, errors=[{"field": field, "message": detail}])


def _refuse_fields(spec: JobSpec, fields: tuple[str, ...]) -> None:
    for field in fields:
        if getattr(spec, field) is not None:
            raise _invalid(field, f"{field} does not apply to a {spec.kind} job.")


def _dataset(db: Database, spec: JobSpec) -> DatasetView:
    if spec.dataset is None:
        raise _invalid("dataset", f"A {spec.kind} job needs a dataset; see GET /api/v1/datasets.")
    try:
        return get_dataset(db, spec.dataset)
    except NotFound as exc:
        raise _invalid("dataset", exc.detail) from None


def _check_architecture(spec: JobSpec, dataset: DatasetView) -> dict[str, Any]:
    arch = ARCHITECTURES.get(spec.architecture).obj
    if arch.task != dataset.task:
        fitting = [a.name for a in ARCHITECTURES if a.obj.task == dataset.task]
        raise _invalid("architecture",
                       f"Architecture {arch.name!r} is for {arch.task}, but dataset {dataset.name!r} is a "
                       f"{dataset.task} dataset; architectures that fit it: {', '.join(fitting) or 'none yet'}.")
    options = validate_options(arch.name, spec.architecture_options)
    multiple = 2 ** options["depth"] if "depth" in options else arch.size_multiple
    size = [spec.params.image_size] * 2 if spec.params.image_size else dataset.image_shape[1:]
    if any(side % multiple for side in size):
        raise _invalid("params.image_size",
                       f"{arch.name} needs image sides divisible by {multiple}; {dataset.name!r} loads at "
                       f"{size[0]}×{size[1]}. Set params.image_size to a multiple of {multiple}.")
    return options


def _check_train(db: Database, spec: JobSpec, settings: Settings) -> JobSpec:
    _refuse_fields(spec, ("source_job", "model_version", "alias", "path"))
    if spec.architecture is None:
        raise _invalid("architecture", "A train job needs an architecture; see GET /api/v1/architectures.")
    dataset = _dataset(db, spec)
    updates: dict[str, Any] = {"architecture_options": _check_architecture(spec, dataset)}
    if spec.weights_path is not None:
        updates["weights_path"] = str(
            resolve_under_roots(spec.weights_path, settings.dataset_roots, "weights_path", want="file"))
    return spec.model_copy(update=updates)


def _model_version(spec: JobSpec, settings: Settings) -> model_registry.ModelVersionView:
    if spec.model_name is None:
        raise _invalid("model_name", f"A {spec.kind} job needs model_name (and model_version or alias).")
    if spec.model_version is not None and spec.alias is not None:
        raise _invalid("alias", "Give model_version or alias, not both.")
    try:
        return model_registry.resolve(settings, spec.model_name, alias=spec.alias, version=spec.model_version)
    except NotFound as exc:
        raise _invalid("model_name", exc.detail) from None


def _check_evaluate(db: Database, spec: JobSpec, settings: Settings) -> JobSpec:
    _refuse_fields(spec, ("path", "weights_path"))
    dataset = _dataset(db, spec)
    if (spec.source_job is None) == (spec.model_name is None):
        raise _invalid("source_job", "An evaluate job scores either a finished training job (source_job) or a "
                                     "registered model (model_name with model_version or alias): give one.")
    if spec.source_job is not None:
        trained_on, source_spec = _source_job(db, spec.source_job)
    else:
        version = _model_version(spec, settings)
        source_spec = _version_job_spec(db, version)
        trained_on = version.tags.get("trainyard.dataset", "")
        spec = spec.model_copy(update={"model_version": version.version, "alias": None})
    if spec.architecture not in (None, source_spec["architecture"]):
        raise _invalid("architecture", f"That model is a {source_spec['architecture']!r}; leave architecture "
                                       "out of an evaluate job.")
    _same_classes(db, trained_on, dataset)
    return spec.model_copy(update={
        "architecture": source_spec["architecture"],
        "architecture_options": source_spec.get("architecture_options", {}),
        "params": TrainParams.model_validate(source_spec["params"]),
    })


def _check_predict(db: Database, spec: JobSpec, settings: Settings) -> JobSpec:
    _refuse_fields(spec, ("dataset", "source_job", "weights_path"))
    if spec.path is None:
        raise _invalid("path", "A predict job needs path: a folder of images under the dataset roots.")
    folder = resolve_under_roots(spec.path, settings.dataset_roots, "path", want="dir")
    version = _model_version(spec, settings)
    return spec.model_copy(update={"path": str(folder), "model_version": version.version, "alias": None,
                                   "architecture": version.tags.get("trainyard.architecture")})


def _source_job(db: Database, job_id: int) -> tuple[str, dict[str, Any]]:
    """(dataset, spec) of a finished training job."""
    with db.read_scope() as s:
        source = s.get(Job, job_id)
        if source is None:
            raise _invalid("source_job", f"No job with id {job_id}.")
        if source.kind != "train" or source.status != JobStatus.SUCCEEDED or not source.checkpoint_path:
            raise _invalid("source_job", f"Job {job_id} is a {source.status} {source.kind} job; evaluate needs a "
                                         "SUCCEEDED training job (it has the trained weights).")
        return source.dataset, dict(source.spec)


def _version_job_spec(db: Database, version: model_registry.ModelVersionView) -> dict[str, Any]:
    if version.job_id is None:
        raise _invalid("model_name", f"{version.name} version {version.version} was not trained by Trainyard.")
    with db.read_scope() as s:
        spec = s.scalar(select(Job.spec).where(Job.id == version.job_id))
    if spec is None:
        raise _invalid("model_name", f"The job that trained {version.name} version {version.version} is gone.")
    return spec


def _same_classes(db: Database, trained_on: str, dataset: DatasetView) -> None:
    try:
        source = get_dataset(db, trained_on)
    except NotFound:
        return  # the training dataset was removed; the worker still checks the class count against the model
    if (source.task, source.num_classes) != (dataset.task, dataset.num_classes):
        raise _invalid("dataset", f"The model predicts {source.num_classes} {source.task} classes "
                                  f"(trained on {source.name!r}); dataset {dataset.name!r} has "
                                  f"{dataset.num_classes} {dataset.task} classes.")


CHECKS: dict[str, Callable[[Database, JobSpec, Settings], JobSpec]] = {
    "train": _check_train, "evaluate": _check_evaluate, "predict": _check_predict,
}


def _check_resources(spec: JobSpec, settings: Settings) -> JobSpec:
    """Name the queue (the platform's default unless given) and check the device count fits the job."""
    gpus = spec.resources.gpus
    if gpus > 1 and spec.kind != "train":
        raise _invalid("resources.gpus", f"Only a train job runs on several devices; a {spec.kind} job takes 1.")
    if gpus > spec.params.batch_size:
        raise _invalid("resources.gpus", f"params.batch_size ({spec.params.batch_size}) is split across the "
                                         f"{gpus} devices; it must be at least {gpus}.")
    resources = spec.resources.model_copy(update={"queue": spec.resources.queue or settings.queue})
    return spec.model_copy(update={"resources": resources})


def checked_spec(db: Database, spec: JobSpec, settings: Settings) -> JobSpec:
    """The spec to store for a job of its kind, or InvalidSpec naming the field at fault."""
    return CHECKS[spec.kind](db, _check_resources(spec, settings), settings)


def default_name(spec: JobSpec) -> str:
    if spec.kind == "train":
        return f"{spec.architecture}-{spec.dataset}"
    if spec.kind == "evaluate":
        source = f"job{spec.source_job}" if spec.source_job else f"{spec.model_name}-v{spec.model_version}"
        return f"evaluate-{source}-{spec.dataset}"
    return f"predict-{spec.model_name}-v{spec.model_version}-{Path(spec.path or '').name}"
