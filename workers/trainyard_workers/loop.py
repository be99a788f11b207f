"""The epoch loop, torch only: `train_one_epoch` and `evaluate` report through callbacks, not MLflow."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from trainyard.ml.transforms import AugmentationPreset, augment, standardize, to_unit_float


class StopRequested(Exception):
    """Raised between batches when the caller's `should_stop` says so (cancel, or the lease was lost)."""


class TrialPruned(Exception):
    """A sweep's trial that its sweep's pruner stopped at an epoch's end: it ends PRUNED with what it has."""

    def __init__(self, epoch: int, metrics: dict, progress: dict) -> None:
        super().__init__(f"stopped early by its sweep at epoch {epoch}")
        self.epoch, self.metrics, self.progress = epoch, metrics, progress


@dataclass
class BatchPipeline:
    """uint8 batches on the host → normalised (and, in training, augmented) tensors on the device."""

    device: torch.device
    mean: torch.Tensor
    std: torch.Tensor
    augmentation: AugmentationPreset
    channels_last: bool
    generator: torch.Generator | None = None

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # uint8 crosses to the GPU (a quarter of float32's bytes); the float work happens there.
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        x = to_unit_float(images)
        if train and not self.augmentation.is_identity:
            masks = targets if targets.dim() == 3 else None
            x, masks = augment(self.augmentation, x, masks, self.generator)
            if masks is not None:
                targets = masks
        x = standardize(x, self.mean, self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, targets


def autocast_for(device: torch.device, bf16: bool):
    """bf16 autocast when asked for (weights stay fp32); a no-op context otherwise."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    pipeline: BatchPipeline,
    loss_fn: nn.Module,
    *,
    bf16: bool = False,
    grad_clip_norm: float | None = None,
    batch_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    on_batch: Callable[[int, torch.Tensor], None] = lambda batch, loss: None,
) -> float:
    """One pass over `batches`; returns the sample-weighted mean training loss.

    `on_batch(i, loss)` gets the detached loss tensor: turning it into a number (a device sync) is the
    caller's choice, made off the hot path.
    """
    model.train()
    total = torch.zeros((), device=pipeline.device)  # accumulate on the device: no sync per batch
    seen = 0
    for i, (images, targets) in enumerate(batches, start=1):
        if should_stop():
            raise StopRequested
        x, y = pipeline(images, targets, train=True)
        with autocast_for(pipeline.device, bf16):
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        optimizer.step()
        if batch_scheduler is not None:
            batch_scheduler.step()
        loss = loss.detach()
        total += loss * len(y)
        seen += len(y)
        on_batch(i, loss)
    return float(total) / max(seen, 1)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    pipeline: BatchPipeline,
    loss_fn: nn.Module,
    metrics,
    *,
    bf16: bool = False,
    should_stop: Callable[[], bool] = lambda: False,
    on_batch: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
):
    """Feed every batch's logits into `metrics` (reset first) and return `metrics.compute()`."""
    model.eval()
    metrics.reset()
    for images, targets in batches:
        if should_stop():
            raise StopRequested
        x, y = pipeline(images, targets, train=False)
        with autocast_for(pipeline.device, bf16):
            logits = model(x)
        logits = logits.float()
        # Sum-reduced loss so the mean over the split is exact whatever the batch sizes.
        metrics.update(logits, y, loss_fn(logits, y) * len(y))
        if on_batch is not None:
            on_batch(images, y, logits)
    return metrics.compute()
