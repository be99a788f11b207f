"""A few decoded images per class of a registered dataset, as PNGs: what the datasets page shows."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
from PIL import Image

from trainyard.datasets import get_dataset
from trainyard.db import Database
from trainyard.ml.datasets import FORMATS


def sample_pngs(db: Database, name: str, per_class: int = 6) -> list[tuple[str, list[bytes]]]:
    """Up to `per_class` training images of each class (a segmentation set: of the set) as PNG bytes."""
    dataset = get_dataset(db, name)
    return _samples(dataset.name, dataset.format, dataset.path, dataset.fingerprint, per_class)


@functools.lru_cache(maxsize=8)  # keyed on the fingerprint: a changed dataset is sampled again
def _samples(name: str, fmt: str, path: str | None, fingerprint: str, per_class: int
             ) -> list[tuple[str, list[bytes]]]:
    splits = FORMATS.get(fmt).obj.load(Path(path) if path else None, None)
    images, targets = splits.train.tensors
    if splits.task != "classification":
        return [("samples", [_png(images[i].numpy()) for i in range(min(len(images), per_class * 2))])]
    grid = []
    labels = targets.numpy()
    for index, class_name in enumerate(splits.classes):
        chosen = np.flatnonzero(labels == index)[:per_class]
        grid.append((class_name, [_png(images[i].numpy()) for i in chosen]))
    return grid


def _png(chw: np.ndarray) -> bytes:
    image = np.ascontiguousarray(chw.transpose(1, 2, 0))
    pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    if max(pil.size) < 64:  # tiny images (digits are 8×8) are enlarged so a person can see them
        scale = 64 // max(pil.size)
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    out = io.BytesIO()
    pil.save(out, "PNG")
    return out.getvalue()

