"""REST API v1. Each view validates input, makes one service call and serialises the result."""

from __future__ import annotations

import tempfile
from pathlib import Path

from apiflask import APIBlueprint
from flask import url_for

from trainyard import datasets, job_logs, jobs, worker_registry
from trainyard.archives import Limits
from trainyard.auth import Role
from trainyard.ml.architectures import ARCHITECTURES
from trainyard.models import JobStatus
from trainyard.specs import PRIORITY_LEVELS, JobSpec
from trainyard_web.runtime import platform
from trainyard_web.security import current_principal, requires
from trainyard_web.schemas import (
    ArchitectureListOut,
    ArchitectureOut,
    DatasetIn,
    DatasetListOut,
    DatasetOut,
    DatasetUploadIn,
    HealthOut,
    JobListQuery,
    JobOut,
    JobPageOut,
    LogLineOut,
    LogPageOut,
    LogQuery,
    PoolOut,
    QueueWaitOut,
)

api = APIBlueprint("api", __name__, url_prefix="/api/v1", tag="Trainyard")


@api.post("/jobs")
@api.input(JobSpec, location="json", arg_name="spec")
@api.output(JobOut, status_code=201)
@api.doc(summary="Submit a job", responses=[201, 404, 409, 422, 503])
@requires(Role.MEMBER)
def submit_job(spec: JobSpec):
    p = platform()
    job = jobs.submit_job(p.db, spec, p.dispatch, settings=p.settings, owner=current_principal().user)
    return JobOut.model_validate(job), 201, {"Location": url_for("api.get_job", job_id=job.id)}


@api.get("/jobs")
@api.input(JobListQuery, location="query", arg_name="query")
@api.output(JobPageOut)
@api.doc(summary="List jobs, newest first")
@requires(Role.VIEWER)
def list_jobs(query: JobListQuery):
    page = jobs.list_jobs(platform().db, statuses=query.statuses, limit=query.limit, before=query.before,
                          dataset=query.dataset, architecture=query.architecture, sweep=query.sweep)
    return JobPageOut(items=[JobOut.model_validate(j) for j in page.items], next_before=page.next_before)


@api.get("/jobs/<int:job_id>")
@api.output(JobOut)
@api.doc(summary="A job with its progress, metrics and event history", responses=[200, 404])
@requires(Role.VIEWER)
def get_job(job_id: int):
    p = platform()
    view = jobs.get_job(p.db, job_id)
    job = JobOut.model_validate(view)
    if job.status == JobStatus.QUEUED:  # two capped index counts and the pool's rows, only while it waits
        wait = worker_registry.place_in_queue(p.db, view.id, view.queue, PRIORITY_LEVELS[view.priority],
                                              stale_after_seconds=p.settings.worker_stale_seconds)
        job.waiting = QueueWaitOut.model_validate(wait)
    return job


@api.get("/jobs/<int:job_id>/logs")
@api.input(LogQuery, location="query", arg_name="query")
@api.output(LogPageOut)
@api.doc(summary="A job's own log lines, oldest first; follow it by passing `next_after` back as `after`",
         responses=[200, 404])
@requires(Role.VIEWER)
def job_logs_page(job_id: int, query: LogQuery):
    db = platform().db
    jobs.get_job(db, job_id)  # 404 for a job that does not exist
    lines = job_logs.read(db, job_id, after=query.after, limit=query.limit)
    return LogPageOut(items=[LogLineOut.model_validate(line) for line in lines],
                      next_after=lines[-1].id if lines else query.after)


@api.get("/workers")
@api.output(PoolOut)
@api.doc(summary="The worker pool: each worker's device, queues, current job and heartbeat; queue depths")
@requires(Role.VIEWER)
def list_workers():
    p = platform()
    return PoolOut.model_validate(
        worker_registry.pool_status(p.db, stale_after_seconds=p.settings.worker_stale_seconds), from_attributes=True)


@api.post("/jobs/<int:job_id>/cancel")
@api.output(JobOut, status_code=202)
@api.doc(summary="Cancel a job (at once if queued, within a batch if running)", responses=[202, 404, 409])
@requires(Role.MEMBER)
def cancel_job(job_id: int):
    return JobOut.model_validate(jobs.request_cancel(platform().db, job_id, actor=current_principal())), 202


@api.post("/jobs/<int:job_id>/retry")
@api.output(JobOut, status_code=202)
@api.doc(summary="Run a FAILED or CANCELLED job again as a new attempt, from its last checkpoint",
         responses=[202, 404, 409])
@requires(Role.MEMBER)
def retry_job(job_id: int):
    p = platform()
    return JobOut.model_validate(jobs.retry_job(p.db, job_id, p.dispatch, actor=current_principal())), 202


@api.get("/datasets")
@api.output(DatasetListOut)
@api.doc(summary="Registered datasets")
@requires(Role.VIEWER)
def list_datasets():
    return DatasetListOut(items=[DatasetOut.model_validate(d) for d in datasets.list_datasets(platform().db)])


@api.post("/datasets")
@api.input(DatasetIn, location="json", arg_name="body")
@api.output(DatasetOut, status_code=201)
@api.doc(summary="Register a dataset folder (scanned now; the report is in the response)",
         responses=[201, 409, 422])
@requires(Role.MEMBER)
def register_dataset(body: DatasetIn):
    p = platform()
    dataset = datasets.register_dataset(p.db, p.settings.dataset_roots, name=body.name, format=body.format,
                                        path=body.path)
    return DatasetOut.model_validate(dataset), 201, {"Location": url_for("api.get_dataset", name=dataset.name)}


@api.post("/datasets/upload")
@api.input(DatasetUploadIn, location="form_and_files", arg_name="body")
@api.output(DatasetOut, status_code=201)
@api.doc(summary="Upload a dataset archive (zip or tar), unpack it safely and register it",
         responses=[201, 409, 413, 422])
@requires(Role.MEMBER)
def upload_dataset(body: DatasetUploadIn):
    p = platform()
    s = p.settings
    with tempfile.NamedTemporaryFile(dir=s.ensure_data_dir(), prefix=".upload-", suffix=".archive") as spool:
        body.archive.save(spool)
        spool.flush()
        dataset = datasets.register_uploaded_dataset(
            p.db, s.dataset_roots, name=body.name, format=body.format, archive=Path(spool.name),
            limits=Limits(max_bytes=s.max_unpacked_bytes, max_files=s.max_unpacked_files))
    return DatasetOut.model_validate(dataset), 201, {"Location": url_for("api.get_dataset", name=dataset.name)}


@api.get("/datasets/<name>")
@api.output(DatasetOut)
@api.doc(summary="One registered dataset with its scan report", responses=[200, 404])
@requires(Role.VIEWER)
def get_dataset(name: str):
    return DatasetOut.model_validate(datasets.get_dataset(platform().db, name))


@api.get("/architectures")
@api.output(ArchitectureListOut)
@api.doc(summary="Registered architectures")
@requires(Role.VIEWER)
def list_architectures():
    return ArchitectureListOut(
        items=[
            ArchitectureOut(name=a.name, task=a.obj.task, description=a.description,
                            options=a.obj.options.model_json_schema() if a.obj.options else {})
            for a in ARCHITECTURES
        ]
    )


@api.get("/health")
@api.output(HealthOut)
@api.doc(summary="Reachability of the database, the broker and MLflow", responses=[200, 503])
def health():
    report = platform().health()
    return report, 200 if report.status == "ok" else 503
