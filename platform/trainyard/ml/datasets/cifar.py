"""`cifar10` and `cifar100`: the published BINARY versions (never the pickled "python version").

CIFAR-10: cifar-10-batches-bin/data_batch_{1..5}.bin, test_batch.bin, batches.meta.txt; records are 1 label
byte + 3072 pixel bytes. CIFAR-100: cifar-100-binary/train.bin, test.bin, fine_label_names.txt; records are
1 coarse-label byte + 1 fine-label byte + 3072 pixel bytes (the fine label is used). Pixels are 1024 red,
1024 green, 1024 blue bytes, each 32×32 row-major. The files may be in the given folder or in the named
subfolder. Val is the last 10 % of train.

Unpickling a file can run arbitrary code, so the python version is refused, not read.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainyard.errors import InvalidSpec
from trainyard.ml.datasets import DatasetFormat, DatasetScan, ImageSplits, register_format, resize_images
from trainyard.ml.datasets import _files as F
from trainyard.ml.datasets import _splits as S

PIXELS = 3 * 32 * 32
CHUNK_RECORDS = 4096


@dataclass(frozen=True)
class _Spec:
    name: str
    subdir: str
    python_subdir: str
    train: tuple[str, ...]
    test: str
    names_file: str
    num_classes: int
    label_bytes: int  # bytes before the pixels; the label used is the last of them
    archive: str
    python_markers: tuple[str, ...]  # files of the pickled version


SPECS = {
    "cifar10": _Spec("cifar10", "cifar-10-batches-bin", "cifar-10-batches-py",
                     tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test_batch.bin", "batches.meta.txt",
                     10, 1, "cifar-10-binary.tar.gz", ("data_batch_1", "test_batch", "batches.meta")),
    "cifar100": _Spec("cifar100", "cifar-100-binary", "cifar-100-python", ("train.bin",), "test.bin",
                      "fine_label_names.txt", 100, 2, "cifar-100-binary.tar.gz", ("train", "test", "meta")),
}


def _locate(spec: _Spec, path: Path | None) -> Path:
    root = F.require_dir(path, spec.name)
    for place in (root, root / spec.subdir):
        if place.is_dir() and any((place / n).is_file() for n in (*spec.train, spec.test)):
            missing = [n for n in (*spec.train, spec.test, spec.names_file) if not (place / n).is_file()]
            if missing:
                raise InvalidSpec(f"The {spec.name} folder {str(place)!r} lacks {', '.join(missing)}.")
            return place
    for place in (root, root / spec.python_subdir):
        if place.is_dir() and any((place / n).is_file() for n in spec.python_markers):
            raise InvalidSpec(
                f"{str(place)!r} holds the pickled 'python version' of {spec.name}, which is not read: "
                f"unpickling a file can run arbitrary code. Use the binary version ({spec.archive}, "
                f"folder {spec.subdir}/) instead."
            )
    raise InvalidSpec(
        f"No {spec.name} binary files in {str(root)!r} or its {spec.subdir}/ folder: expected "
        f"{', '.join((*spec.train, spec.test, spec.names_file))} (the binary version, {spec.archive})."
    )


def _class_names(spec: _Spec, place: Path) -> list[str]:
    try:
        text = (place / spec.names_file).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidSpec(f"Cannot read {spec.names_file}: {exc}") from exc
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != spec.num_classes:
        raise InvalidSpec(f"{spec.names_file} names {len(names)} classes; {spec.name} has {spec.num_classes}.")
    return names


def _records_in(spec: _Spec, file: Path) -> int:
    record = spec.label_bytes + PIXELS
    try:
        size = file.stat().st_size
    except OSError as exc:
        raise InvalidSpec(f"Cannot read {file.name}: {exc}") from exc
    if size == 0 or size % record:
        raise InvalidSpec(
            f"{file.name} is {size} bytes, not a whole number of {record}-byte {spec.name} records: "
            "truncated or not the binary version."
        )
    return size // record


def _read_records(spec: _Spec, file: Path, labels: np.ndarray, images: np.ndarray | None) -> bytes:
    """Fill labels (and images (N, 3, 32, 32) unless None) from the file in chunks; the file's sha256 digest."""
    record = spec.label_bytes + PIXELS
    n = len(labels)
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for start in range(0, n, CHUNK_RECORDS):
            count = min(CHUNK_RECORDS, n - start)
            block = f.read(count * record)
            if len(block) != count * record:
                raise InvalidSpec(f"{file.name} changed while being read.")
            digest.update(block)
            rows = np.frombuffer(block, dtype=np.uint8).reshape(count, record)
            labels[start: start + count] = rows[:, spec.label_bytes - 1]
            if images is not None:
                images[start: start + count] = rows[:, spec.label_bytes:].reshape(count, 3, 32, 32)
        if f.read(1):
            raise InvalidSpec(f"{file.name} changed while being read.")
    if n and labels.max() >= spec.num_classes:
        raise InvalidSpec(f"{file.name} has label {int(labels.max())}; {spec.name} labels are "
                          f"0..{spec.num_classes - 1}. Is it the right file?")
    return digest.digest()


