"""Response and query schemas of the REST API (the request body is the platform's `JobSpec`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from apiflask.fields import UploadFile
from pydantic import BaseModel, ConfigDict, Field, field_validator

from trainyard.models import JobStatus


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class JobEventOut(Out):
    at: datetime
    from_status: str | None
    to_status: str
    attempt: int
    message: str


class QueueWaitOut(Out):
    queue: str
    jobs_ahead: int = Field(description="Jobs in the same queue that start before this one, counted up to 1,000")
    jobs_ahead_capped: bool = Field(False, description="True when 1,000 or more jobs are ahead (the count stops there)")
    served_by: list[str] = Field(description="Live workers consuming the queue (the first 20); empty means none "
                                             "will take it")
    message: str


class JobOut(Out):
    id: int
    kind: str
    name: str
    status: str
    dataset: str
    architecture: str
    spec: dict[str, Any]
    queue: str = Field(description="The broker queue: resources.queue, or <queue>.x<N> for a job of N devices")
    priority: Literal["low", "normal", "high"]
    attempt: int
    max_attempts: int
    cancel_requested: bool
    progress: dict[str, Any] = Field(description="epoch, epochs, and within an epoch batch, batches")
    metrics: dict[str, Any]
    mlflow_run_id: str | None
    checkpoint_epoch: int | None
    checkpoint_sha256: str | None
    model_name: str | None = Field(description="Registered model the job added a version to")
    model_version: int | None
    owner: str | None = Field(description="The user whose token submitted the job")
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    sweep_id: int | None = Field(None, description="A sweep's trial: the sweep")
    trial: int | None = Field(None, description="A sweep's trial: its number in the sweep (1, 2, ...)")
    events: list[JobEventOut] = []
    waiting: QueueWaitOut | None = Field(None, description="GET /jobs/{id} of a QUEUED job: why it has not started")


class JobPageOut(BaseModel):
    items: list[JobOut]
    next_before: int | None = Field(description="Pass as `before` to get the next (older) page.")


_STATUSES = "|".join(JobStatus)


class JobListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The pattern is in the OpenAPI document too, so clients (and fuzzers) know which values are valid;
    # the validator below still gives the friendlier message.
    status: str | None = Field(None, description="Comma-separated statuses, e.g. QUEUED,RUNNING",
                               pattern=rf"^(?i:\s*({_STATUSES})\s*(,\s*({_STATUSES})\s*)*)?$")
    dataset: str | None = Field(None, max_length=100, description="Only jobs on this dataset")
    architecture: str | None = Field(None, max_length=100, description="Only jobs of this architecture")
    sweep: int | None = Field(None, ge=1, le=2**63 - 1, description="Only the trials of this sweep")
    limit: int = Field(50, ge=1, le=200)
    before: int | None = Field(None, ge=1, le=2**63 - 1, description="Only jobs with a smaller id (keyset pagination).")

    @field_validator("status")
    @classmethod
    def _known_statuses(cls, value: str | None) -> str | None:
        if value:
            wanted = [s.strip().upper() for s in value.split(",") if s.strip()]
            unknown = [s for s in wanted if s not in JobStatus.__members__]
            if unknown:
                raise ValueError(f"unknown status {', '.join(unknown)}; use {', '.join(JobStatus.__members__)}")
            return ",".join(wanted)
        return None

    @property
    def statuses(self) -> list[str]:
        return self.status.split(",") if self.status else []


class TrialOut(Out):
    number: int
    job_id: int | None = Field(description="The trial's train job (None if its values made no valid job)")
    status: str = Field(description="Its job's status: QUEUED, RUNNING, SUCCEEDED, PRUNED (stopped early by the "
                                    "sweep), FAILED or CANCELLED")
    params: dict[str, Any] = Field(description="The searched fields' values, by path")
    value: float | None = Field(description="The objective (at the best or last epoch once ended; the latest "
                                            "epoch's while it runs)")
    epochs: int = Field(description="Epochs reported")
    error: str | None
    reports: list[tuple[int, float]] = Field(description="(epoch, objective) of every epoch so far")


class SweepOut(Out):
    id: int
    name: str
    status: str = Field(description="RUNNING, SUCCEEDED, FAILED or CANCELLED")
    spec: dict[str, Any]
    max_trials: int
    max_parallel: int
    trials_started: int
    owner: str | None
    status_reason: str | None = Field(description="Why it is in its status (e.g. why it stopped itself)")
    mlflow_run_id: str | None = Field(description="The parent run its trials' runs nest under")
    best_trial: int | None
    best_value: float | None
    model_name: str | None = Field(description="The registered model its best trial became a version of")
    model_version: int | None
    created_at: datetime
    finished_at: datetime | None
    counts: dict[str, int] = Field(description="Trials by status")
    trials: list[TrialOut] = []


class SweepPageOut(BaseModel):
    items: list[SweepOut]
    next_before: int | None


class SweepListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(50, ge=1, le=200)
    before: int | None = Field(None, ge=1, le=2**63 - 1)


class DatasetOut(Out):
    name: str
    format: str
    task: str
    builtin: bool
    num_samples: int
    num_classes: int
    classes: list[str]
    splits: dict[str, int]
    image_shape: list[int]
    fingerprint: str
    report: dict[str, Any]
    created_at: datetime


class DatasetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=100, description="Lower-case letters, digits, '.', '_', '-'.")
    format: str = Field(..., min_length=1, max_length=32, description="A registered dataset format.")
    path: str = Field(..., min_length=1, max_length=4096, description="Absolute path inside a dataset root.")


class DatasetUploadIn(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    name: str = Field(..., min_length=1, max_length=100, description="Lower-case letters, digits, '.', '_', '-'.")
    format: str = Field(..., min_length=1, max_length=32, description="A registered dataset format.")
    archive: UploadFile = Field(..., description="A zip or tar(.gz/.bz2/.xz) of the dataset folder.")


class DatasetListOut(BaseModel):
    items: list[DatasetOut]


class ArchitectureOut(BaseModel):
    name: str
    task: str
    description: str
    options: dict[str, Any] = Field(description="JSON schema of the architecture's options")


class ArchitectureListOut(BaseModel):
    items: list[ArchitectureOut]


class CheckOut(BaseModel):
    ok: bool
    detail: str


class HealthOut(BaseModel):
    status: str = Field(description="ok when every dependency answers, else degraded")
    checks: dict[str, CheckOut]


class ModelOut(Out):
    name: str
    description: str
    aliases: dict[str, int] = Field(description="alias → version")
    latest_version: int | None
    created_at: datetime
    updated_at: datetime
    links: dict[str, str] = {}


class ModelVersionOut(Out):
    name: str
    version: int
    run_id: str | None
    source: str
    aliases: list[str]
    created_at: datetime
    job_id: int | None = Field(description="The training job that produced it")
    primary_metric: str | None
    primary_value: float | None
    metrics: dict[str, float]
    tags: dict[str, str]
    links: dict[str, str] = {}


class ModelDetailOut(ModelOut):
    versions: list[ModelVersionOut]


class ModelListOut(BaseModel):
    items: list[ModelOut]


class PromoteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(..., ge=1, le=2**31 - 1)
    force: bool = Field(False, description="Promote even if the version's primary metric is worse.")


class AliasEventOut(Out):
    model_name: str
    alias: str
    from_version: int | None
    to_version: int | None
    forced: bool
    actor: str
    at: datetime
    reason: str


class AliasEventListOut(BaseModel):
    items: list[AliasEventOut]


class PredictQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alias: str | None = Field(None, pattern=r"^[a-z][a-z0-9-]{0,62}$", description="Default: production")
    version: int | None = Field(None, ge=1, le=2**31 - 1, description="A version number instead of an alias")
    top_k: int = Field(5, ge=1, le=1000)

    @field_validator("version")
    @classmethod
    def _one_of(cls, value, info):
        if value is not None and info.data.get("alias"):
            raise ValueError("give either alias or version, not both")
        return value


class PredictionOut(BaseModel):
    model: str
    version: int
    alias: str | None
    task: str
    predictions: list[dict[str, Any]] = Field(
        description="Per image: top (label, probability) list, or mask_png (base64 PNG of class indices) "
                    "and class_fractions")


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: str = Field(min_length=1, max_length=100, description="Who the token acts as; owns the jobs it submits")
    role: str = Field("member", description="viewer, member or admin")
    name: str = Field("", max_length=200, description="What the token is for, e.g. 'laptop CLI'")
    expires_in_days: int = Field(90, ge=1, le=3650)


class TokenOut(Out):
    id: int
    user: str
    role: str
    name: str
    prefix: str = Field(description="The secret's first characters, to tell tokens apart")
    created_by: str
    created_at: datetime
    expires_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    active: bool


class TokenCreatedOut(BaseModel):
    token: TokenOut
    secret: str = Field(description="The bearer token itself. Shown this once; only its hash is kept.")


class TokenListOut(BaseModel):
    items: list[TokenOut]


class MeOut(BaseModel):
    user: str
    role: str
    token: TokenOut


class LogLineOut(Out):
    id: int
    attempt: int
    at: datetime
    line: str


class LogPageOut(BaseModel):
    items: list[LogLineOut]
    next_after: int = Field(description="Pass as `after` to get only the lines logged since.")


class LogQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    after: int = Field(0, ge=0, le=2**63 - 1, description="Only lines after this line id.")
    limit: int = Field(1000, ge=1, le=5000)


class WorkerOut(Out):
    name: str
    host: str
    device: str
    device_memory_mb: int | None
    queues: list[str]
    current_job: int | None
    started_at: datetime
    last_seen: datetime
    stopped_at: datetime | None
    gpu_utilization: float | None = Field(None, description="GPU utilisation in percent at the last heartbeat "
                                                             "(NVML); null on a CPU worker")
    gpu_memory_used_mb: int | None = Field(None, description="GPU memory in use at the last heartbeat")
    alive: bool = Field(description="False once it stopped, or has been silent longer than TRAINYARD_WORKER_STALE_SECONDS")


class QueueOut(Out):
    name: str
    queued: int
    running: int
    workers: list[str] = Field(description="Live workers consuming this queue")


class PoolOut(BaseModel):
    workers: list[WorkerOut]
    queues: list[QueueOut]
