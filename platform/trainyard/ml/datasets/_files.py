"""Shared helpers for the dataset formats: walking folders, decoding images, choosing the canonical size
(splits, fingerprints and whole-dataset decoding are in `_splits`).

Decoding rules (every folder format uses them, so a file reads the same everywhere):

* Pillow decodes the file completely (a truncated file fails here, it is never padded with grey), takes the
  first frame of animations and applies the EXIF orientation.
* The mode is normalised to 8 bits: 16-bit grayscale (I;16, I) is scaled 0..65535 → 0..255, palette images
  expand to RGB (RGBA when they carry transparency), CMYK / YCbCr / LAB / HSV convert to RGB.
* Alpha is composited on white, then the image becomes 1 channel (when every image of the dataset is
  grayscale) or 3 (RGB), and is resized with antialiased bilinear interpolation to the canonical size.
"""

from __future__ import annotations

import io
import math
import os
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from trainyard.errors import InvalidSpec

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


def decode_image(source: bytes | Path, max_pixels: int | None = None):
    """Decode a whole image into an 8-bit L / LA / RGB / RGBA Pillow image; returns (image, original mode).

    With `max_pixels`, an image with more pixels is refused from its header, before anything is decoded.
    Raises Unreadable with the reason for anything that fails (truncated data, not an image, ...).
    """
    from PIL import Image, ImageOps

    try:
        img = open_image_file(source)
        if max_pixels is not None and img.width * img.height > max_pixels:
            raise Unreadable(f"{img.width}×{img.height} pixels is more than the {max_pixels:,} allowed")
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


# ---- report entries --------------------------------------------------------------------------------------


def unreadable_entry(file: str, error: str) -> dict[str, str]:
    return {"file": file, "error": error}


def listed(entries: list[dict[str, str]]) -> list[dict[str, str]]:
    return sorted(entries, key=lambda e: e["file"])[:MAX_LISTED]