def _read(spec: _Spec, path: Path | None, *, keep: bool):
    """(folder, classes, labels of train then test, images likewise or None, train count, fingerprint)."""
    place = _locate(spec, path)
    classes = _class_names(spec, place)
    fingerprint = S.Fingerprint()
    fingerprint.add_bytes(spec.names_file, (place / spec.names_file).read_bytes())
    files = [*spec.train, spec.test]
    sizes = [_records_in(spec, place / name) for name in files]
    total = sum(sizes)
    labels = np.empty(total, dtype=np.int64)
    images = np.empty((total, 3, 32, 32), dtype=np.uint8) if keep else None
    start = 0
    for name, n in zip(files, sizes):
        digest = _read_records(spec, place / name, labels[start: start + n],
                               None if images is None else images[start: start + n])
        fingerprint.add_digest(name, digest)
        start += n
    return place, classes, labels, images, total - sizes[-1], fingerprint.hexdigest()


def _scan(spec: _Spec, path: Path | None) -> DatasetScan:
    place, classes, labels, _, n_train, fingerprint = _read(spec, path, keep=False)
    n_test = len(labels) - n_train
    n_val = S.tail_split(n_train)
    counts = np.bincount(labels, minlength=spec.num_classes)
    root = Path(path)  # type: ignore[arg-type]
    return DatasetScan(
        task="classification",
        num_samples=n_train + n_test,
        classes=classes,
        splits={"train": n_train - n_val, "val": n_val, "test": n_test},
        image_shape=[3, 32, 32],
        fingerprint=fingerprint,
        report={
            "class_counts": {c: int(n) for c, n in zip(classes, counts)},
            "image_sizes": {"32x32": n_train + n_test},
            "modes": {"RGB": n_train + n_test},
            "unreadable": [],
            "ignored_files": 0,
            "split_source": f"files: {spec.test} = test, last 10 % of train = val",
            "folder": place.relative_to(root).as_posix(),
        },
    )


def _load(spec: _Spec, path: Path | None, image_size: tuple[int, int] | None = None) -> ImageSplits:
    fixed = F.check_image_size(image_size)
    _, classes, labels, images, n_train, _ = _read(spec, path, keep=True)
    n_val = S.tail_split(n_train)
    x = torch.from_numpy(images)
    if fixed is not None and fixed != (32, 32):
        x = resize_images(x, fixed)
    counts = {"train": n_train - n_val, "val": n_val, "test": len(x) - n_train}
    return S.build_splits("classification", x, labels, counts, classes)


for _spec in SPECS.values():
    register_format(DatasetFormat(
        name=_spec.name, task="classification",
        scan=lambda path, _s=_spec: _scan(_s, path),
        load=lambda path, image_size=None, _s=_spec: _load(_s, path, image_size),
        description=f"{'CIFAR-10' if _spec.num_classes == 10 else 'CIFAR-100'}: the binary version "
                    f"({_spec.archive})",
    ))
