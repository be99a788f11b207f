"""The hand-written baselines' SQL (measures 4, 6 and 7): what a competent engineer would write by hand for the
platform's job bookkeeping, with raw psycopg 3 on the platform's own tables. No platform code runs here.

Every statement is one round trip: the job row and its `job_event` row are written together by a
data-modifying CTE (`WITH j AS (INSERT/UPDATE ... RETURNING ...) INSERT INTO job_event ...`), the way one
writes it by hand on PostgreSQL. Connections are in autocommit (each statement commits as it runs) and, like
the platform's (see trainyard.db.create_db_engine), use no server-side prepared statements, since the
deployment puts PgBouncer in transaction mode in front of PostgreSQL.

The writing baselines (04, 06) need a database where `job` has no history trigger, or every transition would
be recorded twice: `drop_history_trigger` makes one out of a freshly migrated bench database (same tables and
indexes as the platform's; no per-queue tallies, which a hand-written app would not keep). Measure 7 only
reads, so it runs on the platform's own database.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Json

TOKEN_PREFIX = "ty_"
LAST_USED_RESOLUTION = timedelta(minutes=1)
ROLES = ("viewer", "member", "admin")
PRIORITY_NAMES = {0: "low", 1: "normal", 2: "high"}

SELECT_TOKEN = 'SELECT id, "user", role, prefix, revoked_at, expires_at, last_used_at FROM api_token ' \
               "WHERE token_hash = %s"
TOUCH_TOKEN = "UPDATE api_token SET last_used_at = %s WHERE id = %s"

JOB_COLUMNS = ("id, kind, name, status, dataset, architecture, spec, queue, priority, attempt, max_attempts, "
               "cancel_requested, progress, metrics, mlflow_run_id, checkpoint_epoch, checkpoint_sha256, "
               "model_name, model_version, owner, error, created_at, started_at, finished_at")
SELECT_JOB = f"SELECT {JOB_COLUMNS} FROM job WHERE id = %s"
SELECT_EVENTS = "SELECT at, from_status, to_status, attempt, message FROM job_event WHERE job_id = %s ORDER BY id"

INSERT_JOB = f"""
WITH j AS (
    INSERT INTO job (kind, name, status, dataset, architecture, spec, queue, priority, attempt, max_attempts,
                     cancel_requested, progress, metrics, owner, created_at, updated_at)
    VALUES (%(kind)s, %(name)s, 'QUEUED', %(dataset)s, %(architecture)s, %(spec)s, %(queue)s, %(priority)s, 0,
            %(max_attempts)s, false, %(progress)s, '{{}}', %(owner)s, %(now)s, %(now)s)
    RETURNING {JOB_COLUMNS}
), e AS (
    INSERT INTO job_event (job_id, at, from_status, to_status, attempt, message)
    SELECT id, created_at, NULL, 'QUEUED', 0, %(message)s FROM j
)
SELECT * FROM j
"""

CLAIM_JOB = """
WITH c AS (
    UPDATE job SET status = 'RUNNING', attempt = attempt + 1, lease_owner = %(worker)s,
                   lease_expires_at = %(expires)s, started_at = %(now)s, updated_at = %(now)s, error = NULL
    WHERE id = %(id)s AND status = 'QUEUED'
    RETURNING id, kind, name, spec, attempt
), e AS (
    INSERT INTO job_event (job_id, at, from_status, to_status, attempt, message)
    SELECT id, %(now)s, 'QUEUED', 'RUNNING', attempt, %(message)s FROM c
)
SELECT * FROM c
"""

FINISH_JOB = """
WITH f AS (
    UPDATE job SET status = 'SUCCEEDED', finished_at = %(now)s, updated_at = %(now)s, lease_owner = NULL,
                   lease_expires_at = NULL, mlflow_run_id = %(run_id)s, metrics = %(metrics)s,
                   progress = %(progress)s
    WHERE id = %(id)s AND status = 'RUNNING' AND attempt = %(attempt)s
    RETURNING id, attempt
)
INSERT INTO job_event (job_id, at, from_status, to_status, attempt, message)
SELECT id, %(now)s, 'RUNNING', 'SUCCEEDED', attempt, 'finished' FROM f
"""


class Unauthorized(Exception):
    pass


def connect(url: str) -> psycopg.Connection:
    """An autocommit psycopg connection to a SQLAlchemy-style URL (postgresql+psycopg://...)."""
    return psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1), autocommit=True,
                           prepare_threshold=None, connect_timeout=10)


def drop_history_trigger(url: str) -> None:
    """Make a migrated bench database a hand-written app's: it writes its own job_event rows."""
    with connect(url) as conn:
        conn.execute("DROP TRIGGER IF EXISTS job_history ON job")


def utcnow() -> datetime:
    return datetime.now(UTC)


