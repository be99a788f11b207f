"""`imagefolder`: one folder per class, `root/<class>/<image>`, or with split folders `root/train/<class>/...`.

Class names are the folder names (Unicode NFC, sorted). Images nested deeper inside a class folder belong to
that class. Unreadable image files are reported and left out; non-image files are ignored and counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainyard.errors import InvalidSpec
from trainyard.ml.datasets import DatasetFormat, DatasetScan, ImageSplits, register_format
from trainyard.ml.datasets import _files as F
from trainyard.ml.datasets import _splits as S


@dataclass(frozen=True)
class _Candidate:
    path: Path
    rel: str  # relative to the dataset root, posix, NFC
    class_name: str
    split: str | None  # the split folder it is in, if any


@dataclass
class _Listing:
    candidates: list[_Candidate]
    ignored_files: int
    unassigned: list[str]  # image files outside any class folder
    folders: dict[str, Path]  # split folders present


def _discover(path: Path | None) -> _Listing:
    root = F.require_dir(path, "imagefolder")
    folders = F.split_folders(root)
    bases: list[tuple[str | None, Path]] = [(s, p) for s, p in folders.items()] if folders else [(None, root)]
    candidates: list[_Candidate] = []
    ignored = 0
    unassigned: list[str] = []
    for split, base in bases:
        class_dirs = F.subdirs(base)
        for class_dir in class_dirs:
            name = F.nfc(class_dir.name)
            for file in F.walk_files(class_dir):
                parts = file.relative_to(class_dir).parts
                if any(F.is_hidden(p) for p in parts) or not F.is_image_name(file.name):
                    ignored += 1
                    continue
                candidates.append(_Candidate(file, F.rel(file, root), name, split))
    # Everything else under the root: loose files beside the class folders, hidden folders, other folders
    # beside the split folders. Image files there have no class: listed; the rest is counted as ignored.
    for file in F.walk_files(root):
        rel_parts = file.relative_to(root).parts
        if _inside_class_folder(root, rel_parts, bases):
            continue
        if F.is_image_name(file.name) and not any(F.is_hidden(p) for p in rel_parts):
            unassigned.append(F.rel(file, root))
        ignored += 1
    candidates.sort(key=lambda c: c.rel)
    return _Listing(candidates, ignored, sorted(unassigned), folders)


def _inside_class_folder(root: Path, rel_parts: tuple[str, ...], bases) -> bool:
    """Whether a file (parts relative to root) lies in a non-hidden class folder of one of the bases."""
    for _, base in bases:
        base_parts = base.relative_to(root).parts
        n = len(base_parts)
        if tuple(rel_parts[:n]) == base_parts and len(rel_parts) >= n + 2 and not F.is_hidden(rel_parts[n]):
            return True
    return False


@dataclass
class _Plan:
    classes: list[str]
    labels: list[int]  # per readable sample
    parts: dict[str, np.ndarray]  # sample indices per split
    split_source: str
    size: tuple[int, int]
    channels: int
    size_rule: str


def _plan(listing: _Listing, readable: list[int], sizes: list[tuple[int, int]], modes: list[str],
          unreadable_count: int, image_size: tuple[int, int] | None = None) -> _Plan:
    cands = [listing.candidates[i] for i in readable]
    if not cands:
        raise InvalidSpec(
            "The imagefolder dataset has no readable images"
            + (f" ({unreadable_count} image file(s) could not be read)" if unreadable_count else "")
            + (f" ({len(listing.unassigned)} image(s) lie outside any class folder)" if listing.unassigned else "")
            + ": put images in one folder per class, root/<class>/<image>."
        )
    classes = sorted({c.class_name for c in cands})
    if len(classes) < 2:
        raise InvalidSpec(
            f"The imagefolder dataset has readable images in {len(classes)} class folder ({classes[0]!r}); "
            "classification needs at least 2 classes, one folder each: root/<class>/<image>."
        )
    index = {name: i for i, name in enumerate(classes)}
    labels = [index[c.class_name] for c in cands]
    parts, source = S.assign_splits(labels, [c.split for c in cands], classes, listing.folders)
    if len(parts["train"]) == 0:
        raise InvalidSpec("The imagefolder dataset's train split has no readable images.")
    size, rule = F.canonical_size(sizes)
    if image_size is not None:
        size = image_size
    return _Plan(classes, labels, parts, source, size, F.channels_for(modes), rule)


def _scan(path: Path | None) -> DatasetScan:
    listing = _discover(path)
    fingerprint = S.Fingerprint()
    readable: list[int] = []
    sizes: list[tuple[int, int]] = []
    modes: list[str] = []
    formats: Counter[str] = Counter()
    unreadable: list[dict[str, str]] = []
    for i, cand in enumerate(listing.candidates):
        try:
            data = F.read_file(cand.path)
            fingerprint.add_bytes(cand.rel, data)
            img, mode = F.decode_image(data)
        except F.Unreadable as exc:
            unreadable.append(F.unreadable_entry(cand.rel, str(exc)))
            continue
        readable.append(i)
        sizes.append((img.height, img.width))
        modes.append(mode)
        formats[cand.path.suffix.lower().lstrip(".")] += 1
        del img, data  # one decoded image at a time
    plan = _plan(listing, readable, sizes, modes, len(unreadable))
    label_counts = Counter(plan.labels)
    split_counts = {s: int(len(plan.parts[s])) for s in F.SPLITS}
    h, w = plan.size
    per_split = {
        s: {plan.classes[k]: int(v) for k, v in sorted(Counter(plan.labels[j] for j in plan.parts[s]).items())}
        for s in F.SPLITS
    }
    return DatasetScan(
        task="classification",
        num_samples=len(readable),
        classes=plan.classes,
        splits=split_counts,
        image_shape=[plan.channels, h, w],
        fingerprint=fingerprint.hexdigest(),
        report={
            "class_counts": {name: int(label_counts[k]) for k, name in enumerate(plan.classes)},
            "split_class_counts": per_split,
            "image_sizes": F.size_report(sizes),
            "modes": dict(sorted(Counter(modes).items())),
            "file_types": dict(sorted(formats.items())),
            "unreadable": F.listed(unreadable),
            "unreadable_count": len(unreadable),
            "ignored_files": listing.ignored_files,
            "unassigned_images": listing.unassigned[: F.MAX_LISTED],  # images outside class folders (ignored)
            "split_source": plan.split_source,
            "size_rule": plan.size_rule,
            "channels_rule": "1 (every image is grayscale)" if plan.channels == 1 else "3 (RGB; alpha on white)",
        },
    )


def _load(path: Path | None, image_size: tuple[int, int] | None = None) -> ImageSplits:
    fixed = F.check_image_size(image_size)
    listing = _discover(path)

    def probe(c: _Candidate):
        return F.probe_image(c.path)

    def decode(c: _Candidate, size: tuple[int, int], channels: int):
        img, mode = F.decode_image(F.read_file(c.path))
        native = ((img.height, img.width), mode)
        return (F.finish_image(img, channels, size),), native

    def choose(infos):
        return F.canonical_size([i[0] for i in infos])[0], F.channels_for(i[1] for i in infos)

    decoded = S.decode_all(listing.candidates, probe, decode, choose, fixed)
    plan = _plan(listing, decoded.ok, [n[0] for n in decoded.natives], [n[1] for n in decoded.natives],
                 len(listing.candidates) - len(decoded.ok), fixed)
    assert (plan.size, plan.channels) == (decoded.size, decoded.channels)
    order, counts = S.split_order(plan.parts)
    images = decoded.arrays[0]
    S.permute_rows(images, order)
    labels = np.asarray(plan.labels, dtype=np.int64)[order]
    return S.build_splits("classification", images, labels, counts, plan.classes)


register_format(DatasetFormat(
    name="imagefolder", task="classification", scan=_scan, load=_load,
    description="Folder of class folders, root/<class>/<image> (optionally under train/, val/, test/)",
))
