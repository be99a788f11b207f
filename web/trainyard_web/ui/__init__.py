"""Server-rendered pages. Views call the same services as the REST API and hold no logic of their own."""

from __future__ import annotations

from urllib.parse import urlsplit

from apiflask import APIBlueprint
from flask import g, redirect, render_template, request, session, url_for
from flask_wtf import FlaskForm
from flask_wtf.csrf import CSRFError
from wtforms import PasswordField
from wtforms.validators import DataRequired

from trainyard import auth, job_logs, worker_registry
from trainyard.errors import TrainyardError, Unauthorized
from trainyard.models import utcnow
from trainyard_web.runtime import platform
from trainyard_web.security import SESSION_TOKEN_KEY, session_principal

# An APIBlueprint only so APIFlask can walk its before_request hooks; pages stay out of the OpenAPI spec.
ui = APIBlueprint("ui", __name__, enable_openapi=False)
OPEN_PAGES = {"ui.login"}


class LoginForm(FlaskForm):
    token = PasswordField("API token", validators=[DataRequired()])


@ui.app_template_global()
def job_log_tail(job_id: int, lines: int = 40) -> list[str]:
    return [str(line) for line in job_logs.tail(platform().db, job_id, lines)]


@ui.app_template_global()
def why_queued(job_id: int) -> str:
    p = platform()
    return worker_registry.why_queued(p.db, job_id, stale_after_seconds=p.settings.worker_stale_seconds)


@ui.app_template_filter()
def duration(job) -> str:
    """How long a job ran (or has run so far), as 1h 02m, 3m 05s or 12s."""
    if job.started_at is None:
        return ""
    seconds = int(((job.finished_at or utcnow()) - job.started_at).total_seconds())
    hours, rest = divmod(max(seconds, 0), 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


@ui.app_context_processor
def _page_context():
    settings = platform().settings
    return {"settings": settings, "principal": g.get("principal"),
            "mlflow_ui": f"http://{settings.mlflow_host}:{settings.mlflow_port}"}


@ui.before_request
def _require_login():
    if request.endpoint in OPEN_PAGES:
        return None
    g.principal = session_principal()
    if g.principal is None:
        return redirect(url_for("ui.login", next=request.full_path.rstrip("?")))
    return None


def _safe_next(target: str | None) -> str:
    # Only same-site paths: a crafted ?next=https://evil.example must not turn login into a redirector.
    parts = urlsplit(target or "")
    if not target or parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return url_for("ui.job_list")
    return target


@ui.route("/login", methods=["GET", "POST"])
def login():
    form = LoginForm()
    next_page = _safe_next(request.args.get("next"))
    error = None
    if request.method == "POST":
        if form.validate_on_submit():
            try:
                principal = auth.authenticate(platform().db, form.token.data.strip())
            except Unauthorized as exc:
                error = exc.detail
            else:
                session.clear()  # a fresh session on login: no fixation of one planted before
                session[SESSION_TOKEN_KEY] = principal.token_id
                return redirect(next_page)
        else:
            error = "Paste your API token."
    status = 401 if error else 200
    return render_template("login.html", form=form, error=error, next=next_page), status


@ui.post("/logout")
def logout():
    session.clear()
    return redirect(url_for("ui.login"))


@ui.errorhandler(CSRFError)
def _csrf_failed(error: CSRFError):
    return render_template("error.html", title="Form expired",
                           message="The form expired or came from another site; reload the page and try again."), 400


@ui.errorhandler(TrainyardError)
def _refused(error: TrainyardError):
    return render_template("error.html", title=error.title, message=error.detail), error.status


@ui.errorhandler(404)
def _missing(error):
    return render_template("error.html", title="Not found", message=f"Nothing at {request.path}."), 404


@ui.errorhandler(429)
def _too_many(error):
    return render_template("login.html", form=LoginForm(), next=_safe_next(request.args.get("next")),
                           error="Too many login attempts from this address; wait a minute and try again."), 429


# The pages, by area; imported last because they register themselves on `ui`.
from trainyard_web.ui import jobs_pages, registry_pages, sweeps_pages, workers_pages  # noqa: E402,F401
