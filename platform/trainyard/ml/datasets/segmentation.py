"""`segmentation`: `root/images/<stem>.<ext>` with `root/masks/<stem>.png` (pixel value = class index).

Optional `root/classes.txt` names the classes, one per line (line i = class i); without it the classes are
"0".."K" with K the largest mask value seen. Optional split folders `root/train/images`, `root/val/...`,
`root/test/...`. Pairs that cannot be used (no mask, no image, unreadable file, mask not single-channel, mask
size different from its image, mask value beyond classes.txt) are reported and left out.
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

SIZE_MULTIPLE = 16  # segmentation networks halve the size four times
MASK_EXTENSIONS = frozenset({".png", ".bmp", ".gif", ".tif", ".tiff"})  # lossless only
LOSSY_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".webp"})
MASK_MODES = frozenset({"L", "P", "1", "I;16", "I;16L", "I;16B", "I;16N", "I"})


@dataclass(frozen=True)
class _Pair:
    image: Path
    mask: Path
    image_rel: str
    mask_rel: str
    split: str | None


@dataclass
class _Listing:
    pairs: list[_Pair]
    problems: list[dict[str, str]]  # unmatched or ambiguous files
    ignored_files: int
    folders: dict[str, Path]
    classes_txt: Path | None
    classes: list[str] | None


def _read_classes(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidSpec(f"Cannot read {path.name}: {exc}") from exc
    names = [F.nfc(line.strip()) for line in lines]
    while names and not names[-1]:
        names.pop()
    names = [name or str(i) for i, name in enumerate(names)]
    if len(names) < 2:
        raise InvalidSpec(f"{path.name} names {len(names)} class(es); segmentation needs at least 2 "
                          "(line i = class i, class 0 usually 'background').")
    if len(set(names)) != len(names):
        dupes = sorted(n for n, c in Counter(names).items() if c > 1)
        raise InvalidSpec(f"{path.name} names a class more than once: {', '.join(dupes)}.")
    return names


def _files_by_stem(folder: Path, root: Path, allowed: frozenset[str] | None, problems, what: str):
    """{stem: file} for the image files under folder; returns (mapping, ignored count)."""
    by_stem: dict[str, list[Path]] = {}
    ignored = 0
    for file in F.walk_files(folder):
        parts = file.relative_to(folder).parts
        if any(F.is_hidden(p) for p in parts) or not F.is_image_name(file.name):
            ignored += 1
            continue
        suffix = file.suffix.lower()
        if allowed is not None and suffix not in allowed:
            reason = "lossy JPEG/WebP mask: class indices must be stored losslessly (PNG)" \
                if suffix in LOSSY_EXTENSIONS else f"masks must be PNG, not {suffix}"
            problems.append(F.unreadable_entry(F.rel(file, root), reason))
            continue
        stem = F.nfc(file.relative_to(folder).with_suffix("").as_posix())
        by_stem.setdefault(stem, []).append(file)
    out: dict[str, Path] = {}
    for stem, files in by_stem.items():
        if len(files) > 1:
            names = ", ".join(sorted(F.rel(f, root) for f in files))
            for f in files:
                problems.append(F.unreadable_entry(F.rel(f, root), f"several {what}s share the stem {stem!r}: {names}"))
        else:
            out[stem] = files[0]
    return out, ignored


def _discover(path: Path | None) -> _Listing:
    root = F.require_dir(path, "segmentation")
    folders = F.split_folders(root, inner="images")
    bases: list[tuple[str | None, Path]] = list(folders.items()) if folders else [(None, root)]
    pairs: list[_Pair] = []
    problems: list[dict[str, str]] = []
    ignored = 0
    for split, base in bases:
        images_dir, masks_dir = base / "images", base / "masks"
        if not images_dir.is_dir():
            raise InvalidSpec(f"Segmentation dataset {str(root)!r} needs an images/ folder"
                              f"{' in ' + base.name + '/' if split else ''} (and masks/ beside it).")
        if not masks_dir.is_dir():
            raise InvalidSpec(f"Segmentation dataset {str(root)!r} has {F.rel(images_dir, root)}/ but no "
                              f"{F.rel(masks_dir, root)}/ folder beside it.")
        images, n1 = _files_by_stem(images_dir, root, None, problems, "image")
        masks, n2 = _files_by_stem(masks_dir, root, MASK_EXTENSIONS, problems, "mask")
        ignored += n1 + n2
        for stem in sorted(images.keys() | masks.keys()):
            image, mask = images.get(stem), masks.get(stem)
            if image is None:
                problems.append(F.unreadable_entry(
                    F.rel(mask, root), f"mask without an image: no {F.rel(images_dir, root)}/{stem}.<ext>"))
            elif mask is None:
                problems.append(F.unreadable_entry(
                    F.rel(image, root), f"image without a mask: no {F.rel(masks_dir, root)}/{stem}.png"))
            else:
                pairs.append(_Pair(image, mask, F.rel(image, root), F.rel(mask, root), split))
    classes_txt = root / "classes.txt"
    classes = _read_classes(classes_txt) if classes_txt.is_file() else None
    pairs.sort(key=lambda p: p.image_rel)
    return _Listing(pairs, problems, ignored, folders, classes_txt if classes is not None else None, classes)


def _decode_mask(source: bytes | Path) -> tuple[np.ndarray, str]:
    from PIL import ImageOps

    try:
        img = F.open_image_file(source)
        img.load()
    except F.Unreadable:
        raise
    except Exception as exc:
        raise F.Unreadable(F.describe_error(exc)) from exc
    mode = img.mode
    if mode not in MASK_MODES:
        raise F.Unreadable(f"mask must be single-channel (L or P) with class indices as pixel values, got {mode}")
    try:
        img = ImageOps.exif_transpose(img) or img
    except Exception:
        pass
    a = np.asarray(img)
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if a.dtype.kind == "i" and a.size and a.min() < 0:
        raise F.Unreadable("mask has negative values")
    return a.astype(np.int64), mode


def _check_pair(pair: _Pair, image_hw: tuple[int, int], mask: np.ndarray, classes: list[str] | None) -> None:
    if mask.shape != image_hw:
        raise F.Unreadable(
            f"mask size {mask.shape[1]}x{mask.shape[0]} differs from its image's {image_hw[1]}x{image_hw[0]}")
    if classes is not None and mask.size and int(mask.max()) >= len(classes):
        bad = sorted(int(v) for v in np.unique(mask[mask >= len(classes)]))[:10]
        raise F.Unreadable(
            f"mask values {bad} are beyond the {len(classes)} classes of classes.txt (0..{len(classes) - 1})")


def _plan(listing: _Listing, labels_seen: list[int], split_of: list[str | None], sizes: list[tuple[int, int]],
          modes: list[str], unreadable_count: int):
    if not sizes:
        raise InvalidSpec(
            "The segmentation dataset has no usable image/mask pairs"
            + (f" ({unreadable_count} file(s) could not be used; see the scan report)" if unreadable_count else "")
            + ": put images in root/images/<stem>.<ext> and masks in root/masks/<stem>.png."
        )
    if listing.classes is not None:
        classes = listing.classes
    else:
        classes = [str(i) for i in range(max(labels_seen) + 1)]
        if len(classes) < 2:
            raise InvalidSpec("Every mask of the segmentation dataset is 0 (one class); segmentation needs at "
                              "least 2 classes (mask pixel value = class index).")
    parts, source = S.assign_splits([0] * len(sizes), split_of, ["all"], listing.folders)
    source = source.replace("stratified by class, ", "")
    if len(parts["train"]) == 0:
        raise InvalidSpec("The segmentation dataset's train split has no usable image/mask pairs.")
    size, rule = F.canonical_size(sizes, multiple=SIZE_MULTIPLE)
    return classes, parts, source, size, F.channels_for(modes), rule


def _scan(path: Path | None) -> DatasetScan:
    listing = _discover(path)
    fingerprint = S.Fingerprint()
    if listing.classes_txt is not None:
        fingerprint.add_bytes("classes.txt", listing.classes_txt.read_bytes())
    unreadable = list(listing.problems)
    sizes: list[tuple[int, int]] = []
    modes: list[str] = []
    mask_modes: Counter[str] = Counter()
    split_of: list[str | None] = []
    pixel_counts: Counter[int] = Counter()
    image_counts: Counter[int] = Counter()
    max_value = 0
    for pair in listing.pairs:
        try:
            image_bytes = F.read_file(pair.image)
            fingerprint.add_bytes(pair.image_rel, image_bytes)
            mask_bytes = F.read_file(pair.mask)
            fingerprint.add_bytes(pair.mask_rel, mask_bytes)
        except F.Unreadable as exc:
            unreadable.append(F.unreadable_entry(pair.image_rel, str(exc)))
            continue
        try:
            img, mode = F.decode_image(image_bytes)
        except F.Unreadable as exc:
            unreadable.append(F.unreadable_entry(pair.image_rel, str(exc)))
            continue
        try:
            mask, mask_mode = _decode_mask(mask_bytes)
            _check_pair(pair, (img.height, img.width), mask, listing.classes)
        except F.Unreadable as exc:
            unreadable.append(F.unreadable_entry(pair.mask_rel, str(exc)))
            continue
        values, counts = np.unique(mask, return_counts=True)
        for v, c in zip(values.tolist(), counts.tolist()):
            pixel_counts[v] += c
            image_counts[v] += 1
        max_value = max(max_value, int(values[-1]) if len(values) else 0)
        sizes.append((img.height, img.width))
        modes.append(mode)
        mask_modes[mask_mode] += 1
        split_of.append(pair.split)
        del img, mask, image_bytes, mask_bytes
    classes, parts, source, (h, w), channels, rule = _plan(
        listing, [max_value], split_of, sizes, modes, len(unreadable))
    total = sum(pixel_counts.values()) or 1
    return DatasetScan(
        task="segmentation",
        num_samples=len(sizes),
        classes=classes,
        splits={s: int(len(parts[s])) for s in F.SPLITS},
        image_shape=[channels, h, w],
        fingerprint=fingerprint.hexdigest(),
        report={
            "class_counts": {name: int(image_counts[k]) for k, name in enumerate(classes)},  # images containing it
            "class_pixel_fraction": {name: pixel_counts[k] / total for k, name in enumerate(classes)},
            "image_sizes": F.size_report(sizes),
            "modes": dict(sorted(Counter(modes).items())),
            "mask_modes": dict(sorted(mask_modes.items())),
            "unreadable": F.listed(unreadable),
            "unreadable_count": len(unreadable),
            "ignored_files": listing.ignored_files,
            "split_source": source,
            "size_rule": rule,
            "classes_source": "classes.txt" if listing.classes is not None else "0..max mask value",
            "channels_rule": "1 (every image is grayscale)" if channels == 1 else "3 (RGB; alpha on white)",
        },
    )


def _load(path: Path | None, image_size: tuple[int, int] | None = None) -> ImageSplits:
    fixed = F.check_image_size(image_size)
    listing = _discover(path)

    def probe(pair: _Pair):
        hw, mode = F.probe_image(pair.image)
        mask_hw, _ = F.probe_image(pair.mask)
        if mask_hw != hw:
            raise F.Unreadable("size mismatch")
        return hw, mode

    def decode(pair: _Pair, size: tuple[int, int], channels: int):
        img, mode = F.decode_image(F.read_file(pair.image))
        mask, _ = _decode_mask(F.read_file(pair.mask))
        _check_pair(pair, (img.height, img.width), mask, listing.classes)
        native = ((img.height, img.width), mode, int(mask.max()) if mask.size else 0)
        return (F.finish_image(img, channels, size), F.resize_mask(mask, size)), native

    def choose(infos):
        return (F.canonical_size([i[0] for i in infos], multiple=SIZE_MULTIPLE)[0],
                F.channels_for(i[1] for i in infos))

    decoded = S.decode_all(listing.pairs, probe, decode, choose, fixed)
    natives = decoded.natives
    classes, parts, _, size, channels, _ = _plan(
        listing, [max((n[2] for n in natives), default=0)], [listing.pairs[i].split for i in decoded.ok],
        [n[0] for n in natives], [n[1] for n in natives], len(listing.pairs) - len(decoded.ok))
    assert (fixed or size, channels) == (decoded.size, decoded.channels)
    order, counts = S.split_order(parts)
    images, masks = decoded.arrays
    S.permute_rows(images, order)
    S.permute_rows(masks, order)
    return S.build_splits("segmentation", images, masks, counts, classes)


register_format(DatasetFormat(
    name="segmentation", task="segmentation", scan=_scan, load=_load,
    description="Images with class-index masks: root/images/<stem>.<ext>, root/masks/<stem>.png",
))
