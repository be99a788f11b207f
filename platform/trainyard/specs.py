"""The job spec: one pydantic schema that validates the API, the CLI and the form, and feeds OpenAPI."""

from __future__ import annotations

import warnings
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from trainyard.ml.architectures import ARCHITECTURES
from trainyard.ml.optim import OPTIMIZERS, SCHEDULERS
from trainyard.ml.transforms import AUGMENTATIONS
from trainyard.registry import Registry

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\- ]*$"


def _registered(registry: Registry, value: str) -> str:
    if value not in registry:
        raise ValueError(f"unknown {registry.kind} {value!r}; choose one of: {', '.join(registry.names())}")
    return value


class TrainParams(BaseModel):
    """Hyperparameters of a training job, with the bounds the platform accepts."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(10, ge=1, le=1000, description="Passes over the training split.")
    batch_size: int = Field(32, ge=1, le=4096, description="Images per optimisation step.")
    lr: float = Field(1e-3, gt=0, le=10, allow_inf_nan=False, description="(Peak) learning rate.")
    optimizer: str = Field("adam", description="One of the registered optimizers.")
    weight_decay: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)
    momentum: float = Field(0.9, ge=0, lt=1, allow_inf_nan=False, description="SGD momentum.")
    nesterov: bool = Field(True, description="Nesterov momentum for SGD.")
    scheduler: str = Field("none", description="Learning-rate schedule.")
    step_size: int = Field(10, ge=1, le=1000, description="Epochs between decays (scheduler step).")
    gamma: float = Field(0.1, gt=0, le=1, allow_inf_nan=False, description="Decay factor (scheduler step).")
    label_smoothing: float = Field(0.0, ge=0, lt=1, allow_inf_nan=False)
    grad_clip_norm: float | None = Field(None, gt=0, allow_inf_nan=False, description="Clip the gradient norm.")
    early_stopping_patience: int | None = Field(
        None, ge=1, le=1000, description="Stop after this many epochs without a better validation metric.")
    augmentation: str = Field("none", description="Augmentation preset (applied to images and masks alike).")
    image_size: int | None = Field(None, ge=8, le=1024, description="Resize to this square size (default: the dataset's).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast where the device supports it fast, else fp32.")
    channels_last: bool = Field(True, description="Channels-last memory format for convnets.")
    compile: bool = Field(False, description="torch.compile the training step: faster steps on a GPU for larger "
                                             "models, after a first epoch that pays for compiling (opt-in).")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed for weights and data order.")

    _optimizer = field_validator("optimizer")(lambda cls, v: _registered(OPTIMIZERS, v))
    _scheduler = field_validator("scheduler")(lambda cls, v: _registered(SCHEDULERS, v))
    _augmentation = field_validator("augmentation")(lambda cls, v: _registered(AUGMENTATIONS, v))


class Resources(BaseModel):
    """Where the job runs: the queue whose workers take it, and how many devices it trains on."""

    model_config = ConfigDict(extra="forbid")

    queue: str | None = Field(
        None, min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$",
        description="The queue whose workers take the job, e.g. gpu, gpu.h100, cpu "
                    "(default: the platform's TRAINYARD_QUEUE).")
    gpus: int = Field(
        1, ge=1, le=8,
        description="Devices to train on. N > 1 runs DistributedDataParallel over N GPUs of one host (N gloo "
                    "processes on a CPU worker) and goes to queue <queue>.x<N>, served by workers of N devices.")


PRIORITY_LEVELS = {"low": 0, "normal": 1, "high": 2}  # stored as these numbers: a higher one starts first
PRIORITY_NAMES = {number: name for name, number in PRIORITY_LEVELS.items()}
Priority = Literal["low", "normal", "high"]


def dispatch_queue(queue: str, gpus: int) -> str:
    """The broker queue a job goes to: its queue, or `<queue>.x<N>` for a job of N devices."""
    return queue if gpus == 1 else f"{queue}.x{gpus}"


# `register` is the spec's word for "add a registry version"; pydantic warns only because abc.ABCMeta has a
# method of that name, which a spec never uses.
warnings.filterwarnings("ignore", message=r"Field name \"register\" in \"(JobSpec|SweepSpec)\" shadows", category=UserWarning)


class JobSpec(BaseModel):
    """What to run: `train` an architecture on a dataset; `evaluate` a trained model on a dataset split;
    `predict` with a registered model over a folder of images (a CSV of predictions)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["train", "evaluate", "predict"] = "train"
    name: str | None = Field(None, min_length=1, max_length=200, pattern=NAME_PATTERN)
    dataset: str | None = Field(None, min_length=1, max_length=100,
                                description="A registered dataset's name (train, evaluate).")
    architecture: str | None = Field(
        None, description="A registered architecture's name (train); evaluate takes the source job's.")
    architecture_options: dict[str, Any] = Field(
        default_factory=dict, description="The architecture's own options, e.g. UNet depth and base_width.")
    weights_path: str | None = Field(
        None, max_length=4096, description="Pretrained weights from a local file under the dataset roots.")
    source_job: int | None = Field(None, ge=1, le=2**63 - 1, description="evaluate: the finished training job whose model to use.")
    model_name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$",
        description="train: the registered model to add a version to (default <dataset>-<architecture>); "
                    "evaluate, predict: the registered model to use.")
    model_version: int | None = Field(None, ge=1, le=2**31 - 1, description="evaluate, predict: the version (or give alias).")
    alias: str | None = Field(None, pattern=r"^[a-z][a-z0-9-]{0,62}$",
                              description="evaluate, predict: resolved to a version when the job is submitted.")
    path: str | None = Field(None, max_length=4096, description="predict: a folder of images under the dataset roots.")
    register: bool = Field(True, description="Register the trained model as a new version in the registry.")
    split: Literal["train", "val", "test"] = Field("test", description="evaluate: the dataset split to score.")
    params: TrainParams = Field(default_factory=TrainParams)
    resources: Resources = Field(default_factory=Resources)
    priority: Priority = Field("normal", description="Among jobs waiting in the same queue, a higher priority "
                                                     "starts first; within one priority, the older job.")
    max_attempts: int = Field(3, ge=1, le=10, description="Attempts before a lost job is failed.")

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, value: str | None) -> str | None:
        return None if value is None else _registered(ARCHITECTURES, value)
