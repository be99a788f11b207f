"""Dataset formats, registered by name. A format scans its source into a report and loads tensor splits.

Loaded splits hold decoded images in memory as uint8 tensors (N, C, H, W) at one size; normalisation and
augmentation happen later, on tensors, in the training engine (on the GPU when there is one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
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


class UnreadableImage(ValueError):
    """An uploaded or stored file that is not a decodable image (the message says why)."""


def decode_image_bytes(data: bytes, channels: int, size: tuple[int, int], max_pixels: int) -> np.ndarray:
    """Decode one image file exactly as the folder formats do at training time → uint8 (C, H, W).

    The header is read first, so an image over `max_pixels` is refused before any pixel is decoded.
    """
    from trainyard.ml.datasets import _files

    try:
        image, _mode = _files.decode_image(data, max_pixels)
    except _files.Unreadable as exc:
        raise UnreadableImage(str(exc)) from None
    return _files.finish_image(image, channels, size)


def image_files(folder: Path) -> list[Path]:
    """Every image file under `folder` (by extension, hidden files skipped), in a stable order."""
    from trainyard.ml.datasets import _files

    return sorted((p for p in _files.walk_files(folder) if _files.is_image_name(p.name)),
                  key=lambda p: _files.rel(p, folder))


def register_format(fmt: DatasetFormat) -> DatasetFormat:
    FORMATS.register(fmt.name, description=fmt.description, task=fmt.task)(fmt)
    return fmt


# Datasets every installation has, registered when the database is first used: (name, format).
BUILTIN_DATASETS: list[tuple[str, str]] = [("digits", "digits"), ("shapes", "shapes")]

# Importing the format modules fills the registry.
from trainyard.ml.datasets import digits  # noqa: E402,F401
from trainyard.ml.datasets import cifar, imagefolder, mnist, segmentation, shapes  # noqa: E402,F401
