"""Job pages: the live jobs table, a job's page, compare, and the launch form."""

from __future__ import annotations

from flask import abort, flash, g, redirect, render_template, request, url_for

from trainyard import datasets, jobs, tracking
from trainyard.auth import Role
from trainyard.errors import NotFound, TrainyardError
from trainyard.models import JobStatus
from trainyard_web.runtime import platform
from trainyard_web.ui import ui
from trainyard_web.ui import spec_form
from trainyard_web.ui.charts import compare_charts, job_charts

PAGE_SIZE = 25
MAX_COMPARED = 8


def _filters() -> dict[str, str]:
    return {key: request.args.get(key, "").strip() for key in ("status", "dataset", "architecture", "sweep")}


def _page(filters: dict[str, str]):
    status = filters["status"].upper()
    return jobs.list_jobs(platform().db, statuses=[status] if status in JobStatus.__members__ else [],
                          dataset=filters["dataset"] or None, architecture=filters["architecture"] or None,
                          sweep=int(filters["sweep"]) if filters["sweep"].isdigit() else None, limit=PAGE_SIZE, before=request.args.get("before", type=int))


@ui.get("/")
def job_list():
    filters = _filters()
    page = _page(filters)
    return render_template("jobs/list.html", page=page, filters=filters, statuses=list(JobStatus),
                           datasets=datasets.list_datasets(platform().db),
                           architectures=sorted({j.architecture for j in page.items if j.architecture}))


@ui.get("/jobs/rows")
def job_rows():
    """The table body alone: what the jobs page polls while any listed job is still running."""
    return render_template("jobs/rows.html", page=_page(_filters()), filters=_filters())


def _job_or_404(job_id: int):
    try:
        return jobs.get_job(platform().db, job_id)
    except NotFound:
        abort(404)


@ui.get("/jobs/<int:job_id>")
def job_detail(job_id: int):
    job = _job_or_404(job_id)
    return render_template("jobs/detail.html", job=job, active=not JobStatus(job.status).is_terminal)


@ui.get("/jobs/<int:job_id>/live")
def job_live(job_id: int):
    """The parts of a job's page that change while it runs; polled until the job ends."""
    job = _job_or_404(job_id)
    return render_template("jobs/live.html", job=job, active=not JobStatus(job.status).is_terminal)


@ui.get("/jobs/<int:job_id>/activity")
def job_activity(job_id: int):
    """The job's timeline and log tail; polled until the job ends."""
    job = _job_or_404(job_id)
    return render_template("jobs/activity.html", job=job, active=not JobStatus(job.status).is_terminal)


@ui.get("/jobs/<int:job_id>/metrics.json")
def job_metrics(job_id: int):
    job = _job_or_404(job_id)
    history = tracking.metric_history(platform().settings, job.mlflow_run_id) if job.mlflow_run_id else {}
    return {"done": JobStatus(job.status).is_terminal, "charts": job_charts(history)}


@ui.get("/jobs/<int:job_id>/sample.png")
def job_sample(job_id: int):
    """The newest sample-prediction overlay of a segmentation job."""
    job = _job_or_404(job_id)
    image = tracking.latest_step_image(platform().settings, job.mlflow_run_id, "sample_predictions") \
        if job.mlflow_run_id else None
    if image is None:
        abort(404)
    return image[1], 200, {"Content-Type": "image/png", "Cache-Control": "no-store"}


def _act(job_id: int, action, done: str):
    try:
        action()
        flash(done, "ok")
    except TrainyardError as exc:
        flash(exc.detail, "error")
    return redirect(url_for("ui.job_detail", job_id=job_id))


@ui.post("/jobs/<int:job_id>/cancel")
def job_cancel(job_id: int):
    return _act(job_id, lambda: jobs.request_cancel(platform().db, job_id, actor=g.principal),
                f"Cancel requested for job {job_id}.")


@ui.post("/jobs/<int:job_id>/retry")
def job_retry(job_id: int):
    p = platform()
    return _act(job_id, lambda: jobs.retry_job(p.db, job_id, p.dispatch, actor=g.principal),
                f"Job {job_id} queued again.")


@ui.get("/compare")
def compare():
    ids = _compared_ids()
    compared = jobs.list_jobs(platform().db, ids=ids, limit=MAX_COMPARED).items
    if len(compared) < 2:
        flash("Pick two or more jobs to compare.", "error")
        return redirect(url_for("ui.job_list"))
    flat = {j.id: spec_form.flatten_spec(j.spec) for j in compared}
    keys = sorted({k for spec in flat.values() for k in spec})
    rows = [(k, [flat[j.id].get(k) for j in compared]) for k in keys]
    metric_keys = sorted({k for j in compared for k in j.metrics})
    return render_template("jobs/compare.html", jobs=compared, rows=rows, metric_keys=metric_keys,
                           ids=",".join(str(j.id) for j in compared))


@ui.get("/compare/metrics.json")
def compare_metrics():
    compared = jobs.list_jobs(platform().db, ids=_compared_ids(), limit=MAX_COMPARED).items
    settings = platform().settings
    histories = {f"#{j.id} {j.name}": tracking.metric_history(settings, j.mlflow_run_id)
                 for j in compared if j.mlflow_run_id}
    return {"done": all(JobStatus(j.status).is_terminal for j in compared), "charts": compare_charts(histories)}


def _compared_ids() -> list[int]:
    raw = request.args.getlist("id") or request.args.get("ids", "").split(",")
    return [int(v) for v in raw if v.strip().isdigit()][:MAX_COMPARED]


# ---- launch ----------------------------------------------------------------------------------------


def _launch_fields(dataset_name: str | None):
    registered = datasets.list_datasets(platform().db)
    chosen = next((d for d in registered if d.name == dataset_name), registered[0] if registered else None)
    return spec_form.launch_fields(registered, chosen.task if chosen else None), chosen


@ui.get("/launch")
def launch():
    g.principal.require(Role.MEMBER, "Launching a job")
    source = request.args.get("from", type=int)
    values = spec_form.flatten_spec(_job_or_404(source).spec) if source else {}
    fields, chosen = _launch_fields(values.get("dataset") or request.args.get("dataset"))
    spec_form.fill(fields, values)
    if source and values.get("name"):
        next(f for f in fields if f.name == "name").value = f"{values['name']} (clone)"[:200]
    return render_template("jobs/launch.html", fields=fields, problems=[], source=source,
                           dataset=chosen)


@ui.post("/launch")
def launch_submit():
    g.principal.require(Role.MEMBER, "Launching a job")
    fields, chosen = _launch_fields(request.form.get("dataset"))
    spec, errors = spec_form.parse(fields, request.form)
    if spec is not None:
        p = platform()
        try:
            job = jobs.submit_job(p.db, spec, p.dispatch, settings=p.settings, owner=g.principal.user)
        except TrainyardError as exc:
            errors = {e["field"]: e["message"] for e in exc.errors} or {"": exc.detail}
        else:
            flash(f"Job {job.id} submitted.", "ok")
            return redirect(url_for("ui.job_detail", job_id=job.id))
    problems = spec_form.attach_errors(fields, errors)
    return render_template("jobs/launch.html", fields=fields, problems=problems, source=None,
                           dataset=chosen), 422


@ui.get("/launch/architectures")
def launch_architectures():
    """The architecture picker for the chosen dataset: only the architectures that fit its task."""
    fields, _ = _launch_fields(request.args.get("dataset"))
    field = next(f for f in fields if f.name == "architecture")
    wanted = request.args.get("architecture")
    field.value = wanted if any(value == wanted for value, _ in field.choices) else None
    return render_template("jobs/field.html", f=field)
