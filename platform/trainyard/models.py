"""ORM tables of the platform database. ORM objects never leave the services: callers get dataclasses."""

from __future__ import annotations

import copy
import dataclasses
import enum
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


V = TypeVar("V")


def utcnow() -> datetime:
    return datetime.now(UTC)


def to_view(view_cls: type[V], row: Any, **overrides: Any) -> V:
    """Copy an ORM row (or a Core result row) into the dataclass `view_cls` (same field names), so no ORM
    object leaves a service."""
    # JSON columns are mutable: a view of an ORM object gets its own copy; a Core row's values are its alone.
    fresh = not isinstance(row, Base)
    values = {
        f.name: getattr(row, f.name) if fresh else copy.deepcopy(getattr(row, f.name))
        for f in dataclasses.fields(view_cls)  # type: ignore[arg-type]
        if f.name not in overrides
    }
    return view_cls(**values, **overrides)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite hands back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class JobStatus(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    PRUNED = "PRUNED"  # a sweep trial its sweep's pruner stopped early: not a failure; metrics and checkpoint kept

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.PRUNED})

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Job(Base):
    __tablename__ = "job"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    dataset: Mapped[str] = mapped_column(String(100))
    architecture: Mapped[str] = mapped_column(String(100))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    queue: Mapped[str] = mapped_column(String(100))
    priority: Mapped[int] = mapped_column(Integer, default=1)  # specs.PRIORITY_LEVELS: 0 low, 1 normal, 2 high
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    checkpoint_path: Mapped[str | None] = mapped_column(Text)
    checkpoint_sha256: Mapped[str | None] = mapped_column(String(64))
    checkpoint_epoch: Mapped[int | None] = mapped_column(Integer)
    model_name: Mapped[str | None] = mapped_column(String(100))
    model_version: Mapped[int | None] = mapped_column(Integer)
    owner: Mapped[str | None] = mapped_column(String(100))  # the user whose token submitted it
    error: Mapped[str | None] = mapped_column(Text)
    # Why the status last changed: the job_event trigger copies it into the history (see migration 0007).
    status_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    # A sweep's trial: its sweep and trial number (None for a job submitted on its own).
    sweep_id: Mapped[int | None] = mapped_column(Integer)  # no foreign key: SQLite adds none to a table in place
    trial: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (
        # A sweep's trials, in order (only trial jobs are in this index).
        Index("ix_job_sweep_id_trial", "sweep_id", "trial", postgresql_where=text("sweep_id IS NOT NULL"),
              sqlite_where=text("sweep_id IS NOT NULL")),
        # The job list is "newest first, optionally by status, dataset or architecture": keyset scans on id.
        Index("ix_job_status_id", "status", "id"),
        Index("ix_job_dataset_id", "dataset", "id"),
        Index("ix_job_architecture_id", "architecture", "id"),
        # The claim's "most urgent waiting job in this queue", in the claim's own order, over waiting jobs only:
        # its cost does not grow with the backlog or the history. No index holds a lease or progress column,
        # so a heartbeat's UPDATE stays HOT on PostgreSQL (migration 0007 sets fillfactor 80 to leave it room).
        Index("ix_job_claim", "queue", priority.desc(), "id",
              postgresql_where=text("status = 'QUEUED'"), sqlite_where=text("status = 'QUEUED'")),
    )


class JobEvent(Base):
    __tablename__ = "job_event"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer)
    message: Mapped[str] = mapped_column(Text, default="")


class JobTally(Base):
    """How many jobs each (queue, status) holds, kept by database triggers on every insert, status change and
    delete of a job (migration 0007): queue depths and /metrics read a few rows whatever the backlog. A count
    is spread over TALLY_SHARDS rows (the job's id modulo) so concurrent claims do not queue for one row's
    lock; readers sum the shards."""

    __tablename__ = "job_tally"

    queue: Mapped[str] = mapped_column(String(100), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), primary_key=True)
    shard: Mapped[int] = mapped_column(Integer, primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger, default=0)


TALLY_SHARDS = 16  # as migration 0007's triggers spread them


class JobDurationTally(Base):
    """Finished attempts' run times as a cumulative histogram per (kind, final status), kept by the same
    triggers: `n` attempts took at most `le` seconds (`le` = INF_BOUND counts them all), `sum_seconds` theirs."""

    __tablename__ = "job_duration_tally"

    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), primary_key=True)
    le: Mapped[float] = mapped_column(Float, primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger, default=0)
    sum_seconds: Mapped[float] = mapped_column(Float, default=0.0)


INF_BOUND = 1e300  # job_duration_tally.le of the histogram's +Inf bucket


