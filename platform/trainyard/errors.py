"""Domain errors: what a user can cause, with a message they can act on and the HTTP status it maps to."""

from __future__ import annotations

from typing import Any


class TrainyardError(Exception):
    """Base of every error a caller can cause or act on; `status` is the HTTP status it maps to."""

    status = 400
    title = "Bad request"

    def __init__(self, detail: str, *, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []


class InvalidSpec(TrainyardError):
    status = 422
    title = "Invalid job spec"


class NotFound(TrainyardError):
    status = 404
    title = "Not found"


class Conflict(TrainyardError):
    status = 409
    title = "Conflict"


class ServiceUnavailable(TrainyardError):
    status = 503
    title = "Service unavailable"


class SchemaOutOfDate(TrainyardError):
    """The database schema is not at the migrations' head; the process must not start."""

    status = 503
    title = "Database schema out of date"


class Unauthorized(TrainyardError):
    status = 401
    title = "Authentication required"


class Forbidden(TrainyardError):
    status = 403
    title = "Forbidden"
