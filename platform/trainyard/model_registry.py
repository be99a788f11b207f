"""The model registry (MLflow's): versions from training jobs, aliases moved with a guard and an audit trail."""

from __future__ import annotations

import functools
import re
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from datetime import UTC, datetime
from typing import Any, TypeVar

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sqlalchemy import func, select

from trainyard.config import Settings
from trainyard.db import Database
from trainyard.errors import Conflict, InvalidSpec, NotFound
from trainyard.ml.servable import LoadedModel, load_model_files
from trainyard.models import ModelAliasEvent, to_view
from trainyard.tracking import tracking_client

F = TypeVar("F", bound=Callable[..., Any])

ALIAS_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$"
# Version tags the platform writes; the guard reads PRIMARY_METRIC_TAG.
JOB_TAG, PRIMARY_METRIC_TAG, PRIMARY_VALUE_TAG = "trainyard.job_id", "trainyard.primary_metric", "trainyard.primary_value"


@dataclass(frozen=True)
class ModelVersionView:
    name: str
    version: int
    run_id: str | None
    source: str
    aliases: list[str]
    tags: dict[str, str]
    created_at: datetime
    job_id: int | None
    primary_metric: str | None
    primary_value: float | None
    metrics: dict[str, float]


@dataclass(frozen=True)
class RegisteredModelView:
    name: str
    description: str
    aliases: dict[str, int]
    latest_version: int | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class AliasEventView:
    model_name: str
    alias: str
    from_version: int | None
    to_version: int | None
    forced: bool
    actor: str
    at: datetime
    reason: str


def _when(ms: int | None) -> datetime:
    return datetime.fromtimestamp((ms or 0) / 1000, UTC)


def _version_view(v) -> ModelVersionView:
    tags = dict(v.tags or {})
    value = tags.get(PRIMARY_VALUE_TAG)
    return ModelVersionView(
        name=v.name, version=int(v.version), run_id=v.run_id, source=v.source, aliases=list(v.aliases or []),
        tags=tags, created_at=_when(v.creation_timestamp),
        job_id=int(tags[JOB_TAG]) if tags.get(JOB_TAG, "").isdigit() else None,
        primary_metric=tags.get(PRIMARY_METRIC_TAG), primary_value=float(value) if value else None,
        metrics={k.removeprefix("metric."): float(x) for k, x in tags.items() if k.startswith("metric.")},
    )


def register_version(settings: Settings, *, name: str, model_uri: str, run_id: str, job_id: int,
                     primary_metric: str, metrics: dict[str, float], tags: dict[str, str]) -> ModelVersionView:
    """A new version of `name` (created on first use) from a logged model, tagged with its job and metrics."""
    client = tracking_client(settings)
    try:
        client.create_registered_model(name, tags={"trainyard.managed": "true"})
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version_tags = {
        JOB_TAG: str(job_id), PRIMARY_METRIC_TAG: primary_metric,
        PRIMARY_VALUE_TAG: repr(float(metrics[primary_metric])),
        **{f"metric.{k}": repr(float(v)) for k, v in metrics.items() if isinstance(v, int | float)},
        **tags,
    }
    # MLflow's registry store looks a `models:/m-…` source up through the process's default tracking URI, not
    # the client's: in a process that never logged a model itself (the sweep driver) that is ./mlruns.
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    version = client.create_model_version(name, model_uri, run_id=run_id, tags=version_tags)
    return _version_view(client.get_model_version(name, version.version))