class Dataset(Base):
    __tablename__ = "dataset"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    format: Mapped[str] = mapped_column(String(32))
    task: Mapped[str] = mapped_column(String(32))
    path: Mapped[str | None] = mapped_column(Text)
    builtin: Mapped[bool] = mapped_column(Boolean, default=False)
    num_samples: Mapped[int] = mapped_column(Integer)
    num_classes: Mapped[int] = mapped_column(Integer)
    classes: Mapped[list[str]] = mapped_column(JSON, default=list)
    splits: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    image_shape: Mapped[list[int]] = mapped_column(JSON, default=list)
    fingerprint: Mapped[str] = mapped_column(String(64))
    report: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ModelAliasEvent(Base):
    """One move of a registry alias: the audit trail of promotions and rollbacks."""

    __tablename__ = "model_alias_event"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_name: Mapped[str] = mapped_column(String(100))
    alias: Mapped[str] = mapped_column(String(63))
    from_version: Mapped[int | None] = mapped_column(Integer)
    to_version: Mapped[int | None] = mapped_column(Integer)
    forced: Mapped[bool] = mapped_column(Boolean, default=False)
    actor: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (Index("ix_model_alias_event_model_name_id", "model_name", "id"),)


class ApiToken(Base):
    """A bearer token: only its sha256 is stored; the secret is shown once, when it is created."""

    __tablename__ = "api_token"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(200), default="")
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_by: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Worker(Base):
    """A worker process that registered itself; its heartbeat says it is alive and what it runs."""

    __tablename__ = "worker"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)  # Celery's hostname, e.g. cpu@host
    host: Mapped[str] = mapped_column(String(255))
    device: Mapped[str] = mapped_column(String(255))  # "NVIDIA H100 80GB HBM3" or "CPU (8 threads)"
    device_memory_mb: Mapped[int | None] = mapped_column(Integer)
    gpu_utilization: Mapped[float | None] = mapped_column(Float)  # percent, from NVML, at the last heartbeat
    gpu_memory_used_mb: Mapped[int | None] = mapped_column(Integer)
    queues: Mapped[list[str]] = mapped_column(JSON, default=list)
    current_job: Mapped[int | None] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class JobLogLine(Base):
    """One line of a job's own log (what its worker logged while running it)."""

    __tablename__ = "job_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    line: Mapped[str] = mapped_column(Text)

    __table_args__ = (Index("ix_job_log_job_id_id", "job_id", "id"),)



class SweepStatus(enum.StrEnum):
    RUNNING = "RUNNING"  # trials are being started and run
    SUCCEEDED = "SUCCEEDED"  # every trial ended and at least one completed; its best trial's model is registered
    FAILED = "FAILED"  # no trial completed, or too many failed in a row (status_reason says which)
    CANCELLED = "CANCELLED"


class Sweep(Base):
    """A hyperparameter search: its spec (base job spec, search space, objective, algorithm, early stopping,
    budgets), how many trials it has started, and how it ended. Its trials are ordinary jobs (`job.sweep_id`)."""

    __tablename__ = "sweep"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    max_trials: Mapped[int] = mapped_column(Integer)
    max_parallel: Mapped[int] = mapped_column(Integer)
    # Trials started so far: the compare-and-set that lets only one driver start each trial.
    trials_started: Mapped[int] = mapped_column(Integer, default=0)
    owner: Mapped[str | None] = mapped_column(String(100))
    status_reason: Mapped[str | None] = mapped_column(Text)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))  # the parent run its trials' runs nest under
    best_trial: Mapped[int | None] = mapped_column(Integer)
    best_value: Mapped[float | None] = mapped_column(Float)
    model_name: Mapped[str | None] = mapped_column(String(100))
    model_version: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_sweep_status_id", "status", "id"),)


class SweepTrial(Base):
    """One trial of a sweep: what Optuna's sampler chose (params, their distributions, the sampler's and
    pruner's own attributes) and, once its job ended, its state and objective value. The driver rebuilds an
    Optuna study from these rows for every decision, so no decision depends on a process's memory."""

    __tablename__ = "sweep_trial"

    sweep_id: Mapped[int] = mapped_column(ForeignKey("sweep.id", ondelete="CASCADE"), primary_key=True)
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("job.id", ondelete="SET NULL"))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    distributions: Mapped[dict[str, Any]] = mapped_column(JSON)  # name → Optuna's distribution JSON
    system_attrs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16))  # Optuna's: RUNNING, COMPLETE, PRUNED, FAIL
    value: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class SweepReport(Base):
    """A trial's objective at the end of one epoch (Optuna's intermediate value): what early stopping decides
    on and what the sweep page's learning curves draw. Written once per (trial, epoch): a resumed attempt's
    repeat of an epoch keeps the first."""

    __tablename__ = "sweep_report"

    sweep_id: Mapped[int] = mapped_column(ForeignKey("sweep.id", ondelete="CASCADE"), primary_key=True)
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[float] = mapped_column(Float)
