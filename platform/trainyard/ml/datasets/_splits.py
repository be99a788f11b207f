"""Deterministic splits, content fingerprints, and decoding a whole dataset into `ImageSplits`."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from trainyard.ml.datasets import ImageSplits
from trainyard.ml.datasets._files import (
    HOLDOUT_FRACTION,
    SPLITS,
    SPLIT_SEED,
    Unreadable,
    _T,
    round_half_up,
)


# ---- fingerprints --------------------------------------------------------------------------------------


class Fingerprint:
    """sha256 over (name, content digest) pairs in sorted name order, whatever order they were added in."""

    def __init__(self) -> None:
        self._entries: dict[str, bytes] = {}

    def add_bytes(self, name: str, data: bytes) -> None:
        self._entries[name] = hashlib.sha256(data).digest()

    def add_digest(self, name: str, digest: bytes) -> None:
        self._entries[name] = digest

    def hexdigest(self) -> str:
        h = hashlib.sha256(b"trainyard-dataset-v1\0")
        for name in sorted(self._entries):
            encoded = name.encode("utf-8")
            h.update(len(encoded).to_bytes(4, "big") + encoded + self._entries[name])
        return h.hexdigest()


# ---- splits --------------------------------------------------------------------------------------------


def _class_seed(seed: int, key: str) -> list[int]:
    return [seed, int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")]


def stratified_holdout(
    labels: Sequence[int] | np.ndarray,
    class_keys: Sequence[str],
    holdouts: Sequence[str],
    *,
    fraction: float = HOLDOUT_FRACTION,
    seed: int = SPLIT_SEED,
) -> dict[str, np.ndarray]:
    """Carve `fraction` of the samples into each of `holdouts`, stratified by label; the rest is "train".

    Samples are given in a deterministic order (sorted paths). Each class is shuffled with its own generator
    seeded by (seed, hash of the class name), so adding a class does not reshuffle the others. Totals are
    round(fraction × n) per holdout (at least 1 when there are enough samples), spread over the classes by
    largest remainder, and every class keeps at least one training sample. Returns sorted index arrays.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    by_class = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
    order = {
        c: ix[np.random.default_rng(_class_seed(seed, class_keys[c])).permutation(len(ix))]
        for c, ix in by_class.items()
    }
    taken = {c: 0 for c in by_class}
    out: dict[str, np.ndarray] = {}
    for split in holdouts:
        target = round_half_up(fraction * n)
        if target == 0 and n >= len(holdouts) + 1:
            target = 1
        quota = {c: fraction * len(ix) for c, ix in by_class.items()}
        room = {c: len(by_class[c]) - 1 - taken[c] for c in by_class}  # keep one for training
        give = {c: max(0, min(int(math.floor(quota[c])), room[c])) for c in by_class}
        # The remaining seats go by largest remainder, then by class size, then by class index.
        rank = sorted(by_class, key=lambda c: (-(quota[c] - give[c]), -len(by_class[c]), c))
        left = target - sum(give.values())
        while left > 0:
            progressed = False
            for c in rank:
                if left > 0 and give[c] < room[c]:
                    give[c] += 1
                    left -= 1
                    progressed = True
            if not progressed:
                break
        while left < 0:  # floors exceeded the target (cannot happen with one fraction; kept for safety)
            c = max((c for c in rank if give[c] > 0), key=lambda c: give[c])
            give[c] -= 1
            left += 1
        chosen = [order[c][taken[c]: taken[c] + give[c]] for c in by_class]
        for c in by_class:
            taken[c] += give[c]
        out[split] = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
    rest = [order[c][taken[c]:] for c in by_class]
    out["train"] = np.sort(np.concatenate(rest)) if rest else np.zeros(0, np.int64)
    return out


def assign_splits(
    labels: Sequence[int],
    folder_split: Sequence[str | None],
    class_keys: Sequence[str],
    folders_present: Iterable[str],
) -> tuple[dict[str, np.ndarray], str]:
    """Sample indices per split, and how they were made ("split_source").

    With no split folders: a stratified 80/10/10 split with seed 0. With split folders: the folders, and a
    val or test split whose folder is missing (or holds no usable sample) is carved out of train (10 % each,
    stratified, seed 0).
    """
    labels = np.asarray(labels, dtype=np.int64)
    folders_present = set(folders_present)
    if not folders_present:
        parts = stratified_holdout(labels, class_keys, ("val", "test"))
        return {s: parts[s] for s in SPLITS}, f"random 80/10/10 stratified by class, seed {SPLIT_SEED}"
    where = np.array([s or "" for s in folder_split])
    parts = {s: np.flatnonzero(where == s) for s in SPLITS}
    missing = [s for s in ("val", "test") if len(parts[s]) == 0]
    if not missing:
        return parts, "folders"
    train = parts["train"]
    carved = stratified_holdout(labels[train], class_keys, missing)
    for s in missing:
        parts[s] = train[carved[s]]
    parts["train"] = train[carved["train"]]
    have = [s for s in SPLITS if s not in missing]
    return parts, (
        f"folders ({', '.join(have)}); {' and '.join(missing)} carved from train: "
        f"10 % each, stratified by class, seed {SPLIT_SEED}"
    )


