"""Shared helpers for the dataset formats: walking folders, decoding images, choosing the canonical size,
fingerprinting content, splitting deterministically and assembling `ImageSplits`.

Decoding rules (every folder format uses them, so a file reads the same everywhere):

* Pillow decodes the file completely (a truncated file fails here, it is never padded with grey), takes the
  first frame of animations and applies the EXIF orientation.
* The mode is normalised to 8 bits: 16-bit grayscale (I;16, I) is scaled 0..65535 → 0..255, palette images
  expand to RGB (RGBA when they carry transparency), CMYK / YCbCr / LAB / HSV convert to RGB.
* Alpha is composited on white, then the image becomes 1 channel (when every image of the dataset is
  grayscale) or 3 (RGB), and is resized with antialiased bilinear interpolation to the canonical size.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import TensorDataset

from trainyard.errors import InvalidSpec
from trainyard.ml.datasets import ImageSplits

# Extensions treated as images; anything else in a dataset folder is ignored (and counted).
IMAGE_EXTENSIONS = frozenset({
    ".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".gif", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga",
})
# Modes that hold no colour: a dataset made only of these loads as 1 channel.
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
# Folder names that mark a predefined split, per split.
SPLIT_FOLDER_NAMES = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation"),
    "test": ("test", "testing"),
}
SPLITS = ("train", "val", "test")
SPLIT_SEED = 0
HOLDOUT_FRACTION = 0.1  # val and test each, when they are carved out of the training data
MAX_SIDE = 224  # the canonical size's longer side is clipped to this
MAX_LISTED = 1000  # at most this many unreadable files are listed in a report (the count is always exact)
MAX_SIZES_LISTED = 20

_T = TypeVar("_T")


class Unreadable(Exception):
    """A file that cannot be used; the message says why, for the report."""


def nfc(text: str) -> str:
    """Unicode NFC: a name typed on Linux and the same name stored by macOS (NFD) compare equal."""
    return unicodedata.normalize("NFC", text)


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name in {"__MACOSX", "Thumbs.db", "desktop.ini"}


def is_image_name(name: str) -> bool:
    return not is_hidden(name) and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def require_dir(path: Path | None, fmt: str) -> Path:
    if path is None:
        raise InvalidSpec(f"Dataset format {fmt!r} reads files: give the path of the dataset folder.")
    path = Path(path)
    if not path.exists():
        raise InvalidSpec(f"Dataset folder {str(path)!r} does not exist.")
    if not path.is_dir():
        raise InvalidSpec(f"Dataset path {str(path)!r} is not a folder.")
    return path


def rel(path: Path, root: Path) -> str:
    return nfc(path.relative_to(root).as_posix())


def walk_files(folder: Path) -> list[Path]:
    """Every file under `folder` (following symlinked folders once), in no particular order."""
    out: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop
            dirnames[:] = []
            continue
        seen.add(real)
        out.extend(Path(dirpath) / f for f in filenames)
    return out


def subdirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not is_hidden(p.name)), key=lambda p: nfc(p.name))


def split_folders(root: Path, inner: str | None = None) -> dict[str, Path]:
    """Predefined split folders under root ({"train": root/train, ...}); `inner` requires root/<split>/<inner>."""
    found: dict[str, Path] = {}
    names = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    for split, aliases in SPLIT_FOLDER_NAMES.items():
        hits = [names[a] for a in aliases if a in names and (inner is None or (names[a] / inner).is_dir())]
        if len(hits) > 1:
            raise InvalidSpec(
                f"Dataset folder {str(root)!r} has several {split} folders ({', '.join(h.name for h in hits)}); "
                "keep one."
            )
        if hits:
            found[split] = hits[0]
    if found and "train" not in found:
        raise InvalidSpec(
            f"Dataset folder {str(root)!r} has {' and '.join(found)} folder(s) but no train folder; "
            "add train/ (val/ and test/ are optional) or use no split folders at all."
        )
    return found


# ---- decoding ------------------------------------------------------------------------------------------


def open_image_file(source: bytes | Path):
    from PIL import Image

    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise Unreadable("empty file (0 bytes)")
        return Image.open(io.BytesIO(source))
    if source.stat().st_size == 0:
        raise Unreadable("empty file (0 bytes)")
    return Image.open(source)


def describe_error(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise Unreadable(f"cannot read the file: {describe_error(exc)}") from exc


def probe_image(source: bytes | Path) -> tuple[tuple[int, int], str]:
    """(height, width) after EXIF orientation and the mode, from the header only (no pixel decoding)."""
    try:
        with open_image_file(source) as img:
            width, height = img.size
            mode = img.mode
            try:
                orientation = img.getexif().get(0x0112, 1)
            except Exception:  # a broken EXIF block: decode_image ignores it too
                orientation = 1
    except Unreadable:
        raise
    except Exception as exc:  # Pillow raises many types for bad files
        raise Unreadable(describe_error(exc)) from exc
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return (height, width), mode


def decode_image(source: bytes | Path):
    """Decode a whole image into an 8-bit L / LA / RGB / RGBA Pillow image; returns (image, original mode).

    Raises Unreadable with the reason for anything that fails (truncated data, not an image, ...).
    """
    from PIL import Image, ImageOps

    try:
        img = open_image_file(source)
        try:
            img.seek(0)
        except EOFError:
            pass
        img.load()
    except Unreadable:
        raise
    except Exception as exc:
        raise Unreadable(describe_error(exc)) from exc
    mode = img.mode
    try:
        try:
            img = ImageOps.exif_transpose(img) or img
        except Exception:
            pass  # an unusable EXIF block: keep the stored orientation
        img = _normalise_mode(img, Image)
    except Unreadable:
        raise
    except Exception as exc:
        raise Unreadable(f"cannot convert a {mode} image: {describe_error(exc)}") from exc
    return img, mode


def _normalise_mode(img, Image):
    mode = img.mode
    if mode in ("L", "RGB"):
        return img.convert(mode + "A") if "transparency" in img.info else img
    if mode in ("LA", "RGBA"):
        return img
    if mode == "La":
        return img.convert("LA")
    if mode == "RGBa":
        return img.convert("RGBA")
    if mode == "1":
        return img.convert("L")
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img).astype(np.int64)
        if mode == "I" and a.size and a.max() <= 255:  # 32-bit integers holding 8-bit values
            a8 = np.clip(a, 0, 255)
        else:  # 16-bit range
            a8 = (np.clip(a, 0, 65535) * 255 + 32767) // 65535
        return Image.fromarray(a8.astype(np.uint8), "L")
    if mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float64))
        if a.size and a.max() <= 1.0:
            a = a * 255
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    if mode in ("P", "PA"):
        return img.convert("RGBA") if mode == "PA" or "transparency" in img.info else img.convert("RGB")
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX, ...


def finish_image(img, channels: int, size: tuple[int, int]) -> np.ndarray:
    """A normalised image → uint8 (C, H, W): alpha composited on white, `channels` channels, resized."""
    from PIL import Image

    if img.mode in ("LA", "RGBA"):
        a = np.asarray(img).astype(np.uint32)
        color, alpha = a[..., :-1], a[..., -1:]
        out = (color * alpha + 255 * (255 - alpha) + 127) // 255
        out = out[..., 0] if img.mode == "LA" else out
        img = Image.fromarray(out.astype(np.uint8), "L" if img.mode == "LA" else "RGB")
    if channels == 1 and img.mode != "L":
        img = img.convert("L")
    height, width = size
    if img.size != (width, height):
        img = img.resize((width, height), Image.BILINEAR)  # antialiased when shrinking
    if channels == 3 and img.mode != "RGB":
        img = img.convert("RGB")
    a = np.asarray(img)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of (..., H, W) class indices: pixel centres map to pixel centres, values are
    copied exactly (never interpolated)."""
    height, width = size
    h0, w0 = mask.shape[-2:]
    if (h0, w0) == (height, width):
        return mask
    rows = np.minimum(((np.arange(height) + 0.5) * h0 / height).astype(np.int64), h0 - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w0 / width).astype(np.int64), w0 - 1)
    return mask[..., rows[:, None], cols[None, :]]


