"""Server-rendered pages. Views call the same services as the REST API and hold no logic of their own."""

from __future__ import annotations

from flask import Blueprint, render_template, request

from trainyard import jobs
from trainyard.errors import NotFound
from trainyard.models import JobStatus
from trainyard_web.runtime import platform

ui = Blueprint("ui", __name__)


@ui.app_context_processor
def _page_context():
    return {"settings": platform().settings}


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
