"""REST API v1 for the model registry (browse, promote, roll back) and the prediction endpoint."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from apiflask import APIBlueprint
from flask import request

from trainyard import auth, model_registry
from trainyard.auth import Role
from trainyard.errors import InvalidSpec
from trainyard_web.runtime import platform
from trainyard_web.security import current_principal, requires
from trainyard_web.schemas import (
    AliasEventListOut,
    AliasEventOut,
    ModelDetailOut,
    ModelListOut,
    ModelOut,
    ModelVersionOut,
    PredictionOut,
    PredictQuery,
    PromoteIn,
)

registry_api = APIBlueprint("models", __name__, url_prefix="/api/v1", tag="Models")
serving_api = APIBlueprint("serving", __name__, url_prefix="/api/v1", tag="Serving")


def _links(name: str, version: int | None = None, run_id: str | None = None) -> dict[str, str]:
    s = platform().settings
    ui = f"http://{s.mlflow_host}:{s.mlflow_port}"
    links = {"mlflow_model": f"{ui}/#/models/{name}" + (f"/versions/{version}" if version else "")}
    if run_id:
        links["mlflow_run"] = f"{ui}/#/runs/{run_id}"
    return links


def _version_out(v: model_registry.ModelVersionView) -> ModelVersionOut:
    return ModelVersionOut.model_validate(v).model_copy(update={"links": _links(v.name, v.version, v.run_id)})


@registry_api.get("/models")
@registry_api.output(ModelListOut)
@registry_api.doc(summary="Registered models with their latest version and aliases")
@requires(Role.VIEWER)
def list_models():
    models = model_registry.list_models(platform().settings)
    return ModelListOut(items=[ModelOut.model_validate(m).model_copy(update={"links": _links(m.name)})
                               for m in models])


@registry_api.get("/models/<name>")
@registry_api.output(ModelDetailOut)
@registry_api.doc(summary="A registered model with every version", responses=[200, 404])
@requires(Role.VIEWER)
def get_model(name: str):
    model, versions = model_registry.get_model(platform().settings, name)
    return ModelDetailOut(**{**ModelOut.model_validate(model).model_dump(), "links": _links(name)},
                          versions=[_version_out(v) for v in versions])


@registry_api.get("/models/<name>/versions/<int:version>")
@registry_api.output(ModelVersionOut)
@registry_api.doc(summary="One model version: metrics, source job, aliases", responses=[200, 404])
@requires(Role.VIEWER)
def get_version(name: str, version: int):
    return _version_out(model_registry.get_version(platform().settings, name, version))


@registry_api.put("/models/<name>/aliases/<alias>")
@registry_api.input(PromoteIn, location="json", arg_name="body")
@registry_api.output(AliasEventOut)
@registry_api.doc(summary="Point an alias at a version (refused if its metric is worse, unless forced)",
                  responses=[200, 404, 409, 422])
@requires(Role.MEMBER)
def promote(name: str, alias: str, body: PromoteIn):
    auth.check_alias_move(current_principal(), alias)
    p = platform()
    event = model_registry.promote(p.db, p.settings, name=name, alias=alias, version=body.version,
                                   force=body.force, actor=current_principal().user)
    return AliasEventOut.model_validate(event)


@registry_api.delete("/models/<name>/aliases/<alias>")
@registry_api.output(AliasEventOut)
@registry_api.doc(summary="Remove an alias", responses=[200, 404])
@requires(Role.MEMBER)
def remove_alias(name: str, alias: str):
    auth.check_alias_move(current_principal(), alias)
    p = platform()
    return AliasEventOut.model_validate(model_registry.remove_alias(p.db, p.settings, name=name, alias=alias,
                                                                    actor=current_principal().user))


@registry_api.get("/models/<name>/history")
@registry_api.output(AliasEventListOut)
@registry_api.doc(summary="Every alias move of a model, newest first", responses=[200, 404])
@requires(Role.VIEWER)
def history(name: str):
    p = platform()
    return AliasEventListOut(items=[AliasEventOut.model_validate(e)
                                    for e in model_registry.alias_history(p.db, p.settings, name)])


@serving_api.post("/models/<name>/predict")
@serving_api.input(PredictQuery, location="query", arg_name="query")
@serving_api.output(PredictionOut)
@serving_api.doc(summary="Predict with a registered model (multipart image files, or JSON base64 images)",
                 responses=[200, 404, 409, 413, 422])
@requires(Role.MEMBER)
def predict(name: str, query: PredictQuery):
    files = _uploaded_images()
    return platform().models.predict(name, files, alias=query.alias, version=query.version, top_k=query.top_k)


def _uploaded_images() -> list[tuple[str, bytes]]:
    if request.files:
        return [(f.filename or key, f.read()) for key in request.files for f in request.files.getlist(key)]
    body: Any = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("images"), list):
        raise InvalidSpec('Send images as multipart files, or as JSON {"images": ["<base64>", ...]} '
                          '(items may also be {"name": ..., "data": "<base64>"}).')
    files = []
    for index, item in enumerate(body["images"]):
        name, data = (item.get("name", f"images[{index}]"), item.get("data")) if isinstance(item, dict) \
            else (f"images[{index}]", item)
        if not isinstance(data, str):
            raise InvalidSpec(f"{name}: expected a base64 string.")
        try:
            files.append((str(name), base64.b64decode(data, validate=True)))
        except (binascii.Error, ValueError):
            raise InvalidSpec(f"{name}: not valid base64.") from None
    return files
