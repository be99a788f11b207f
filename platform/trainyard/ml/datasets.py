"""Dataset formats, registered by name: each scans its source into a report and loads tensor splits."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from trainyard.registry import Registry


@dataclass(frozen=True)
class DatasetScan:
    """What registration records about a dataset: sizes, classes, balance and a content fingerprint."""

    task: str
    num_samples: int
    classes: list[str]
    splits: dict[str, int]
    image_shape: list[int]  # channels, height, width
    fingerprint: str
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageSplits:
    """Decoded, normalised splits held in memory as tensors, plus what serving must repeat."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    classes: list[str]
    image_shape: tuple[int, int, int]
    normalization: dict[str, list[float]]


@dataclass(frozen=True)
class DatasetFormat:
    scan: Callable[[str | None], DatasetScan]
    load: Callable[[str | None], ImageSplits]
    task: str


FORMATS: Registry[DatasetFormat] = Registry("dataset format")

# The digits split is part of the dataset's identity, not of a job: every job sees the same test set.
DIGITS_SPLIT_SEED = 0


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # ships its data inside the package: no download

    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 16.0  # 0..16 ink levels → 0..1
    return images[:, None, :, :], bunch.target.astype(np.int64)


def _digits_split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train_val, test = train_test_split(idx, test_size=0.2, stratify=labels, random_state=DIGITS_SPLIT_SEED)
    train, val = train_test_split(
        train_val, test_size=0.125, stratify=labels[train_val], random_state=DIGITS_SPLIT_SEED
    )
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def _scan_digits(_path: str | None) -> DatasetScan:
    images, labels = _digits_arrays()
    splits = _digits_split_indices(labels)
    counts = np.bincount(labels, minlength=10)
    return DatasetScan(
        task="classification",
        num_samples=len(labels),
        classes=[str(i) for i in range(10)],
        splits={name: len(ix) for name, ix in splits.items()},
        image_shape=list(images.shape[1:]),
        fingerprint=hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest(),
        report={
            "source": "scikit-learn load_digits (UCI optical recognition of handwritten digits)",
            "class_counts": {str(i): int(c) for i, c in enumerate(counts)},
            "image_sizes": {"8x8": len(labels)},
            "modes": {"L": len(labels)},
            "unreadable": [],
        },
    )


def _load_digits(_path: str | None) -> ImageSplits:
    images, labels = _digits_arrays()
    splits = _digits_split_indices(labels)
    mean = float(images[splits["train"]].mean())
    std = float(images[splits["train"]].std())
    x = torch.from_numpy((images - mean) / std)
    y = torch.from_numpy(labels)

    def part(name: str) -> TensorDataset:
        ix = torch.from_numpy(splits[name])
        return TensorDataset(x[ix], y[ix])

    return ImageSplits(
        train=part("train"),
        val=part("val"),
        test=part("test"),
        classes=[str(i) for i in range(10)],
        image_shape=(1, 8, 8),
        normalization={"mean": [mean], "std": [std], "scale": [1 / 16]},
    )


FORMATS.register("digits", description="scikit-learn's 8×8 handwritten digits (built in)")(
    DatasetFormat(scan=_scan_digits, load=_load_digits, task="classification")
)

# Datasets every installation has, registered when the database is first used: (name, format, path).
BUILTIN_DATASETS: list[tuple[str, str, str | None]] = [("digits", "digits", None)]
