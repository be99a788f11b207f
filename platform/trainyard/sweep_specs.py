"""The sweep spec: a base train spec, a search space over its own fields, an objective, a search algorithm,
early stopping and budgets. One pydantic schema for the API, the CLI's YAML and the web form; the checks
that need the database (the space against the job spec's bounds, the objective against the task) are in
`trainyard.sweeps`."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trainyard.specs import NAME_PATTERN, JobSpec


class Dimension(BaseModel):
    """One searched field: `choice` among values; `uniform` or `loguniform` floats in [low, high]; `int` in
    [low, high]. `step` makes a range discrete (and is what lets a range take part in a grid)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["choice", "uniform", "loguniform", "int"]
    values: list[Any] | None = Field(None, min_length=1, max_length=100, description="choice: the values")
    low: float | None = Field(None, allow_inf_nan=False)
    high: float | None = Field(None, allow_inf_nan=False)
    step: float | None = Field(None, gt=0, allow_inf_nan=False, description="uniform, int: the spacing")
    log: bool = Field(False, description="int: sample on a log scale")

    @model_validator(mode="after")
    def _shape(self) -> Dimension:
        if self.type == "choice":
            if self.values is None or self.low is not None or self.high is not None or self.step is not None:
                raise ValueError("a choice takes `values` (a list) and nothing else")
            if any(isinstance(v, dict | list) for v in self.values):
                raise ValueError("choice values must be numbers, strings, booleans or null")
            return self
        if self.values is not None or self.low is None or self.high is None:
            raise ValueError(f"a {self.type} range takes `low` and `high`")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.type == "loguniform":
            if self.low <= 0:
                raise ValueError("a loguniform range must start above 0")
            if self.step is not None:
                raise ValueError("a loguniform range takes no step")
        if self.type == "int":
            if self.low != int(self.low) or self.high != int(self.high) or (self.step or 1) != int(self.step or 1):
                raise ValueError("an int range takes whole numbers")
            if self.log and (self.low < 1 or self.step not in (None, 1)):
                raise ValueError("a log-scale int range starts at 1 or more and takes no step")
        elif self.log:
            raise ValueError("`log` is for int ranges; use type loguniform for floats")
        return self

    def grid_values(self) -> list[Any] | None:
        """Every value of a discrete dimension, or None for a continuous one (no grid over it)."""
        if self.type == "choice":
            return list(self.values)
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.type == "uniform" and self.step is not None:
            count = math.floor((self.high - self.low) / self.step + 1e-9) + 1
            return [round(self.low + i * self.step, 12) for i in range(count)]
        return None

    def bounds(self) -> list[Any]:
        """The values to check against the job spec: every choice, or a range's two ends."""
        if self.type == "choice":
            return list(self.values)
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]


class Objective(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: str = Field("val_accuracy", description="A metric every epoch records, e.g. val_accuracy, val_loss, "
                                                    "val_mean_iou, train_loss")
    direction: Literal["maximize", "minimize"] | None = Field(
        None, description="Default: minimize a *loss, maximize anything else")
    at: Literal["best", "last"] = Field("best", description="A trial's value: its best epoch's, or its last's")

    @property
    def goal(self) -> Literal["maximize", "minimize"]:
        return self.direction or ("minimize" if self.metric.endswith("loss") else "maximize")


class EarlyStopping(BaseModel):
    """Stops trials that are clearly worse than the others at the same epoch (Optuna's pruners)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["none", "median", "asha"] = Field(
        "none", description="median: stop a trial below the median of earlier trials at the same epoch; asha: "
                            "asynchronous successive halving (rungs at min_epochs × reduction_factor^k)")
    min_epochs: int = Field(1, ge=1, le=1000, description="Epochs every trial runs before it may be stopped")
    startup_trials: int = Field(2, ge=0, le=1000, description="median: completed trials before any is stopped")
    reduction_factor: int = Field(3, ge=2, le=10, description="asha: 1 in this many trials goes on at each rung")


class SweepSpec(BaseModel):
    """A hyperparameter search over train jobs: each trial is the base spec with the space's fields set."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, pattern=NAME_PATTERN)
    base: JobSpec = Field(description="The train spec every trial starts from (any valid POST /jobs train spec); "
                                      "its resources and priority are the trials'")
    space: dict[str, Dimension] = Field(
        min_length=1, max_length=20,
        description="Searched fields by their path in the spec: params.<name>, architecture, "
                    "architecture_options.<name>")
    objective: Objective = Field(default_factory=Objective)
    algorithm: Literal["grid", "random", "tpe"] = Field("tpe", description="Optuna's GridSampler, RandomSampler "
                                                                          "or TPESampler")
    early_stopping: EarlyStopping = Field(default_factory=EarlyStopping)
    max_trials: int = Field(10, ge=1, le=1000, description="Trials to run (failed ones count); a grid runs each "
                                                           "point once, so at most its size")
    max_parallel: int = Field(2, ge=1, le=256, description="Trials queued or running at once")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seeds the sampler (not the trials' training)")
    max_failures_in_a_row: int = Field(5, ge=1, le=1000, description="The sweep stops itself after this many "
                                                                    "trials fail one after another")
    model_name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$",
        description="The registered model the best trial becomes a version of (default: base.model_name, "
                    "else <dataset>-<architecture> of the best trial)")
    register: Literal["best", "all", "none"] = Field(
        "best", description="best: register the best trial when the sweep ends; all: every completed trial "
                            "as it finishes, as plain jobs do; none: nothing")

    def grid_size(self) -> int | None:
        """The number of grid points (None unless the algorithm is grid over discrete dimensions only)."""
        if self.algorithm != "grid" or any(dim.grid_values() is None for dim in self.space.values()):
            return None
        return math.prod(len(dim.grid_values()) for dim in self.space.values())
