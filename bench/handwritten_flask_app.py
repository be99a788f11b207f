"""The hand-written web baseline for measures 4 and 7: a plain Flask app doing the platform's work for
`GET /api/v1/jobs/{id}` and `POST /api/v1/jobs` by hand, served by the same gunicorn settings.

- Same token check: the sha256 of the bearer secret looked up in `api_token`, refused when unknown, revoked,
  expired or of too low a role; `last_used_at` written at most once a minute (bench/handwritten.py).
- GET: the job row and its `job_event` rows (two reads), serialised to the platform's JSON shape.
- POST: the token check, one INSERT of the job row and its first event (one statement, autocommit, so it is
  committed when it returns), then `send_task` of `handwritten.run_job` with the platform's broker settings,
  and the job's JSON from the INSERT's RETURNING. It does not validate the spec against the schema or the
  datasets (the platform does); the body is stored as sent.

Raw psycopg 3 with a connection pool (SQLAlchemy's QueuePool used on its own: no ORM, no Core statements),
one connection per request, as many pooled as a process has threads, no pre-ping.

    BENCH_HW_DATABASE_URL=... BENCH_BROKER_URL=... gunicorn --workers 2 --threads 4 'handwritten_flask_app:create_app()'
"""

from __future__ import annotations

import os

from flask import Flask, jsonify, request
from sqlalchemy.pool import QueuePool

import handwritten

TASK = "handwritten.run_job"


def create_app() -> Flask:
    url = os.environ.get("BENCH_HW_DATABASE_URL") or os.environ["TRAINYARD_DATABASE_URL"]
    threads = int(os.environ.get("BENCH_HW_POOL_SIZE", "4"))
    pool = QueuePool(lambda: handwritten.connect(url), pool_size=threads, max_overflow=threads, pre_ping=False)
    app = Flask(__name__)
    app.json.sort_keys = False
    celery = None
    if os.environ.get("BENCH_BROKER_URL"):
        from celery import Celery

        from trainyard.config import Settings
        from trainyard.queueing import celery_config

        celery = Celery("bench-handwritten-client")
        celery.conf.update(celery_config(Settings(broker_url=os.environ["BENCH_BROKER_URL"],
                                                  database_url="sqlite://", queue="hw")))

    def problem(status: int, detail: str):
        return jsonify({"title": "error", "status": status, "detail": detail}), status

    @app.get("/api/v1/jobs/<int:job_id>")
    def get_job(job_id: int):
        pooled = pool.connect()
        try:
            conn = pooled.dbapi_connection
            try:
                handwritten.authenticate(conn, request.headers.get("Authorization", ""), "viewer")
            except handwritten.Unauthorized as exc:
                return problem(401, str(exc))
            body = handwritten.read_job(conn, job_id) if 0 < job_id < 2**63 else None
        finally:
            pooled.close()
        return jsonify(body) if body is not None else problem(404, f"No job with id {job_id}.")

    @app.post("/api/v1/jobs")
    def submit_job():
        spec = request.get_json(silent=True)
        if not isinstance(spec, dict) or not isinstance(spec.get("dataset"), str) \
                or not isinstance(spec.get("architecture"), str) or not isinstance(spec.get("params", {}), dict):
            return problem(422, "a job needs dataset, architecture and params")
        pooled = pool.connect()
        try:
            conn = pooled.dbapi_connection
            try:
                _, user = handwritten.authenticate(conn, request.headers.get("Authorization", ""), "member")
            except handwritten.Unauthorized as exc:
                return problem(401, str(exc))
            queue = (spec.get("resources") or {}).get("queue") or "hw"
            job = handwritten.insert_job(conn, spec, owner=user, queue=queue)
        finally:
            pooled.close()
        if celery is not None:  # after the commit (the INSERT ran in autocommit)
            celery.send_task(TASK, args=[job["id"]], queue=queue, priority=4, retry=True,
                             retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})
        return jsonify(job), 201, {"Location": f"/api/v1/jobs/{job['id']}"}

    return app