# ---- size, channels ------------------------------------------------------------------------------------


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def canonical_size(
    sizes: Sequence[tuple[int, int]], *, max_side: int = MAX_SIDE, multiple: int = 1
) -> tuple[tuple[int, int], str]:
    """The (height, width) every image is loaded at, and a sentence saying how it was chosen.

    The most common size if at least half the images share it, else the median height and width; then the
    longer side is clipped to `max_side` keeping the aspect ratio; then (segmentation) both sides are
    rounded down to a multiple of `multiple`, at least `multiple`.
    """
    if not sizes:
        raise InvalidSpec("No readable images to choose an image size from.")
    counts = Counter(sizes)
    (h, w), n = max(counts.items(), key=lambda kv: (kv[1], kv[0][0] * kv[0][1], kv[0]))
    if 2 * n >= len(sizes):
        rule = f"most common size {w}x{h} ({n} of {len(sizes)} images)"
    else:
        h = round_half_up(float(np.median([s[0] for s in sizes])))
        w = round_half_up(float(np.median([s[1] for s in sizes])))
        rule = f"median height and width {w}x{h} (no size shared by half of the {len(sizes)} images)"
    if max(h, w) > max_side:
        scale = max_side / max(h, w)
        h, w = max(1, round_half_up(h * scale)), max(1, round_half_up(w * scale))
        rule += f", clipped to {w}x{h} (longer side at most {max_side})"
    if multiple > 1:
        h2, w2 = max(multiple, h // multiple * multiple), max(multiple, w // multiple * multiple)
        if (h2, w2) != (h, w):
            rule += f", rounded down to multiples of {multiple}: {w2}x{h2}"
        h, w = h2, w2
    return (h, w), rule


def channels_for(modes: Iterable[str]) -> int:
    return 1 if all(m in GRAYSCALE_MODES for m in modes) else 3


def size_report(sizes: Iterable[tuple[int, int]]) -> dict[str, int]:
    """{"WxH": count} for the most common sizes, the rest summed under "other"."""
    counts = Counter(sizes)
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    out = {f"{w}x{h}": n for (h, w), n in ordered[:MAX_SIZES_LISTED]}
    rest = sum(n for _, n in ordered[MAX_SIZES_LISTED:])
    if rest:
        out["other"] = rest
    return out


def check_image_size(image_size: Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    try:
        h, w = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise InvalidSpec(f"image_size must be (height, width), got {image_size!r}.") from None
    if h < 1 or w < 1:
        raise InvalidSpec(f"image_size must be positive, got {image_size!r}.")
    return h, w


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


def unreadable_entry(file: str, error: str) -> dict[str, str]:
    return {"file": file, "error": error}


def listed(entries: list[dict[str, str]]) -> list[dict[str, str]]:
    return sorted(entries, key=lambda e: e["file"])[:MAX_LISTED]