def _mlflow_errors_as_domain_errors(function: F) -> F:
    """What MLflow refuses because of the caller's input (a name with ':' in it, say) is the caller's
    error, a 4xx with MLflow's message; anything else stays an error of ours."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except MlflowException as exc:
            if exc.error_code == "INVALID_PARAMETER_VALUE":
                raise InvalidSpec(exc.message) from None
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise NotFound(exc.message) from None
            raise

    return wrapper  # type: ignore[return-value]


def _client(settings: Settings) -> MlflowClient:
    return tracking_client(settings)


def _get_model(client: MlflowClient, name: str):
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise NotFound(f"No registered model named {name!r}.") from None
        raise


@_mlflow_errors_as_domain_errors
def list_models(settings: Settings) -> list[RegisteredModelView]:
    client = _client(settings)
    models, token = [], None
    while True:
        page = client.search_registered_models(max_results=200, page_token=token, order_by=["name ASC"])
        models.extend(page)
        token = page.token
        if not token:
            break
    return [_model_view(m) for m in models]


def _model_view(m) -> RegisteredModelView:
    latest = max((int(v.version) for v in m.latest_versions or []), default=None)
    return RegisteredModelView(
        name=m.name, description=m.description or "", aliases={a: int(v) for a, v in (m.aliases or {}).items()},
        latest_version=latest, created_at=_when(m.creation_timestamp), updated_at=_when(m.last_updated_timestamp),
    )


@_mlflow_errors_as_domain_errors
def get_model(settings: Settings, name: str) -> tuple[RegisteredModelView, list[ModelVersionView]]:
    client = _client(settings)
    model = _model_view(_get_model(client, name))
    versions = client.search_model_versions(f"name = '{_quote(name)}'", order_by=["version_number DESC"])
    return model, [_version_view(v) for v in versions]


@_mlflow_errors_as_domain_errors
def get_version(settings: Settings, name: str, version: int) -> ModelVersionView:
    if not 0 < version < 2**31:
        raise NotFound(f"Model {name!r} has no version {version}.")
    client = _client(settings)
    _get_model(client, name)
    try:
        return _version_view(client.get_model_version(name, str(version)))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise NotFound(f"Model {name!r} has no version {version}.") from None
        raise


def download_uri(settings: Settings, name: str, version: int) -> str:
    """Where a version's files are (the logged model's artifact location)."""
    get_version(settings, name, version)
    return _client(settings).get_model_version_download_uri(name, str(version))


EXTRA_FILES = "extra_files"


def load_version(settings: Settings, name: str, version: int) -> LoadedModel:
    """Download a version's files and rebuild its model; refuses anything but Trainyard's safetensors recipe."""
    import mlflow.artifacts

    location = download_uri(settings, name, version)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            # Only the weights and the recipe (MLflow keeps a logged model's extra files in extra_files/),
            # not the torch.export program beside them, which is as large as the weights again.
            folder = mlflow.artifacts.download_artifacts(artifact_uri=f"{location.rstrip('/')}/{EXTRA_FILES}",
                                                         dst_path=tmp, tracking_uri=settings.mlflow_tracking_uri)
        except (MlflowException, OSError):  # not logged by Trainyard: load_model_files says why
            folder = mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=tmp,
                                                         tracking_uri=settings.mlflow_tracking_uri)
        return load_model_files(Path(folder), name, version)


@_mlflow_errors_as_domain_errors
def resolve(settings: Settings, name: str, *, alias: str | None = None, version: int | None = None) -> ModelVersionView:
    """The version an alias points at (or the given version)."""
    if version is not None:
        return get_version(settings, name, version)
    client = _client(settings)
    _get_model(client, name)
    try:
        return _version_view(client.get_model_version_by_alias(name, alias or "production"))
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise NotFound(f"Model {name!r} has no alias {alias!r}; promote a version to it first.") from None
        raise


def _quote(name: str) -> str:
    return name.replace("'", "\\'")


def _check_alias(alias: str) -> None:
    if not ALIAS_PATTERN.match(alias) or alias == "latest" or re.fullmatch(r"v\d+", alias):
        # MLflow reserves "latest" and "v<N>" (they name versions in models:/ URIs).
        raise InvalidSpec(f"Alias {alias!r} must match [a-z][a-z0-9-]* and not be 'latest' or 'v<number>' "
                          "(e.g. staging, production).", errors=[{"field": "alias", "message": "invalid alias"}])


@_mlflow_errors_as_domain_errors
def promote(db: Database, settings: Settings, *, name: str, alias: str, version: int, force: bool = False,
            actor: str = "anonymous") -> AliasEventView:
    """Point `alias` at `version`; refuses a version whose primary metric is worse than the holder's unless forced."""
    _check_alias(alias)
    candidate = get_version(settings, name, version)
    client = _client(settings)
    current = _holder(client, name, alias)
    reason = ""
    if current is not None and current.version == candidate.version:
        raise Conflict(f"{name}@{alias} already points at version {version}.")
    if current is not None and not force:
        worse = _worse(candidate, current)
        if worse:
            raise Conflict(worse + " Pass force: true to promote it anyway.")
    if current is not None and force and _worse(candidate, current):
        reason = "forced past the metric guard: " + _worse(candidate, current)
    client.set_registered_model_alias(name, alias, str(version))
    return _audit(db, name, alias, current.version if current else None, version, force, actor, reason)


