"""`mnist` and `fashion-mnist`: the published IDX files, plain or gzipped, in the folder or its raw/ subfolder.

The four files are train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and
t10k-labels-idx1-ubyte (each possibly ending in .gz). The test split is t10k; val is the last 10 % of train.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path

import numpy as np
import torch

from trainyard.errors import InvalidSpec
from trainyard.ml.datasets import DatasetFormat, DatasetScan, ImageSplits, register_format, resize_images
from trainyard.ml.datasets import _files as F
from trainyard.ml.datasets import _splits as S

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DIGIT_CLASSES = [str(i) for i in range(10)]
FILES = {  # role: (published name, number of dimensions)
    "train_images": ("train-images-idx3-ubyte", 3),
    "train_labels": ("train-labels-idx1-ubyte", 1),
    "test_images": ("t10k-images-idx3-ubyte", 3),
    "test_labels": ("t10k-labels-idx1-ubyte", 1),
}
UBYTE = 0x08
CHUNK = 1 << 20


def _variants(name: str) -> list[str]:
    dotted = name.replace("-idx", ".idx")  # some mirrors spell them train-images.idx3-ubyte
    return [name, name + ".gz", dotted, dotted + ".gz"]


def _locate(path: Path | None, fmt: str) -> dict[str, Path]:
    root = F.require_dir(path, fmt)
    subdir = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[fmt]
    places = [root, root / "raw", root / subdir / "raw", root / subdir]
    for place in places:
        if not (place.is_dir() and any((place / v).is_file() for v in _variants(FILES["train_images"][0]))):
            continue
        found: dict[str, Path] = {}
        missing = []
        for role, (name, _) in FILES.items():
            hit = next((place / v for v in _variants(name) if (place / v).is_file()), None)
            if hit is None:
                missing.append(name)
            else:
                found[role] = hit
        if missing:
            raise InvalidSpec(f"The {fmt} folder {str(place)!r} lacks {', '.join(missing)} (or .gz).")
        return found
    raise InvalidSpec(
        f"No {fmt} IDX files in {str(root)!r} (looked in it, raw/ and {subdir}/raw/): expected "
        + ", ".join(n for n, _ in FILES.values()) + ", each optionally gzipped (.gz)."
    )


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _header(f, path: Path, ndim: int) -> tuple[int, ...]:
    head = f.read(4)
    if len(head) < 4:
        raise InvalidSpec(f"IDX file {path.name} is truncated: no header.")
    if head[0] != 0 or head[1] != 0 or head[2] != UBYTE or head[3] != ndim:
        raise InvalidSpec(
            f"{path.name} is not an IDX file of unsigned bytes with {ndim} dimension(s): magic number "
            f"0x{head.hex()}, expected 0x0000{UBYTE:02x}{ndim:02x}."
        )
    raw = f.read(4 * ndim)
    if len(raw) < 4 * ndim:
        raise InvalidSpec(f"IDX file {path.name} is truncated in its header.")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4"))
    if any(d == 0 for d in dims):
        raise InvalidSpec(f"IDX file {path.name} has an empty dimension: {dims}.")
    return dims


def _read_idx(path: Path, ndim: int, *, keep: bool) -> tuple[tuple[int, ...], bytes, np.ndarray | None]:
    """(dims, sha256 digest of the decompressed content, the array if keep). Streams when not keeping."""
    digest = hashlib.sha256()
    try:
        with _open(path) as f:
            dims = _header(f, path, ndim)
            digest.update(b"\x00\x00" + bytes([UBYTE, ndim]) + np.asarray(dims, dtype=">u4").tobytes())
            expected = int(np.prod(dims))
            if keep:
                data = f.read(expected)
                got = len(data)
                digest.update(data)
            else:
                got, data = 0, b""
                while got < expected:
                    block = f.read(min(CHUNK, expected - got))
                    if not block:
                        break
                    digest.update(block)
                    got += len(block)
            if got < expected:
                raise InvalidSpec(
                    f"IDX file {path.name} is truncated: {got} of {expected} data bytes for shape {dims}.")
            extra = len(f.read(CHUNK))
            if extra:
                raise InvalidSpec(f"IDX file {path.name} has data beyond its shape {dims}: wrong or corrupt file.")
    except InvalidSpec:
        raise
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise InvalidSpec(f"Cannot read IDX file {path.name}: {exc} (truncated or corrupt).") from exc
    array = np.frombuffer(data, dtype=np.uint8).reshape(dims) if keep else None
    return dims, digest.digest(), array


def _read_all(path: Path | None, fmt: str, *, keep_images: bool):
    files = _locate(path, fmt)
    out = {}
    for role, (name, ndim) in FILES.items():
        keep = keep_images or ndim == 1
        out[role] = _read_idx(files[role], ndim, keep=keep)
    tr_dims, te_dims = out["train_images"][0], out["test_images"][0]
    if tr_dims[1:] != te_dims[1:]:
        raise InvalidSpec(f"{fmt}: train images are {tr_dims[2]}x{tr_dims[1]} but test images "
                          f"{te_dims[2]}x{te_dims[1]}.")
    for part in ("train", "test"):
        n_img, n_lab = out[f"{part}_images"][0][0], out[f"{part}_labels"][0][0]
        if n_img != n_lab:
            raise InvalidSpec(f"{fmt}: {files[part + '_images'].name} holds {n_img} images but "
                              f"{files[part + '_labels'].name} {n_lab} labels.")
        labels = out[f"{part}_labels"][2]
        if labels.size and int(labels.max()) > 9:
            raise InvalidSpec(f"{fmt}: {files[part + '_labels'].name} has label {int(labels.max())}; "
                              "labels must be 0..9.")
    return files, out


def _classes(fmt: str) -> list[str]:
    return list(FASHION_CLASSES if fmt == "fashion-mnist" else DIGIT_CLASSES)


def _scan(fmt: str, path: Path | None) -> DatasetScan:
    files, out = _read_all(path, fmt, keep_images=False)
    fingerprint = S.Fingerprint()
    for role, (name, _) in FILES.items():
        fingerprint.add_digest(name, out[role][1])  # content, whether stored gzipped or not
    n_train = out["train_images"][0][0]
    n_test = out["test_images"][0][0]
    _, rows, cols = out["train_images"][0]
    n_val = S.tail_split(n_train)
    labels = np.concatenate([out["train_labels"][2], out["test_labels"][2]])
    counts = np.bincount(labels, minlength=10)
    classes = _classes(fmt)
    root = Path(path)  # type: ignore[arg-type]
    return DatasetScan(
        task="classification",
        num_samples=n_train + n_test,
        classes=classes,
        splits={"train": n_train - n_val, "val": n_val, "test": n_test},
        image_shape=[1, rows, cols],
        fingerprint=fingerprint.hexdigest(),
        report={
            "class_counts": {c: int(n) for c, n in zip(classes, counts)},
            "image_sizes": {f"{cols}x{rows}": n_train + n_test},
            "modes": {"L": n_train + n_test},
            "unreadable": [],
            "ignored_files": 0,
            "split_source": "files: t10k = test, last 10 % of train = val",
            "files": {role: files[role].relative_to(root).as_posix() for role in FILES},
        },
    )


def _load(fmt: str, path: Path | None, image_size: tuple[int, int] | None = None) -> ImageSplits:
    fixed = F.check_image_size(image_size)
    _, out = _read_all(path, fmt, keep_images=True)
    images = np.concatenate([out["train_images"][2], out["test_images"][2]])[:, None]
    labels = np.concatenate([out["train_labels"][2], out["test_labels"][2]]).astype(np.int64)
    n_train = out["train_images"][0][0]
    n_val = S.tail_split(n_train)
    x = torch.from_numpy(images)
    if fixed is not None and fixed != tuple(x.shape[2:]):
        x = resize_images(x, fixed)
    counts = {"train": n_train - n_val, "val": n_val, "test": len(images) - n_train}
    return S.build_splits("classification", x, labels, counts, _classes(fmt))


for _fmt, _what in (("mnist", "MNIST handwritten digits"), ("fashion-mnist", "Fashion-MNIST clothing")):
    register_format(DatasetFormat(
        name=_fmt, task="classification",
        scan=lambda path, _f=_fmt: _scan(_f, path),
        load=lambda path, image_size=None, _f=_fmt: _load(_f, path, image_size),
        description=f"{_what}: the published IDX files (optionally .gz, optionally in raw/)",
    ))
