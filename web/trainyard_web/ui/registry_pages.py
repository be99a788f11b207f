"""Dataset and model-registry pages: scan reports and samples, registration, promotion, and "try it"."""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path

from flask import abort, flash, g, redirect, render_template, request, url_for

from trainyard import auth, datasets, model_registry
from trainyard.archives import Limits
from trainyard.auth import Role
from trainyard.dataset_samples import sample_pngs
from trainyard.errors import NotFound, TrainyardError
from trainyard.ml.datasets import FORMATS
from trainyard.ml.metrics import mask_png_in_colour
from trainyard_web.runtime import platform
from trainyard_web.ui import ui

ALIASES = ("production", "staging", "candidate")


# ---- datasets --------------------------------------------------------------------------------------


def _formats() -> list[tuple[str, str]]:
    return [(f.name, f.description or f.name) for f in FORMATS if not f.obj.builtin]


@ui.get("/datasets")
def dataset_list(errors: dict[str, str] | None = None, values: dict[str, str] | None = None, status: int = 200):
    return render_template("registry/datasets.html", datasets=datasets.list_datasets(platform().db),
                           formats=_formats(), roots=platform().settings.dataset_roots,
                           errors=errors or {}, values=values or {}), status


@ui.get("/datasets/<name>")
def dataset_detail(name: str):
    db = platform().db
    try:
        dataset = datasets.get_dataset(db, name)
    except NotFound:
        abort(404)
    grid = [(label, [base64.b64encode(png).decode() for png in pngs]) for label, pngs in sample_pngs(db, name)]
    return render_template("registry/dataset.html", dataset=dataset, grid=grid)


@ui.post("/datasets")
def dataset_register():
    g.principal.require(Role.MEMBER, "Registering a dataset")
    p = platform()
    values = {k: request.form.get(k, "").strip() for k in ("name", "format", "path")}
    archive = request.files.get("archive")
    try:
        if archive and archive.filename:
            with tempfile.NamedTemporaryFile(dir=p.settings.ensure_data_dir(), prefix=".upload-") as spool:
                archive.save(spool)
                spool.flush()
                dataset = datasets.register_uploaded_dataset(
                    p.db, p.settings.dataset_roots, name=values["name"], format=values["format"],
                    archive=Path(spool.name),
                    limits=Limits(p.settings.max_unpacked_bytes, p.settings.max_unpacked_files))
        else:
            dataset = datasets.register_dataset(p.db, p.settings.dataset_roots, name=values["name"],
                                                format=values["format"], path=values["path"])
    except TrainyardError as exc:
        errors = {e["field"]: e["message"] for e in exc.errors} or {"": exc.detail}
        if "path" in errors or not errors.keys() & {"name", "format", "path"}:
            errors.setdefault("", exc.detail)
        return dataset_list(errors=errors, values=values, status=422)
    flash(f"Registered {dataset.name}: {dataset.num_samples} images, {dataset.num_classes} classes.", "ok")
    return redirect(url_for("ui.dataset_detail", name=dataset.name))


# ---- models ----------------------------------------------------------------------------------------


@ui.get("/models")
def model_list():
    return render_template("registry/models.html", models=model_registry.list_models(platform().settings))


@ui.get("/models/<name>")
def model_detail(name: str):
    p = platform()
    try:
        model, versions = model_registry.get_model(p.settings, name)
    except NotFound:
        abort(404)
    history = model_registry.alias_history(p.db, p.settings, name)
    can_roll_back = sorted({e.alias for e in history if e.from_version is not None})
    return render_template("registry/model.html", model=model, versions=versions, history=history,
                           aliases=ALIASES, can_roll_back=can_roll_back, result=None)


def _registry_action(name: str, action, done: str):
    try:
        event = action()
        flash(done.format(event=event), "ok")
    except TrainyardError as exc:
        flash(exc.detail, "error")
    return redirect(url_for("ui.model_detail", name=name))


@ui.post("/models/<name>/promote")
def model_promote(name: str):
    p = platform()
    alias = request.form.get("alias", "").strip()
    version = request.form.get("version", type=int)

    def promote():
        g.principal.require(Role.MEMBER, "Moving an alias")
        auth.check_alias_move(g.principal, alias)
        if version is None:
            raise TrainyardError("Choose a version.")
        return model_registry.promote(p.db, p.settings, name=name, alias=alias, version=version,
                                      force="force" in request.form, actor=g.principal.user)

    return _registry_action(name, promote, "{event.alias} now points at version {event.to_version}.")


@ui.post("/models/<name>/rollback")
def model_rollback(name: str):
    p = platform()
    alias = request.form.get("alias", "").strip()

    def rollback():
        g.principal.require(Role.MEMBER, "Rolling back an alias")
        auth.check_alias_move(g.principal, alias)
        return model_registry.rollback(p.db, p.settings, name=name, alias=alias, actor=g.principal.user)

    return _registry_action(name, rollback, "{event.alias} rolled back to version {event.to_version}.")


@ui.post("/models/<name>/try")
def model_try(name: str):
    """Predict on uploaded images with an alias or version, as the REST endpoint would."""
    p = platform()
    target = request.form.get("target", "alias:production")
    kind, _, value = target.partition(":")
    files = [(f.filename or "image", f.read()) for f in request.files.getlist("images") if f.filename]
    try:
        g.principal.require(Role.MEMBER, "Predicting")
        result = p.models.predict(name, files, alias=value if kind == "alias" else None,
                                  version=int(value) if kind == "version" and value.isdigit() else None, top_k=5)
    except TrainyardError as exc:
        return render_template("registry/try_result.html", error=exc.detail, result=None), 200
    if result["task"] == "segmentation":
        classes = len(next(iter(result["predictions"]), {}).get("class_fractions", {})) or 2
        for prediction in result["predictions"]:
            coloured = mask_png_in_colour(base64.b64decode(prediction["mask_png"]), classes)
            prediction["mask_preview"] = base64.b64encode(coloured).decode()
    return render_template("registry/try_result.html", error=None, result=result)
