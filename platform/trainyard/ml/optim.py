"""Optimizers, registered by name so the spec, the API schema and the CLI share one list."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from trainyard.registry import Registry

OptimizerBuilder = Callable[[Iterable[torch.nn.Parameter], float, float, float], torch.optim.Optimizer]

OPTIMIZERS: Registry[OptimizerBuilder] = Registry("optimizer")


@OPTIMIZERS.register("sgd", description="SGD with (Nesterov) momentum")
def _sgd(params, lr, weight_decay, momentum):
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)


@OPTIMIZERS.register("adam", description="Adam")
def _adam(params, lr, weight_decay, momentum):
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


@OPTIMIZERS.register("adamw", description="AdamW (decoupled weight decay)")
def _adamw(params, lr, weight_decay, momentum):
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def build_optimizer(name: str, params, *, lr: float, weight_decay: float, momentum: float):
    return OPTIMIZERS.get(name).obj(params, lr, weight_decay, momentum)