def tail_split(n: int, fraction: float = HOLDOUT_FRACTION) -> int:
    """How many of n training samples the last-10 % validation split takes (at least 1 if n ≥ 2)."""
    k = round_half_up(fraction * n)
    return max(k, 1) if n >= 2 else 0


# ---- decoding a whole dataset at one size ---------------------------------------------------------------


@dataclass
class Decoded:
    ok: list[int]  # indices (into the items) that decoded
    arrays: list[np.ndarray]  # one stacked array per output, rows aligned with `ok`
    natives: list[Any]  # what `decode` reported per decoded item (native size, mode, ...)
    size: tuple[int, int]
    channels: int


def decode_all(
    items: Sequence[_T],
    probe: Callable[[_T], Any],
    decode: Callable[[_T, tuple[int, int], int], tuple[tuple[np.ndarray, ...], Any]],
    choose: Callable[[list[Any]], tuple[tuple[int, int], int]],
    fixed_size: tuple[int, int] | None,
) -> Decoded:
    """Decode items straight to one size without holding native-size images.

    `probe` reads headers (cheap) for a provisional (size, channels) from `choose`; every item is then decoded
    and resized into preallocated arrays. If some files only fail at full decoding and that changes the
    choice, the (rare) pass is repeated, so the result always equals what a scan of the same files reports.
    """
    candidates: list[int] = []
    infos: list[Any] = []
    for i, item in enumerate(items):
        try:
            infos.append(probe(item))
        except Unreadable:
            continue
        candidates.append(i)
    if not candidates:
        return Decoded([], [], [], (0, 0), 0)
    size, channels = choose(infos)
    if fixed_size is not None:
        size = fixed_size
    while True:
        arrays: list[np.ndarray] | None = None
        ok: list[int] = []
        natives: list[Any] = []
        for i in candidates:
            try:
                outs, native = decode(items[i], size, channels)
            except Unreadable:
                continue
            if arrays is None:
                arrays = [np.empty((len(candidates), *o.shape), o.dtype) for o in outs]
            for buf, o in zip(arrays, outs):
                buf[len(ok)] = o
            ok.append(i)
            natives.append(native)
        if not ok or arrays is None:
            return Decoded([], [], [], (0, 0), 0)
        final_size, final_channels = choose(natives)
        if fixed_size is not None:
            final_size = fixed_size
        if (final_size, final_channels) == (size, channels):
            return Decoded(ok, [a[: len(ok)] for a in arrays], natives, size, channels)
        size, channels, candidates = final_size, final_channels, ok


def permute_rows(a: np.ndarray, order: np.ndarray) -> None:
    """In place: a[i] = old a[order[i]] (order is a permutation of range(len(a))), one row of extra memory."""
    n = len(a)
    done = np.zeros(n, dtype=bool)
    for start in range(n):
        if done[start]:
            continue
        if order[start] == start:
            done[start] = True
            continue
        tmp = a[start].copy()
        i = start
        while True:
            done[i] = True
            j = int(order[i])
            if j == start:
                a[i] = tmp
                break
            a[i] = a[j]
            i = j


# ---- assembling ImageSplits ----------------------------------------------------------------------------


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and (sample) std on the 0..1 scale of uint8 (N, C, H, W), in bounded-memory chunks."""
    n, c = images.shape[0], images.shape[1]
    per = max(1, int(np.prod(images.shape[1:])))
    chunk = max(1, 4_000_000 // per)
    s = torch.zeros(c, dtype=torch.float64)
    sq = torch.zeros(c, dtype=torch.float64)
    for i in range(0, n, chunk):
        x = images[i: i + chunk].to(torch.float64).div_(255)
        s += x.sum(dim=(0, 2, 3))
        sq += x.square().sum(dim=(0, 2, 3))
    count = n * images.shape[2] * images.shape[3]
    if count == 0:
        return [0.0] * c, [1.0] * c
    mean = s / count
    var = (sq - s * s / count) / max(count - 1, 1)
    std = var.clamp_min(0).sqrt()
    return [float(v) for v in mean], [float(v) if v > 0 else 1.0 for v in std]


def build_splits(
    task: str, images: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor,
    counts: dict[str, int], classes: list[str],
) -> ImageSplits:
    """ImageSplits from arrays ordered train, then val, then test (`counts` rows each); the splits are views."""
    x = torch.as_tensor(images)
    y = torch.as_tensor(targets).to(torch.int64)
    assert x.dtype == torch.uint8 and x.ndim == 4, (x.dtype, x.shape)
    a, b = counts["train"], counts["train"] + counts["val"]
    assert b + counts["test"] == len(x) == len(y)
    mean, std = channel_stats(x[:a])
    return ImageSplits(
        task=task,
        train=TensorDataset(x[:a], y[:a]),
        val=TensorDataset(x[a:b], y[a:b]),
        test=TensorDataset(x[b:], y[b:]),
        classes=list(classes),
        image_shape=(int(x.shape[1]), int(x.shape[2]), int(x.shape[3])),
        mean=mean,
        std=std,
    )


def split_order(parts: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, int]]:
    order = np.concatenate([parts[s] for s in SPLITS]).astype(np.int64)
    return order, {s: int(len(parts[s])) for s in SPLITS}
