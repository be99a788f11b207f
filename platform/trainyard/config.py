"""The one `Settings` object. Built by the entry points (CLI, web, worker), passed in everywhere else."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Platform settings, read from `TRAINYARD_*` environment variables when constructed.

    Every URL left unset falls back to the embedded default under `data_dir`: SQLite for the platform
    database, Kombu's SQLAlchemy transport on SQLite for the broker, SQLite plus a local artifact folder
    for MLflow.
    """

    model_config = SettingsConfigDict(env_prefix="TRAINYARD_", extra="ignore")

    data_dir: Path = Path(".trainyard")
    database_url: str = ""
    broker_url: str = ""
    mlflow_tracking_uri: str = ""
    mlflow_artifact_root: str = ""
    mlflow_experiment: str = "trainyard"
    # Folders datasets and pretrained weights may be registered from (os.pathsep-separated in the
    # environment); default: <data dir>/datasets. Anything outside them is refused.
    dataset_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    checkpoint_dir: Path | None = None

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    mlflow_host: str = "127.0.0.1"
    mlflow_port: int = Field(5000, ge=1, le=65535)
    web_workers: int = Field(2, ge=1, le=64)
    api_url: str = ""
    # The CLI's token; if unset it falls back to <data dir>/admin-token when that file is readable.
    token: SecretStr | None = None

    # Security. The session-signing key defaults to a random one kept in <data dir>/secret-key; set it
    # when web processes run on several hosts.
    secret_key: SecretStr | None = None
    proxy_hops: int = Field(0, ge=0, le=5, description="reverse proxies in front of the web app")
    rate_limit_storage_uri: str = Field("memory://", description="e.g. redis://… to share limits")
    login_rate_limit: str = "10/minute"
    predict_rate_limit: str = "600/minute"
    max_upload_bytes: int = Field(2 * 1024**3, ge=1024, description="a dataset archive's size")
    max_unpacked_bytes: int = Field(8 * 1024**3, ge=1024, description="what an archive may unpack to")
    max_unpacked_files: int = Field(200_000, ge=1)

    # Where a job goes when its spec names no queue. A GPU worker serves gpu.<type> and gpu, a CPU worker
    # cpu; `trainyard up` sets gpu when the machine has GPUs and this is not set.
    queue: str = Field("cpu", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")
    # "name[:memory_mb],…": GPUs the worker pool believes this host has, where NVML finds none (tests, demos).
    simulated_gpus: str | None = None
    lease_seconds: float = Field(60.0, gt=0)
    heartbeat_seconds: float | None = Field(
        None, gt=0, description="how often a running job renews its lease; unset: a twentieth of the lease, "
                                "between 0.5 and 5 s (3 s for the default 60 s lease)")
    worker_stale_seconds: float = Field(30.0, gt=0, description="a worker silent this long is shown as lost")
    reconcile_seconds: float = Field(10.0, gt=0, description="how often lost jobs are looked for")
    sweep_seconds: float = Field(1.0, gt=0, description="how often the sweep driver looks at running sweeps")
    torch_threads: int = Field(0, ge=0, description="0 = torch's default (one per core)")
    serving_token_cache_seconds: float = Field(
        5.0, ge=0, description="the prediction server (`trainyard serve`) remembers a bearer token this long, "
                               "so a revocation reaches it within as long; 0 looks every token up every time")
    jobs_per_process: int = Field(0, ge=0, description="jobs a worker's pool process runs before a fresh one "
                                                      "replaces it; 0 = 1 on a GPU worker, 1000 on a CPU worker")
    worker_max_memory_mb: int = Field(2048, ge=0, description="a CPU worker's pool process is replaced after a job "
                                                              "that leaves it holding more than this; 0 = never")

    @field_validator("login_rate_limit", "predict_rate_limit")
    @classmethod
    def _check_rate_limit(cls, value: str) -> str:
        from limits import parse_many

        try:
            parse_many(value)
        except ValueError as exc:
            raise ValueError(f"not a rate limit like '10/minute': {exc}") from None
        return value

    @field_validator("dataset_roots", mode="before")
    @classmethod
    def _split_roots(cls, value):
        if isinstance(value, str):
            return [part for part in value.split(os.pathsep) if part.strip()]
        return value

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> Settings:
        data_dir = self.data_dir.expanduser().resolve()
        self.data_dir = data_dir
        if not self.database_url:
            self.database_url = f"sqlite:///{data_dir / 'trainyard.db'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{data_dir / 'broker.db'}"
        if not self.mlflow_tracking_uri:
            self.mlflow_tracking_uri = f"sqlite:///{data_dir / 'mlflow.db'}"
        if not self.mlflow_artifact_root and not self.mlflow_tracking_uri.startswith(("http://", "https://")):
            # A tracking server decides where artifacts go; a local store needs to be told.
            self.mlflow_artifact_root = (data_dir / "mlartifacts").as_uri()
        if not self.dataset_roots:
            self.dataset_roots = [data_dir / "datasets"]
        self.dataset_roots = [root.expanduser().resolve() for root in self.dataset_roots]
        if self.checkpoint_dir is None:
            self.checkpoint_dir = data_dir / "checkpoints"
        if not self.api_url:
            self.api_url = f"http://{self.host}:{self.port}"
        return self

    @property
    def beat_seconds(self) -> float:
        """The lease heartbeat's period: `heartbeat_seconds`, or derived from the lease so a beat or two may be
        lost before it lapses."""
        return self.heartbeat_seconds or min(5.0, max(0.5, self.lease_seconds / 20))

    @property
    def admin_token_path(self) -> Path:
        return self.data_dir / "admin-token"

    def ensure_data_dir(self) -> Path:
        """Create the data directory (the embedded stores live there) and return it."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return self.data_dir
