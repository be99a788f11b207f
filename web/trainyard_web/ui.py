"""Server-rendered pages. Views call the same services as the REST API and hold no logic of their own."""

from __future__ import annotations

from urllib.parse import urlsplit

from apiflask import APIBlueprint
from flask import g, redirect, render_template, request, session, url_for
from flask_wtf import FlaskForm
from flask_wtf.csrf import CSRFError
from wtforms import PasswordField
from wtforms.validators import DataRequired

from trainyard import auth, jobs
from trainyard.errors import NotFound, Unauthorized
from trainyard.models import JobStatus
from trainyard_web.runtime import platform
from trainyard_web.security import SESSION_TOKEN_KEY, session_principal

# An APIBlueprint only so APIFlask can walk its before_request hooks; pages stay out of the OpenAPI spec.
ui = APIBlueprint("ui", __name__, enable_openapi=False)
OPEN_PAGES = {"ui.login"}


class LoginForm(FlaskForm):
    token = PasswordField("API token", validators=[DataRequired()])


@ui.app_context_processor
def _page_context():
    return {"settings": platform().settings, "principal": g.get("principal")}


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


@ui.errorhandler(429)
def _too_many(error):
    return render_template("login.html", form=LoginForm(), next=_safe_next(request.args.get("next")),
                           error="Too many login attempts from this address; wait a minute and try again."), 429


@ui.get("/")
def job_list():
    status = request.args.get("status", "").upper()
    statuses = [status] if status in JobStatus.__members__ else []
    before = request.args.get("before", type=int)
    page = jobs.list_jobs(platform().db, statuses=statuses, limit=50, before=before)
    active = any(not JobStatus(j.status).is_terminal for j in page.items)
    return render_template("jobs.html", page=page, status=status if statuses else "", active=active,
                           statuses=list(JobStatus))


@ui.get("/jobs/<int:job_id>")
def job_detail(job_id: int):
    try:
        job = jobs.get_job(platform().db, job_id)
    except NotFound as exc:
        return render_template("error.html", message=exc.detail), 404
    return render_template("job.html", job=job, active=not JobStatus(job.status).is_terminal)
