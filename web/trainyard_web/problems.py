"""Every error leaves as `application/problem+json` (RFC 9457) with a message a person can act on."""

from __future__ import annotations

import logging
from typing import Any

from apiflask import APIFlask
from apiflask.exceptions import HTTPError
from flask import g, request
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from werkzeug.exceptions import HTTPException

from trainyard.errors import TrainyardError, Unauthorized

PROBLEM = "application/problem+json"
log = logging.getLogger(__name__)


class RetryRequest(Exception):
    """Raised (once) for a read whose pooled connection the server had dropped: run the request again on a
    fresh connection. Raised from the error handler, so the app's `full_dispatch_request` catches it."""


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def problem(status: int, title: str, detail: str, errors: list[dict[str, Any]] | None = None):
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    if errors:
        body["errors"] = errors
    return body, status, {"Content-Type": PROBLEM}


def _validation_errors(detail: Any) -> list[dict[str, Any]]:
    """APIFlask's {"json": {"params.epochs": ["msg"]}} → [{"field": "params.epochs", "message": "msg"}]."""
    errors = []
    if isinstance(detail, dict):
        for location in detail.values():
            if isinstance(location, dict):
                for field, messages in location.items():
                    for message in messages if isinstance(messages, list) else [messages]:
                        errors.append({
                            "field": "(body)" if field == "_schema" else field,
                            "message": str(message).removeprefix("Value error, "),  # pydantic's prefix
                        })
    return errors


def register_problem_handlers(app: APIFlask) -> None:
    @app.error_processor
    def _http_error(error: HTTPError):
        errors = _validation_errors(error.detail)
        if errors:
            detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
            return problem(error.status_code, "Invalid request", detail, errors)
        if error.status_code == 400 and request.method in ("POST", "PUT", "PATCH"):
            return problem(400, "Malformed request body",
                           "The request body is not valid JSON; send a JSON object with "
                           "Content-Type: application/json.")
        detail = error.message if isinstance(error.message, str) else str(error.message)
        return problem(error.status_code, detail, _http_detail(error.status_code, detail))

    @app.errorhandler(TrainyardError)
    def _domain_error(error: TrainyardError):
        body, status, headers = problem(error.status, error.title, error.detail, error.errors)
        if isinstance(error, Unauthorized):
            headers["WWW-Authenticate"] = 'Bearer realm="trainyard"'
        return body, status, headers

    @app.errorhandler(DBAPIError)
    def _database_unreachable(error: DBAPIError):
        if not error.connection_invalidated and not isinstance(error, (OperationalError, InterfaceError)):
            return _unexpected(error)
        if error.connection_invalidated and request.method in SAFE_METHODS and not g.get("database_retried"):
            # A connection the server dropped (a restart, an idle timeout): the pool has replaced it, and
            # nothing was written, so the caller need not see it.
            raise RetryRequest from error
        # The pool reconnects on the next request: tell the caller to come back, not that we broke.
        log.warning("database unreachable on %s %s: %s", request.method, request.path, error.orig)
        body, status, headers = problem(503, "Database unreachable",
                                        "The platform database did not answer; retry in a few seconds.")
        headers["Retry-After"] = "5"
        return body, status, headers

    @app.errorhandler(Exception)
    def _unexpected(error: Exception):
        if isinstance(error, HTTPException):
            return problem(error.code or 500, error.name, error.description or error.name)
        log.exception("unhandled error on %s %s", request.method, request.path)
        return problem(500, "Internal server error",
                       "The server failed to handle this request; the error is in its log.")


def _http_detail(status: int, title: str) -> str:
    if status == 404:
        return f"Nothing at {request.path}; see /api/v1/openapi.json for the API's routes."
    if status == 405:
        return f"{request.method} is not allowed on {request.path}."
    if status == 415:
        return "Send the body as JSON with Content-Type: application/json."
    return title
