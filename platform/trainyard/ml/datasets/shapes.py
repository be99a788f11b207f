"""`shapes`: a generated segmentation dataset of coloured circles, squares/rectangles and triangles (built in).

1,200 RGB images of 64×64 (train 960 / val 120 / test 120), 1–3 non-overlapping shapes each, on a noisy
background gradient. Classes: background, circle, square, triangle. Everything comes from one numpy
`default_rng(SEED)` and is rasterised with numpy on pixel centres (+, −, × only; vertex coordinates are
rounded to 1/64 px), so the bytes are the same on every run and every machine.
"""

from __future__ import annotations

import hashlib
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from trainyard.ml.datasets import DatasetFormat, DatasetScan, ImageSplits, register_format, resize_images
from trainyard.ml.datasets import _files as F
from trainyard.ml.datasets import _splits as S

SEED = 20240917
SIZE = 64
CLASSES = ["background", "circle", "square", "triangle"]
SPLIT_COUNTS = {"train": 960, "val": 120, "test": 120}
NUM_SAMPLES = sum(SPLIT_COUNTS.values())
NOISE_STD = 10.0
MIN_COLOUR_DISTANCE = 90.0  # Euclidean RGB distance between a shape's colour and its background
PLACEMENT_TRIES = 30

_Y, _X = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5  # pixel centres


def _q(v: float) -> float:
    """Round a coordinate to 1/64 px, so last-bit differences in sin/cos cannot move an edge."""
    return round(v * 64) / 64


def _circle(rng: np.random.Generator) -> np.ndarray:
    r = rng.uniform(8, 16)
    cx, cy = rng.uniform(r, SIZE - r, size=2)
    return (_X - cx) ** 2 + (_Y - cy) ** 2 <= r * r


def _rectangle(rng: np.random.Generator) -> np.ndarray:
    w = rng.uniform(15, 30)
    h = float(np.clip(w * rng.uniform(0.7, 1.4), 13, 34))
    x0 = rng.uniform(0, SIZE - w)
    y0 = rng.uniform(0, SIZE - h)
    return (_X >= x0) & (_X <= x0 + w) & (_Y >= y0) & (_Y <= y0 + h)


def _triangle(rng: np.random.Generator) -> np.ndarray:
    r = rng.uniform(11, 19)  # circumradius
    turn = rng.uniform(0, 2 * math.pi)
    jitter = rng.uniform(-0.25, 0.25, size=3)
    cx, cy = rng.uniform(r * 0.6, SIZE - r * 0.6, size=2)
    pts = [(_q(cx + r * math.cos(turn + k * 2 * math.pi / 3 + jitter[k])),
            _q(cy + r * math.sin(turn + k * 2 * math.pi / 3 + jitter[k]))) for k in range(3)]
    (x0, y0), (x1, y1), (x2, y2) = pts
    d0 = (x1 - x0) * (_Y - y0) - (y1 - y0) * (_X - x0)
    d1 = (x2 - x1) * (_Y - y1) - (y2 - y1) * (_X - x1)
    d2 = (x0 - x2) * (_Y - y2) - (y0 - y2) * (_X - x2)
    return ((d0 >= 0) & (d1 >= 0) & (d2 >= 0)) | ((d0 <= 0) & (d1 <= 0) & (d2 <= 0))


_DRAW = {1: _circle, 2: _rectangle, 3: _triangle}


def _colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    best, best_d = None, -1.0
    for _ in range(20):
        c = rng.integers(0, 256, size=3).astype(np.float64)
        d = float(np.sqrt(((c - background) ** 2).sum()))
        if d >= MIN_COLOUR_DISTANCE:
            return c
        if d > best_d:
            best, best_d = c, d
    return best  # type: ignore[return-value]


def _one(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    base = rng.uniform(50, 205, size=3)
    slope = rng.uniform(-0.4, 0.4, size=(2, 3))  # a gentle gradient, per channel, up to ±13 across the image
    image = base + (_X - SIZE / 2)[..., None] * slope[0] + (_Y - SIZE / 2)[..., None] * slope[1]
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        cls = int(rng.integers(1, 4))
        colour = _colour(rng, base)
        for _ in range(PLACEMENT_TRIES):
            inside = _DRAW[cls](rng)
            if inside.sum() >= 40 and not (inside & (mask > 0)).any():
                mask[inside] = cls
                image[inside] = colour
                break
    image = image + rng.normal(0.0, NOISE_STD, size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8).transpose(2, 0, 1), mask


@lru_cache(maxsize=1)
def _arrays() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    images = np.empty((NUM_SAMPLES, 3, SIZE, SIZE), dtype=np.uint8)
    masks = np.empty((NUM_SAMPLES, SIZE, SIZE), dtype=np.uint8)
    for i in range(NUM_SAMPLES):
        images[i], masks[i] = _one(rng)
    images.setflags(write=False)
    masks.setflags(write=False)
    return images, masks


def _scan(_path: Path | None) -> DatasetScan:
    images, masks = _arrays()
    h = hashlib.sha256(b"trainyard-shapes-v1\0")
    h.update(images.tobytes())
    h.update(masks.tobytes())
    pixels = np.bincount(masks.ravel(), minlength=len(CLASSES))
    present = np.stack([(masks == k).any(axis=(1, 2)) for k in range(len(CLASSES))]).sum(axis=1)
    return DatasetScan(
        task="segmentation",
        num_samples=NUM_SAMPLES,
        classes=list(CLASSES),
        splits=dict(SPLIT_COUNTS),
        image_shape=[3, SIZE, SIZE],
        fingerprint=h.hexdigest(),
        report={
            "source": f"generated: numpy default_rng({SEED}), 1-3 non-overlapping shapes per image, "
                      f"gaussian noise sd {NOISE_STD:g}",
            "class_counts": {c: int(n) for c, n in zip(CLASSES, present)},  # images containing the class
            "class_pixel_fraction": {c: float(n) / masks.size for c, n in zip(CLASSES, pixels)},
            "image_sizes": {f"{SIZE}x{SIZE}": NUM_SAMPLES},
            "modes": {"RGB": NUM_SAMPLES},
            "unreadable": [],
            "ignored_files": 0,
            "split_source": "generated: first 960 train, next 120 val, last 120 test",
        },
    )


def _load(_path: Path | None, image_size: tuple[int, int] | None = None) -> ImageSplits:
    fixed = F.check_image_size(image_size)
    images, masks = _arrays()
    x = torch.from_numpy(images.copy())
    y = masks.astype(np.int64)
    if fixed is not None and fixed != (SIZE, SIZE):
        x = resize_images(x, fixed)
        y = F.resize_mask(y, fixed)
    return S.build_splits("segmentation", x, np.ascontiguousarray(y), dict(SPLIT_COUNTS), list(CLASSES))


register_format(DatasetFormat(
    name="shapes", task="segmentation", scan=_scan, load=_load, builtin=True,
    description="1,200 generated 64×64 images of circles, squares and triangles to segment (built in)",
))
