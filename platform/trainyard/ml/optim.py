"""Optimizers, registered by name so the spec, the API schema and the CLI share one list."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from trainyard.registry import Registry

OptimizerBuilder = Callable[..., torch.optim.Optimizer]

OPTIMIZERS: Registry[OptimizerBuilder] = Registry("optimizer")


@OPTIMIZERS.register("sgd", description="SGD with momentum (Nesterov unless nesterov is false)")
def _sgd(params, *, lr, weight_decay, momentum, nesterov):
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=nesterov and momentum > 0)


@OPTIMIZERS.register("adam", description="Adam")
def _adam(params, *, lr, weight_decay, momentum, nesterov):
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


@OPTIMIZERS.register("adamw", description="AdamW (decoupled weight decay)")
def _adamw(params, *, lr, weight_decay, momentum, nesterov):
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], **kwargs) -> torch.optim.Optimizer:
    return OPTIMIZERS.get(name).obj(params, **kwargs)


# A scheduler builder gets the optimizer, the run's length and the spec's params; it returns the
# scheduler and whether it steps after every batch (True) or every epoch (False).
SchedulerBuilder = Callable[..., tuple[torch.optim.lr_scheduler.LRScheduler | None, bool]]

SCHEDULERS: Registry[SchedulerBuilder] = Registry("scheduler")


@SCHEDULERS.register("none", description="constant learning rate")
def _no_schedule(optimizer, *, epochs, steps_per_epoch, lr, step_size, gamma):
    return None, False


@SCHEDULERS.register("step", description="multiply by gamma every step_size epochs")
def _step(optimizer, *, epochs, steps_per_epoch, lr, step_size, gamma):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma), False


@SCHEDULERS.register("cosine", description="cosine decay to zero over the run, per batch")
def _cosine(optimizer, *, epochs, steps_per_epoch, lr, step_size, gamma):
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch), True


@SCHEDULERS.register("onecycle", description="one-cycle: warm up to lr, then anneal, per batch")
def _onecycle(optimizer, *, epochs, steps_per_epoch, lr, step_size, gamma):
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch
    )
    return scheduler, True


def build_scheduler(name: str, optimizer, **kwargs):
    """(scheduler or None, steps per batch?) for the registered schedule `name`."""
    return SCHEDULERS.get(name).obj(optimizer, **kwargs)
