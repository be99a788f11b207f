"""Dataset formats, registered by name. A format scans its source into a report and loads tensor splits.

Loaded splits hold decoded images in memory as uint8 tensors (N, C, H, W) at one size; normalisation and
augmentation happen later, on tensors, in the training engine (on the GPU when there is one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from trainyard.registry import Registry


@dataclass(frozen=True)
class DatasetScan:
    """What registration records: sizes, classes, balance, unreadable files and a content fingerprint."""

    task: str  # "classification" or "segmentation"
    num_samples: int
    classes: list[str]
    splits: dict[str, int]  # {"train": n, "val": n, "test": n}
    image_shape: list[int]  # [channels, height, width] every sample is loaded at
    fingerprint: str  # sha256 hex over the content
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageSplits:
    """Decoded splits. Images: uint8 (N, C, H, W). Targets: int64 (N,) labels, or int64 (N, H, W) masks."""

    task: str
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    classes: list[str]
    image_shape: tuple[int, int, int]
    mean: list[float]  # per channel, on the 0..1 scale, from the train split
    std: list[float]


@dataclass(frozen=True)
class DatasetFormat:
    name: str
    task: str
    scan: Callable[[Path | None], DatasetScan]
    # load(path, image_size): image_size (height, width) overrides the scanned size where the format resizes.
    load: Callable[[Path | None, tuple[int, int] | None], ImageSplits]
    description: str = ""
    builtin: bool = False  # built-in formats generate or ship their data: no path


FORMATS: Registry[DatasetFormat] = Registry("dataset format")


def resize_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize uint8 (N, C, H, W) images with antialiased bilinear interpolation, staying uint8."""
    from torchvision.transforms.v2 import functional as F

    return F.resize(images, list(size), antialias=True)


def register_format(fmt: DatasetFormat) -> DatasetFormat:
    FORMATS.register(fmt.name, description=fmt.description, task=fmt.task)(fmt)
    return fmt


# Datasets every installation has, registered when the database is first used: (name, format).
BUILTIN_DATASETS: list[tuple[str, str]] = [("digits", "digits"), ("shapes", "shapes")]

# Importing the format modules fills the registry.
from trainyard.ml.datasets import digits  # noqa: E402,F401
from trainyard.ml.datasets import cifar, imagefolder, mnist, segmentation, shapes  # noqa: E402,F401
