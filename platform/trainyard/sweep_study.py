"""Optuna, driven from the platform's tables: each decision rebuilds an in-memory study from the sweep's
trial rows and epoch reports, asks its sampler for new trials or its pruner about a running one, and hands
back what to store. No Optuna state lives in a process, so a restarted driver or worker decides exactly as
the lost one would have; the platform's transactions (not Optuna's storage) keep trials and jobs in step."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import distribution_to_json, json_to_distribution
from optuna.trial import TrialState, create_trial

from trainyard.sweep_specs import Dimension, SweepSpec



@dataclass(frozen=True)
class TrialRecord:
    """A stored trial as Optuna sees it."""

    number: int  # 1-based, as users count trials (Optuna's number + 1)
    state: str  # TrialState name: RUNNING, COMPLETE, PRUNED, FAIL
    params: dict[str, Any]
    distributions: dict[str, str]  # name → Optuna's distribution JSON
    system_attrs: dict[str, Any] = field(default_factory=dict)
    value: float | None = None
    reports: Mapping[int, float] = field(default_factory=dict)  # epoch → objective


@dataclass(frozen=True)
class Asked:
    """A new trial's choice: what to store in its row."""

    number: int
    params: dict[str, Any]
    distributions: dict[str, str]
    system_attrs: dict[str, Any]


def _sampler(spec: SweepSpec, seed: int) -> optuna.samplers.BaseSampler:
    if spec.algorithm == "grid":
        # The seed shuffles the grid's order once: every rebuild must shuffle it alike (grid ids index it).
        return optuna.samplers.GridSampler({path: dim.grid_values() for path, dim in spec.space.items()},
                                           seed=spec.seed)
    if spec.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    stopping = spec.early_stopping
    if stopping.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=stopping.startup_trials,
                                           n_warmup_steps=stopping.min_epochs)
    if stopping.type == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=stopping.min_epochs,
                                                      reduction_factor=stopping.reduction_factor)
    return optuna.pruners.NopPruner()


def _study(spec: SweepSpec, trials: Sequence[TrialRecord], seed: int) -> optuna.Study:
    optuna.logging.set_verbosity(logging.WARNING)
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), sampler=_sampler(spec, seed),
                                pruner=_pruner(spec), direction=spec.objective.goal)
    for expected, trial in enumerate(sorted(trials, key=lambda t: t.number), start=1):
        if trial.number != expected:
            raise ValueError(f"trial {expected} is missing: a sweep's trials are numbered without gaps")
        state = TrialState[trial.state]
        study.add_trial(create_trial(
            state=state, params=trial.params,
            distributions={name: json_to_distribution(d) for name, d in trial.distributions.items()},
            value=trial.value if state == TrialState.COMPLETE else None,
            intermediate_values=dict(trial.reports), system_attrs=dict(trial.system_attrs),
        ))
    return study


def _suggest(trial: optuna.Trial, path: str, dim: Dimension, grid: bool) -> Any:
    if grid or dim.type == "choice":
        return trial.suggest_categorical(path, dim.grid_values() if grid else dim.values)
    if dim.type == "int":
        return trial.suggest_int(path, int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log)
    return trial.suggest_float(path, dim.low, dim.high, step=dim.step, log=dim.type == "loguniform")


def ask(spec: SweepSpec, trials: Sequence[TrialRecord], count: int) -> list[Asked]:
    """`count` new trials from the sampler, given every stored trial (running ones included, so a grid never
    hands out a point twice). Seeded by the sweep's seed and the first new trial's number: deterministic, and
    no two decisions replay the same random stream."""
    study = _study(spec, trials, seed=spec.seed * 1_000_003 + len(trials))
    asked = []
    for _ in range(count):
        trial = study.ask()
        for path, dim in spec.space.items():
            _suggest(trial, path, dim, grid=spec.algorithm == "grid")
        frozen = study.get_trials(deepcopy=False)[-1]
        asked.append(Asked(number=frozen.number + 1, params=dict(frozen.params),
                           distributions={k: distribution_to_json(d) for k, d in frozen.distributions.items()},
                           system_attrs=dict(frozen.system_attrs)))
    return asked


def should_prune(spec: SweepSpec, trials: Sequence[TrialRecord], number: int) -> tuple[bool, dict[str, Any]]:
    """Optuna's pruner on running trial `number` (its reports stored up to the latest epoch): (stop it?, its
    system attributes afterwards — successive halving records the rungs a trial has passed there)."""
    study = _study(spec, trials, seed=spec.seed)
    frozen = study.get_trials(deepcopy=False)[number - 1]
    if frozen.state != TrialState.RUNNING or frozen.last_step is None:
        return False, dict(frozen.system_attrs)
    prune = study.pruner.prune(study, frozen)
    return bool(prune), dict(study.get_trials(deepcopy=False)[number - 1].system_attrs)


def best_number(spec: SweepSpec, trials: Sequence[TrialRecord]) -> int | None:
    """The completed trial with the best value (the first of equals), or None."""
    complete = [t for t in trials if t.state == "COMPLETE" and t.value is not None]
    if not complete:
        return None
    sign = -1 if spec.objective.goal == "maximize" else 1
    return min(complete, key=lambda t: (sign * t.value, t.number)).number
