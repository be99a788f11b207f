"""Trainyard's web process: the REST API, the server-rendered UI and (later) the serving endpoints."""

from __future__ import annotations

import torch
from apiflask import APIFlask
from flask import g

from trainyard import __version__
from trainyard.config import Settings
from trainyard.datasets import ensure_builtin_datasets
from trainyard.db import Database, check_schema
from trainyard.queueing import CeleryDispatch
from trainyard_web.api import api
from trainyard_web.models_api import registry_api, serving_api
from trainyard_web.problems import RetryRequest, register_problem_handlers
from trainyard_web.runtime import EXTENSION_KEY, Platform
from trainyard_web.serving import ModelServer
from trainyard_web.sweeps_api import sweeps_api
from trainyard_web.tokens_api import tokens_api
from trainyard_web.ui import ui
from trainyard_web import metrics, security


MAX_REQUEST_BYTES = 64 * 1024 * 1024  # prediction uploads; anything larger is a 413 problem response
REQUEST_SESSION_KEY = "trainyard_request_session"


class TrainyardFlask(APIFlask):
    """APIFlask that runs a read once more when its database connection turned out to be dead (the pool does
    not pre-ping: that would cost a round trip on every request)."""

    def full_dispatch_request(self):
        try:
            return super().full_dispatch_request()
        except RetryRequest:
            _close_request_session()
            g.database_retried = True
            return super().full_dispatch_request()


def _open_request_session() -> None:
    """One database session for the whole request: authentication and the view read on one connection."""
    from trainyard_web.runtime import platform

    scope = platform().db.request_scope()
    scope.__enter__()
    setattr(g, REQUEST_SESSION_KEY, scope)


def _close_request_session(_exc: BaseException | None = None) -> None:
    scope = g.pop(REQUEST_SESSION_KEY, None)
    if scope is not None:
        scope.__exit__(None, None, None)


def create_app(settings: Settings | None = None, *, serving_only: bool = False) -> APIFlask:
    """Build the web app for `settings` (read from the environment now if not given).

    `serving_only` builds the prediction server alone (`trainyard serve`), so inference scales apart from
    the API. Refuses to start on a database whose schema is not at the migrations' head.
    """
    settings = settings or Settings()
    db = Database(settings.database_url)
    check_schema(db)
    ensure_builtin_datasets(db)

    app = TrainyardFlask(
        __name__,
        title="Trainyard API",
        version=__version__,
        spec_path="/api/v1/openapi.json",
        docs_path=None,  # the docs UI loads scripts from a CDN; the machine-readable spec is enough offline
    )
    app.config["SYNC_LOCAL_SPEC"] = False
    app.config["VALIDATION_ERROR_STATUS_CODE"] = 422
    app.json.sort_keys = False
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    app.extensions[EXTENSION_KEY] = Platform(settings=settings, db=db, dispatch=CeleryDispatch(settings),
                                             models=ModelServer(settings, db))
    register_problem_handlers(app)
    app.before_request(_open_request_session)  # before authentication's hook, which reads in this session
    app.teardown_request(_close_request_session)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)  # `trainyard serve` sets one share of the cores per process
    limiter = security.install(app, body_limits={
        "serving.predict": MAX_REQUEST_BYTES,
        "api.upload_dataset": settings.max_upload_bytes,
    }, token_cache_seconds=settings.serving_token_cache_seconds if serving_only else 0.0)
    security.document(app)
    app.register_blueprint(serving_api)
    if not serving_only:
        app.register_blueprint(api)
        app.register_blueprint(registry_api)
        app.register_blueprint(tokens_api)
        app.register_blueprint(sweeps_api)
        app.register_blueprint(ui)
        metrics.install(app)
    _apply_rate_limits(app, limiter, settings)
    return app


def _apply_rate_limits(app: APIFlask, limiter, settings: Settings) -> None:
    limits = {
        "ui.login": (settings.login_rate_limit, None),  # per client address
        "serving.predict": (settings.predict_rate_limit, security.rate_key_by_caller),
    }
    for endpoint, (value, key_func) in limits.items():
        if endpoint in app.view_functions:
            app.view_functions[endpoint] = limiter.limit(value, key_func=key_func,
                                                         methods=["POST"])(app.view_functions[endpoint])


def create_serving_app(settings: Settings | None = None) -> APIFlask:
    """The prediction endpoint on its own (what `trainyard serve` runs under gunicorn)."""
    return create_app(settings, serving_only=True)
