"""`digits`: scikit-learn's 8×8 handwritten digits, shipped inside the package (no download)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from trainyard.ml.datasets import DatasetFormat, DatasetScan, ImageSplits, register_format, resize_images

# The digits split is part of the dataset's identity, not of a job: every job sees the same test set.
DIGITS_SPLIT_SEED = 0


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # 17 ink levels (0..16) spread over uint8's range, like any other 8-bit grayscale image.
    images = np.rint(bunch.images * (255 / 16)).astype(np.uint8)
    return images[:, None, :, :], bunch.target.astype(np.int64)


def _digits_split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train_val, test = train_test_split(idx, test_size=0.2, stratify=labels, random_state=DIGITS_SPLIT_SEED)
    train, val = train_test_split(
        train_val, test_size=0.125, stratify=labels[train_val], random_state=DIGITS_SPLIT_SEED
    )
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def _scan_digits(_path: Path | None) -> DatasetScan:
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


def _load_digits(_path: Path | None, image_size: tuple[int, int] | None = None) -> ImageSplits:
    images, labels = _digits_arrays()
    splits = _digits_split_indices(labels)
    x = torch.from_numpy(images)
    if image_size is not None and tuple(image_size) != (8, 8):
        x = resize_images(x, image_size)
    y = torch.from_numpy(labels)
    train = x[torch.from_numpy(splits["train"])].float() / 255
    mean, std = float(train.mean()), float(train.std())

    def part(name: str) -> TensorDataset:
        ix = torch.from_numpy(splits[name])
        return TensorDataset(x[ix], y[ix])

    return ImageSplits(
        task="classification",
        train=part("train"),
        val=part("val"),
        test=part("test"),
        classes=[str(i) for i in range(10)],
        image_shape=(1, *x.shape[2:]),
        mean=[mean],
        std=[std],
    )


register_format(DatasetFormat(
    name="digits", task="classification", scan=_scan_digits, load=_load_digits, builtin=True,
    description="scikit-learn's 1,797 8×8 handwritten digits (built in)",
))