def _worse(candidate: ModelVersionView, current: ModelVersionView) -> str:
    metric = current.primary_metric or candidate.primary_metric
    if None in (candidate.primary_value, current.primary_value) or candidate.primary_metric != current.primary_metric:
        return ""  # nothing comparable: the guard has no grounds to refuse
    if candidate.primary_value < current.primary_value:
        return (f"Version {candidate.version} has {metric} {candidate.primary_value:.4f}, worse than version "
                f"{current.version}'s {current.primary_value:.4f} that holds the alias.")
    return ""


def _holder(client: MlflowClient, name: str, alias: str) -> ModelVersionView | None:
    try:
        return _version_view(client.get_model_version_by_alias(name, alias))
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None  # nobody holds the alias yet
        raise  # anything else must not silently skip the guard


@_mlflow_errors_as_domain_errors
def remove_alias(db: Database, settings: Settings, *, name: str, alias: str, actor: str = "anonymous") -> AliasEventView:
    _check_alias(alias)
    client = _client(settings)
    _get_model(client, name)
    current = _holder(client, name, alias)
    if current is None:
        raise NotFound(f"Model {name!r} has no alias {alias!r}.")
    client.delete_registered_model_alias(name, alias)
    return _audit(db, name, alias, current.version, None, False, actor, "alias removed")


@_mlflow_errors_as_domain_errors
def rollback(db: Database, settings: Settings, *, name: str, alias: str, actor: str = "anonymous") -> AliasEventView:
    """Move `alias` back to the version it held before its last move (the metric guard does not apply:
    going back is deliberate)."""
    _check_alias(alias)
    last = next((e for e in alias_history(db, settings, name) if e.alias == alias), None)
    if last is None or last.from_version is None:
        raise Conflict(f"{name}@{alias} has no earlier version to roll back to.")
    return promote(db, settings, name=name, alias=alias, version=last.from_version, force=True, actor=actor)


# Caches of alias resolutions in this process (the serving endpoint's), told at once when an alias moves here;
# other processes find out through last_alias_move.
_ALIAS_WATCHERS: weakref.WeakSet = weakref.WeakSet()


def watch_alias_moves(watcher) -> None:
    """Call `watcher.alias_moved(name)` whenever this process moves an alias of model `name`."""
    _ALIAS_WATCHERS.add(watcher)


def last_alias_move(db: Database, name: str) -> int | None:
    """The id of the newest alias event of model `name` (None before the first): a cheap "has any alias of
    this model moved since?" for caches."""
    with db.session_scope() as s:
        return s.scalar(select(func.max(ModelAliasEvent.id)).where(ModelAliasEvent.model_name == name))


def _audit(db: Database, name: str, alias: str, from_version: int | None, to_version: int | None, forced: bool,
           actor: str, reason: str) -> AliasEventView:
    with db.session_scope() as s:
        row = ModelAliasEvent(model_name=name, alias=alias, from_version=from_version, to_version=to_version,
                              forced=forced, actor=actor[:200], reason=reason)
        s.add(row)
        s.flush()
        event = to_view(AliasEventView, row)
    for watcher in list(_ALIAS_WATCHERS):
        watcher.alias_moved(name)
    return event


@_mlflow_errors_as_domain_errors
def alias_history(db: Database, settings: Settings, name: str) -> list[AliasEventView]:
    _get_model(_client(settings), name)
    with db.session_scope() as s:
        rows = s.scalars(select(ModelAliasEvent).where(ModelAliasEvent.model_name == name)
                         .order_by(ModelAliasEvent.id.desc()))
        return [to_view(AliasEventView, r) for r in rows]
