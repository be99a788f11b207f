"""The epoch loop, torch only: `train_one_epoch` and `evaluate` report through callbacks, not MLflow."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader


class StopRequested(Exception):
    """Raised between batches when the caller's `should_stop` says so (cancel, or the lease was lost)."""


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    on_batch: Callable[[int, int], None] = lambda batch, batches: None,
) -> float:
    """One pass over `loader`; returns the sample-weighted mean training loss."""
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    total = torch.zeros((), device=device)  # accumulate on the device: no sync per batch
    seen = 0
    batches = len(loader)
    for i, (images, targets) in enumerate(loader, start=1):
        if should_stop():
            raise StopRequested
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        loss = loss_fn(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach() * len(targets)
        seen += len(targets)
        on_batch(i, batches)
    return float(total) / max(seen, 1)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Mean loss and accuracy of `model` on `loader`."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        logits = model(images)
        loss += loss_fn(logits, targets)
        correct += (logits.argmax(dim=1) == targets).sum()
        seen += len(targets)
    return {"loss": float(loss) / max(seen, 1), "accuracy": float(correct) / max(seen, 1)}
