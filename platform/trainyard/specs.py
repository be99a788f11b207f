"""The job spec: one pydantic schema that validates the API, the CLI and the form, and feeds OpenAPI."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from trainyard.ml.architectures import ARCHITECTURES
from trainyard.ml.optim import OPTIMIZERS

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\- ]*$"


class TrainParams(BaseModel):
    """Hyperparameters of a training job, with the bounds the platform accepts."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(10, ge=1, le=1000, description="Passes over the training split.")
    batch_size: int = Field(32, ge=1, le=4096, description="Images per optimisation step.")
    lr: float = Field(1e-3, gt=0, le=10, allow_inf_nan=False, description="Learning rate.")
    optimizer: str = Field("adam", description="One of the registered optimizers.")
    weight_decay: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)
    momentum: float = Field(0.9, ge=0, lt=1, allow_inf_nan=False, description="SGD momentum.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed for weights and data order.")

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        if value not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {value!r}; choose one of: {', '.join(OPTIMIZERS.names())}")
        return value


class Resources(BaseModel):
    """Where the job runs: the Celery queue its workers listen on and how many GPUs it wants."""

    model_config = ConfigDict(extra="forbid")

    queue: str = Field("training", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.\-]+$")
    # A worker owns one GPU today; multi-GPU (DDP) jobs are refused until the engine can run them.
    gpus: int = Field(0, ge=0, le=1, description="GPUs for the job (0 or 1); 0 runs on whatever the worker has.")


class JobSpec(BaseModel):
    """What to run. `kind` is `train` for now; `evaluate` arrives with the training engine."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["train"] = "train"
    name: str | None = Field(None, min_length=1, max_length=200, pattern=NAME_PATTERN)
    dataset: str = Field(..., min_length=1, max_length=100, description="A registered dataset's name.")
    architecture: str = Field(..., description="A registered architecture's name.")
    params: TrainParams = Field(default_factory=TrainParams)
    resources: Resources = Field(default_factory=Resources)
    priority: int = Field(0, ge=0, le=9, description="Higher runs first where the broker supports it.")
    max_attempts: int = Field(3, ge=1, le=10, description="Attempts before a lost job is failed.")

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, value: str) -> str:
        if value not in ARCHITECTURES:
            raise ValueError(
                f"unknown architecture {value!r}; choose one of: {', '.join(ARCHITECTURES.names())}"
            )
        return value