def authenticate(conn: psycopg.Connection, header: str, needed: str = "viewer") -> tuple[int, str]:
    """(token id, user) for an `Authorization: Bearer ty_...` header; Unauthorized otherwise."""
    scheme, _, secret = header.partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret.startswith(TOKEN_PREFIX) or len(secret) > 200:
        raise Unauthorized("no bearer token")
    digest = hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()
    row = conn.execute(SELECT_TOKEN, (digest,)).fetchone()
    now = utcnow()
    if row is None:
        raise Unauthorized("unknown token")
    token_id, user, role, _prefix, revoked_at, expires_at, last_used_at = row
    if revoked_at is not None or expires_at <= now:
        raise Unauthorized("revoked or expired token")
    if ROLES.index(role) < ROLES.index(needed):
        raise Unauthorized(f"needs {needed}")
    if last_used_at is None or now - last_used_at > LAST_USED_RESOLUTION:
        conn.execute(TOUCH_TOKEN, (now, token_id))
    return token_id, user


def iso(value: datetime | None) -> str | None:
    """The API's timestamp format (pydantic's): ISO 8601 in UTC with a Z."""
    return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def job_json(job: dict[str, Any], events: list[tuple]) -> dict[str, Any]:
    """The platform's JobOut shape (GET /api/v1/jobs/{id}) from a job row and its events' rows."""
    return {
        "id": job["id"], "kind": job["kind"], "name": job["name"], "status": job["status"],
        "dataset": job["dataset"], "architecture": job["architecture"], "spec": job["spec"],
        "queue": job["queue"], "priority": PRIORITY_NAMES.get(job["priority"], "normal"),
        "attempt": job["attempt"], "max_attempts": job["max_attempts"],
        "cancel_requested": job["cancel_requested"], "progress": job["progress"], "metrics": job["metrics"],
        "mlflow_run_id": job["mlflow_run_id"], "checkpoint_epoch": job["checkpoint_epoch"],
        "checkpoint_sha256": job["checkpoint_sha256"], "model_name": job["model_name"],
        "model_version": job["model_version"], "owner": job["owner"], "error": job["error"],
        "created_at": iso(job["created_at"]), "started_at": iso(job["started_at"]),
        "finished_at": iso(job["finished_at"]),
        "events": [{"at": iso(at), "from_status": from_status, "to_status": to_status, "attempt": attempt,
                    "message": message} for at, from_status, to_status, attempt, message in events],
        "waiting": None,
    }


def read_job(conn: psycopg.Connection, job_id: int) -> dict[str, Any] | None:
    """The job row and its history (two reads), as the API's JSON; None if there is no such job."""
    with conn.cursor(row_factory=dict_row) as cur:
        job = cur.execute(SELECT_JOB, (job_id,)).fetchone()
    if job is None:
        return None
    return job_json(job, conn.execute(SELECT_EVENTS, (job_id,)).fetchall())


def insert_job(conn: psycopg.Connection, spec: dict[str, Any], *, owner: str, queue: str,
               priority: int = 1) -> dict[str, Any]:
    """Store a QUEUED job and its first event in one statement; the job's JSON (from RETURNING)."""
    now = utcnow()
    message = f"submitted by {owner}"
    params = spec.get("params") or {}
    with conn.cursor(row_factory=dict_row) as cur:
        job = cur.execute(INSERT_JOB, {
            "kind": spec.get("kind", "train"),
            "name": spec.get("name") or f"{spec.get('architecture')}-{spec.get('dataset')}",
            "dataset": spec.get("dataset") or "", "architecture": spec.get("architecture") or "",
            "spec": Json(spec), "queue": queue, "priority": priority,
            "max_attempts": spec.get("max_attempts", 3),
            "progress": Json({"epoch": 0, "epochs": params.get("epochs", 10)}),
            "owner": owner, "now": now, "message": message,
        }).fetchone()
    return job_json(job, [(job["created_at"], None, "QUEUED", 0, message)])


def claim_job(conn: psycopg.Connection, job_id: int, worker: str, lease_seconds: float = 60.0) -> dict | None:
    """QUEUED → RUNNING (attempt + 1, a lease, started_at) and its event in one statement; None if taken."""
    now = utcnow()
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(CLAIM_JOB, {"id": job_id, "worker": worker, "now": now,
                                       "expires": now + timedelta(seconds=lease_seconds),
                                       "message": f"started on {worker}"}).fetchone()


def finish_job(conn: psycopg.Connection, job_id: int, attempt: int, *, run_id: str | None,
               metrics: dict[str, Any], progress: dict[str, Any]) -> bool:
    """RUNNING → SUCCEEDED with the run id, metrics and progress, and its event, in one statement."""
    cur = conn.execute(FINISH_JOB, {"id": job_id, "attempt": attempt, "now": utcnow(), "run_id": run_id,
                                    "metrics": Json(metrics), "progress": Json(progress)})
    return cur.rowcount == 1


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """{"params": {"lr": 0.1}} → {"params.lr": "0.1"}: the spec as MLflow params (strings)."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, inner in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), inner))
        return out
    return {prefix: "" if value is None else str(value)}
