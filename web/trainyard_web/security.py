"""Who may call what: bearer tokens on the API, a session login on the UI, CSRF, body and rate limits.

The API authenticates with `Authorization: Bearer` only, never with the UI's cookie, so a page on
another site cannot make a logged-in browser call it: CSRF protection is needed (and applied) on the
UI's forms alone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from apiflask import APIFlask
from cachetools import TTLCache
from flask import g, request, session
from flask.sessions import SecureCookieSessionInterface
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_wtf.csrf import CSRFProtect
from limits.storage import MemoryStorage

from trainyard import auth
from trainyard.auth import Principal, Role
from trainyard.errors import Unauthorized
from trainyard_web.runtime import platform

F = TypeVar("F", bound=Callable)

ROLE_ATTRIBUTE = "_trainyard_role"
PUBLIC_API_ENDPOINTS = {"api.health"}
VIEWER_ENDPOINTS = {"openapi.spec"}  # APIFlask's own spec view
BEARER_ENDPOINTS = {"metrics.metrics"}  # outside /api/ yet for machines (Prometheus): bearer tokens too
JSON_BODY_LIMIT = 1024 * 1024  # every JSON API body; predictions and uploads have their own limits
SESSION_TOKEN_KEY = "token_id"


def requires(role: Role) -> Callable[[F], F]:
    """Mark an API view with the least role that may call it. Unmarked API views need `admin`."""

    def mark(view: F) -> F:
        setattr(view, ROLE_ATTRIBUTE, role)
        return view

    return mark


def current_principal() -> Principal:
    return g.principal


class _SessionInterface(SecureCookieSessionInterface):
    """The session cookie is `Secure` whenever the request came over HTTPS (behind a proxy too, with
    TRAINYARD_PROXY_HOPS set), HttpOnly and SameSite=Lax always."""

    def get_cookie_secure(self, app) -> bool:
        return bool(app.config["SESSION_COOKIE_SECURE"] or request.is_secure)

    def open_session(self, app, request):
        # No cookie (every API call, a first visit): an empty session without building the signer, which costs
        # as much as a database read on the API's hottest route. One is built if the session is written.
        if self.get_cookie_name(app) not in request.cookies:
            return self.session_class()
        return super().open_session(app, request)


class SweptMemoryStorage(MemoryStorage):
    """limits' in-process counters, without a thread started per rate-limited request.

    limits' MemoryStorage drops expired counters from a 10 ms threading.Timer that it starts on a hit whenever
    none is running: under load, a new thread (and a wait for it to take the GIL) on nearly every request,
    measured at ~0.1 ms of CPU each. Expired counters are already ignored when read; this drops the rest
    inline, at most once every SWEEP_SECONDS. `memory://` in TRAINYARD_RATE_LIMIT_STORAGE_URI means this.
    """

    STORAGE_SCHEME = ["trainyard-memory"]
    SWEEP_SECONDS = 1.0

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, **options: str) -> None:
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)
        self._swept_at = time.monotonic()

    def _MemoryStorage__schedule_expiry(self) -> None:  # replaces limits' private timer start
        now = time.monotonic()
        if now - self._swept_at >= self.SWEEP_SECONDS:
            self._swept_at = now
            self._MemoryStorage__expire_events()


def rate_limit_storage_uri(configured: str) -> str:
    return "trainyard-memory://" if configured.rstrip("/") in ("memory:", "memory://") else configured


class PrincipalCache:
    """Bearer token → principal for `seconds`, keyed by the token's hash (the secret is never kept): a revoked
    or expired token keeps working here for at most that long. For the prediction server only, where a
    database read per request is a large share of a prediction."""

    def __init__(self, seconds: float, size: int = 4096) -> None:
        self._cache: TTLCache = TTLCache(maxsize=size, ttl=seconds)
        self._lock = threading.Lock()

    def get(self, secret: str, lookup: Callable[[], Principal]) -> Principal:
        key = auth.hash_token(secret)
        with self._lock:
            principal = self._cache.get(key)
        if principal is None:
            principal = lookup()  # raises for an unknown, revoked or expired token: nothing cached
            with self._lock:
                self._cache[key] = principal
        return principal


def install(app: APIFlask, body_limits: dict[str, int], *, token_cache_seconds: float = 0.0) -> Limiter:
    """Wire authentication, CSRF, body limits and rate limits into `app`; returns its rate limiter.

    `token_cache_seconds` > 0 remembers authenticated bearer tokens that long (see PrincipalCache)."""
    settings = platform_settings(app)
    principals = PrincipalCache(token_cache_seconds) if token_cache_seconds > 0 else None
    app.secret_key = settings.secret_key.get_secret_value() if settings.secret_key else \
        auth.read_or_create_secret(settings.data_dir / "secret-key")
    app.session_interface = _SessionInterface()
    app.config.update(SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Lax",
                      SESSION_COOKIE_NAME="trainyard_session", WTF_CSRF_TIME_LIMIT=None)
    if settings.proxy_hops:
        from werkzeug.middleware.proxy_fix import ProxyFix

        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.proxy_hops, x_proto=settings.proxy_hops,
                                x_host=settings.proxy_hops)

    @app.before_request
    def _limit_body() -> None:
        request.max_content_length = body_limits.get(request.endpoint or "", JSON_BODY_LIMIT)

    @app.before_request
    def _authenticate_api() -> None:
        if not (request.path.startswith("/api/") or request.endpoint in BEARER_ENDPOINTS) \
                or request.endpoint in PUBLIC_API_ENDPOINTS:
            return
        header = request.headers.get("Authorization", "")
        scheme, _, secret = header.partition(" ")
        if header and scheme.lower() != "bearer":
            raise Unauthorized("Use `Authorization: Bearer <token>`.")
        secret = secret.strip()
        if principals is not None and secret:
            g.principal = principals.get(secret, lambda: auth.authenticate(platform().db, secret))
        else:
            g.principal = auth.authenticate(platform().db, secret)
        g.principal.require(_required_role(app, request.endpoint), f"{request.method} {request.path}")

    # Every non-API request that changes something carries a CSRF token: fail closed for forms yet to come.
    app.config["WTF_CSRF_CHECK_DEFAULT"] = False
    csrf = CSRFProtect(app)

    @app.before_request
    def _check_csrf() -> None:
        if request.method not in ("GET", "HEAD", "OPTIONS") and not request.path.startswith("/api/"):
            csrf.protect()

    limiter = Limiter(get_remote_address, app=app, storage_uri=rate_limit_storage_uri(settings.rate_limit_storage_uri),
                      headers_enabled=True, key_prefix="trainyard")
    # Flask-Limiter checks default and application-wide limits before every request. Trainyard sets none: the
    # limited views (login, predict) check their own limits in their decorators, so that hook only costs time.
    app.before_request_funcs[None].remove(limiter._check_request_limit)
    return limiter


def _required_role(app: APIFlask, endpoint: str | None) -> Role:
    if endpoint is None:  # no such route: any valid token may learn that it is a 404
        return Role.VIEWER
    if endpoint in VIEWER_ENDPOINTS:
        return Role.VIEWER
    return getattr(app.view_functions[endpoint], ROLE_ATTRIBUTE, Role.ADMIN)


def session_principal() -> Principal | None:
    """The logged-in UI user, or None (also when their token was revoked or expired since login)."""
    token_id = session.get(SESSION_TOKEN_KEY)
    if not isinstance(token_id, int):
        return None
    try:
        return auth.principal_for_token(platform().db, token_id)
    except Unauthorized:
        session.clear()
        return None


def rate_key_by_caller() -> str:
    """Rate-limit per token where there is one (many users may share one NAT address)."""
    principal = g.get("principal")
    return f"token:{principal.token_id}" if principal else get_remote_address()


def platform_settings(app: APIFlask):
    from trainyard_web.runtime import EXTENSION_KEY

    return app.extensions[EXTENSION_KEY].settings


def _problem_response(description: str) -> dict:
    return {"description": description,
            "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}


def document(app: APIFlask) -> None:
    """Put bearer authentication and the responses every route may give into the OpenAPI document."""

    @app.spec_processor
    def _add_security(spec: dict) -> dict:
        components = spec.setdefault("components", {})
        components.setdefault("securitySchemes", {})["bearerAuth"] = {
            "type": "http", "scheme": "bearer",
            "description": "An API token (`trainyard tokens create`, or <data dir>/admin-token).",
        }
        components.setdefault("schemas", {})["Problem"] = {
            "type": "object", "required": ["title", "status", "detail"],
            "properties": {"type": {"type": "string"}, "title": {"type": "string"},
                           "status": {"type": "integer"}, "detail": {"type": "string"},
                           "errors": {"type": "array", "items": {"type": "object"}}},
        }
        spec["security"] = [{"bearerAuth": []}]
        for path, operations in spec.get("paths", {}).items():
            for operation in operations.values():
                if not isinstance(operation, dict) or "responses" not in operation:
                    continue
                responses = operation["responses"]
                if path == "/api/v1/health":
                    operation["security"] = []
                else:
                    responses.setdefault("401", _problem_response("No valid token"))
                    responses.setdefault("403", _problem_response("The token's role may not do this"))
                    responses.setdefault("429", _problem_response("Too many requests; retry later"))
                    if operation.get("parameters") or "requestBody" in operation:
                        responses.setdefault("422", _problem_response("Invalid input, with the fields named"))
                responses.setdefault("413", _problem_response("Request body too large"))
                responses.setdefault("400", _problem_response("Malformed request"))
                for code, response in responses.items():
                    if code >= "400" and "content" in response:
                        # Errors leave as problem documents, whatever APIFlask's defaults say.
                        response["content"] = _problem_response("")["content"]
                    elif code >= "400" and "content" not in response:
                        response.update(_problem_response(response.get("description", "")))
        return spec
