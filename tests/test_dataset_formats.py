"""Dataset formats read the real file layouts: IDX (MNIST), CIFAR binary records, image folders, segmentation
folders, and the generated `shapes` set. Every file here is written in its published format into tmp_path."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import shutil
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainyard.errors import InvalidSpec
from trainyard.ml.datasets import BUILTIN_DATASETS, FORMATS, DatasetScan, ImageSplits


def fmt(name: str):
    return FORMATS.get(name).obj


def check_splits(splits: ImageSplits, scan: DatasetScan) -> None:
    """What every load must satisfy against its scan."""
    c, h, w = scan.image_shape
    assert splits.task == scan.task
    assert splits.classes == scan.classes
    assert splits.image_shape == (c, h, w)
    assert len(splits.mean) == len(splits.std) == c
    assert all(0 <= m <= 1 for m in splits.mean) and all(s > 0 for s in splits.std)
    for name in ("train", "val", "test"):
        x, y = getattr(splits, name).tensors
        assert len(x) == len(y) == scan.splits[name], name
        assert x.dtype == torch.uint8 and tuple(x.shape[1:]) == (c, h, w)
        assert y.dtype == torch.int64
        if scan.task == "classification":
            assert y.ndim == 1
        else:
            assert tuple(y.shape[1:]) == (h, w)
        if len(y):
            assert 0 <= int(y.min()) and int(y.max()) < len(scan.classes)
    assert sum(scan.splits.values()) == scan.num_samples
    for key in ("class_counts", "image_sizes", "modes", "unreadable", "ignored_files", "split_source"):
        assert key in scan.report, key
    json.dumps(scan.report)  # stored as JSON


def all_of(splits: ImageSplits) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [splits.train.tensors, splits.val.tensors, splits.test.tensors]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def test_registry_lists_every_format():
    for name in ("digits", "imagefolder", "segmentation", "mnist", "fashion-mnist", "cifar10", "cifar100",
                 "shapes"):
        assert name in FORMATS
    assert FORMATS.get("segmentation").meta["task"] == "segmentation"
    assert fmt("shapes").builtin and not fmt("imagefolder").builtin
    assert ("shapes", "shapes") in BUILTIN_DATASETS
    with pytest.raises(InvalidSpec, match="give the path"):
        fmt("imagefolder").scan(None)


# ---- MNIST (IDX) ---------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    data = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def mnist_arrays(n: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose pixels encode their label (row 0) and their index (pixel 27,27)."""
    labels = (np.arange(n) * 7 + offset) % 10
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    images[:, 0, :] = (labels * 25)[:, None]
    images[:, 27, 27] = np.arange(n) + offset
    return images, labels


def make_mnist(folder: Path, n_train=50, n_test=20, gz_train=True, gz_test=False) -> Path:
    train_x, train_y = mnist_arrays(n_train, 0)
    test_x, test_y = mnist_arrays(n_test, 100)
    write_idx(folder / "train-images-idx3-ubyte", train_x, gz_train)
    write_idx(folder / "train-labels-idx1-ubyte", train_y, gz_train)
    write_idx(folder / "t10k-images-idx3-ubyte", test_x, gz_test)
    write_idx(folder / "t10k-labels-idx1-ubyte", test_y, gz_test)
    return folder


def test_mnist_idx_gzipped_and_plain_in_raw_folder(tmp_path):
    make_mnist(tmp_path / "raw")
    scan = fmt("mnist").scan(tmp_path)
    assert scan.task == "classification" and scan.classes == [str(i) for i in range(10)]
    assert scan.num_samples == 70 and scan.image_shape == [1, 28, 28]
    assert scan.splits == {"train": 45, "val": 5, "test": 20}
    train_y, test_y = mnist_arrays(50, 0)[1], mnist_arrays(20, 100)[1]
    expected = np.bincount(np.concatenate([train_y, test_y]), minlength=10)
    assert scan.report["class_counts"] == {str(i): int(n) for i, n in enumerate(expected)}
    assert scan.report["files"]["train_images"] == "raw/train-images-idx3-ubyte.gz"

    splits = fmt("mnist").load(tmp_path, None)
    check_splits(splits, scan)
    for part in (splits.train, splits.val, splits.test):
        x, y = part.tensors
        assert torch.equal(x[:, 0, 0, 0].long(), y * 25)  # the label the pixels encode
    # val is the last 10 % of train, in file order; test is t10k.
    assert splits.train.tensors[0][:, 0, 27, 27].tolist() == list(range(45))
    assert splits.val.tensors[0][:, 0, 27, 27].tolist() == list(range(45, 50))
    assert splits.test.tensors[0][:, 0, 27, 27].tolist() == list(range(100, 120))

    small = fmt("mnist").load(tmp_path, (14, 14))
    assert small.image_shape == (1, 14, 14) and small.train.tensors[0].shape == (45, 1, 14, 14)


def test_fashion_mnist_names_and_content_fingerprint(tmp_path):
    make_mnist(tmp_path / "a", gz_train=False, gz_test=False)
    make_mnist(tmp_path / "b", gz_train=True, gz_test=True)
    scan_a = fmt("fashion-mnist").scan(tmp_path / "a")
    assert scan_a.classes[0] == "T-shirt/top" and scan_a.classes[-1] == "Ankle boot" and len(scan_a.classes) == 10
    # The fingerprint is over the IDX content: the same data gzipped or not is the same dataset.
    assert fmt("fashion-mnist").scan(tmp_path / "b").fingerprint == scan_a.fingerprint
    assert fmt("fashion-mnist").scan(tmp_path / "a").fingerprint == scan_a.fingerprint
    labels = tmp_path / "a" / "t10k-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    data[-1] = (data[-1] + 1) % 10
    labels.write_bytes(bytes(data))
    assert fmt("fashion-mnist").scan(tmp_path / "a").fingerprint != scan_a.fingerprint


def test_mnist_bad_files_are_refused_by_name(tmp_path):
    with pytest.raises(InvalidSpec, match="No mnist IDX files"):
        fmt("mnist").scan(tmp_path)
    folder = make_mnist(tmp_path / "m", gz_train=True, gz_test=False)
    # Wrong magic number (an idx1 file where idx3 belongs).
    good = (folder / "t10k-images-idx3-ubyte").read_bytes()
    (folder / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros(20, np.uint8)))
    with pytest.raises(InvalidSpec, match="t10k-images-idx3-ubyte.*magic"):
        fmt("mnist").scan(folder)
    # Truncated plain file.
    (folder / "t10k-images-idx3-ubyte").write_bytes(good[:-100])
    with pytest.raises(InvalidSpec, match="t10k-images-idx3-ubyte is truncated"):
        fmt("mnist").load(folder, None)
    (folder / "t10k-images-idx3-ubyte").write_bytes(good)
    # Truncated gzip stream.
    gz = folder / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:200])
    with pytest.raises(InvalidSpec, match="train-images-idx3-ubyte.gz"):
        fmt("mnist").scan(folder)
    # Label count that does not match the images.
    make_mnist(tmp_path / "n")
    write_idx(tmp_path / "n" / "t10k-labels-idx1-ubyte", np.zeros(19, np.uint8), gz=False)
    with pytest.raises(InvalidSpec, match="20 images but t10k-labels-idx1-ubyte 19 labels"):
        fmt("mnist").scan(tmp_path / "n")
    # A missing file is named.
    make_mnist(tmp_path / "o")
    (tmp_path / "o" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(InvalidSpec, match="lacks t10k-labels-idx1-ubyte"):
        fmt("mnist").scan(tmp_path / "o")


# ---- CIFAR (binary) ------------------------------------------------------------------------------------


def cifar_records(n: int, start: int, fine: bool) -> bytes:
    """Records whose red plane encodes the label, green the running index, blue is 7."""
    out = bytearray()
    for i in range(start, start + n):
        label = (i * 3) % (100 if fine else 10)
        pixels = np.zeros((3, 32, 32), dtype=np.uint8)
        pixels[0] = label * 2
        pixels[1] = i
        pixels[2] = 7
        head = bytes([label % 20, label]) if fine else bytes([label])
        out += head + pixels.tobytes()
    return bytes(out)


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_cifar10(folder: Path, per_batch=4, n_test=6) -> Path:
    folder.mkdir(parents=True)
    for b in range(5):
        (folder / f"data_batch_{b + 1}.bin").write_bytes(cifar_records(per_batch, b * per_batch, fine=False))
    (folder / "test_batch.bin").write_bytes(cifar_records(n_test, 200, fine=False))
    (folder / "batches.meta.txt").write_text("\n".join(CIFAR10_NAMES) + "\n\n")
    return folder


def test_cifar10_binary_records(tmp_path):
    make_cifar10(tmp_path / "cifar-10-batches-bin")
    scan = fmt("cifar10").scan(tmp_path)  # the named subfolder is found
    assert scan.classes == CIFAR10_NAMES and scan.image_shape == [3, 32, 32]
    assert scan.num_samples == 26 and scan.splits == {"train": 18, "val": 2, "test": 6}
    assert scan.report["modes"] == {"RGB": 26}
    splits = fmt("cifar10").load(tmp_path, None)
    check_splits(splits, scan)
    for part in (splits.train, splits.val, splits.test):
        x, y = part.tensors
        assert torch.equal(x[:, 0, 5, 5].long(), y * 2)  # red plane first, label from the record
        assert torch.all(x[:, 2] == 7)
    assert splits.train.tensors[0][:, 1, 0, 0].tolist() == list(range(18))  # batches in order 1..5
    assert splits.val.tensors[0][:, 1, 0, 0].tolist() == [18, 19]  # last 10 % of train
    assert splits.test.tensors[0][:, 1, 0, 0].tolist() == list(range(200, 206))
    # The files may also sit directly in the given folder.
    assert fmt("cifar10").scan(tmp_path / "cifar-10-batches-bin").fingerprint == scan.fingerprint
    assert fmt("cifar10").load(tmp_path, (16, 16)).train.tensors[0].shape == (18, 3, 16, 16)


def test_cifar100_uses_the_fine_label(tmp_path):
    folder = tmp_path / "c100"
    folder.mkdir()
    (folder / "train.bin").write_bytes(cifar_records(40, 0, fine=True))
    (folder / "test.bin").write_bytes(cifar_records(10, 40, fine=True))
    (folder / "fine_label_names.txt").write_text("\n".join(f"class_{i}" for i in range(100)))
    scan = fmt("cifar100").scan(folder)
    assert len(scan.classes) == 100 and scan.classes[3] == "class_3"
    assert scan.splits == {"train": 36, "val": 4, "test": 10}
    splits = fmt("cifar100").load(folder, None)
    check_splits(splits, scan)
    x, y = all_of(splits)
    assert torch.equal(y, torch.tensor([(i * 3) % 100 for i in range(50)]))
    assert torch.equal(x[:, 0, 0, 0].long(), (y * 2) % 256)
    # A record cut short is refused.
    (folder / "test.bin").write_bytes(cifar_records(10, 40, fine=True)[:-5])
    with pytest.raises(InvalidSpec, match="test.bin .*not a whole number"):
        fmt("cifar100").scan(folder)


class _Payload:
    """Unpickling this would create the marker file: the loader must never unpickle."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name,subdir,files", [
    ("cifar10", "cifar-10-batches-py", ["data_batch_1", "data_batch_2", "test_batch", "batches.meta"]),
    ("cifar100", "cifar-100-python", ["train", "test", "meta"]),
])
def test_cifar_python_version_is_refused_unread(tmp_path, name, subdir, files):
    marker = tmp_path / "pwned"
    _Payload.marker = str(marker)
    payload = pickle.dumps(_Payload())
    (tmp_path / subdir).mkdir()
    for f in files:
        (tmp_path / subdir / f).write_bytes(payload)
    for where in (tmp_path, tmp_path / subdir):
        with pytest.raises(InvalidSpec, match="binary version"):
            fmt(name).scan(where)
        with pytest.raises(InvalidSpec, match="binary version"):
            fmt(name).load(where, None)
    assert not marker.exists()


# ---- imagefolder ---------------------------------------------------------------------------------------


def save(path: Path, img: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def gradient(w: int, h: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_mixed_folder(root: Path) -> dict[str, list[str]]:
    """Three classes (names with spaces and non-ASCII), mixed modes and sizes, and broken files."""
    files: dict[str, list[str]] = {}
    classes = ["café au lait", "Ölfass", "dog"]
    for k, cls in enumerate(classes):
        names = []
        for i in range(8):
            seed = k * 100 + i
            rgb = Image.fromarray(gradient(40, 30, seed))  # most images are 40x30
            kind = i % 8
            if kind == 0:
                p = save(root / cls / f"img{i}.png", rgb.convert("RGBA"))
            elif kind == 1:
                p = save(root / cls / f"img{i}.png", rgb.quantize(colors=16))  # palette
            elif kind == 2:
                p = save(root / cls / f"img{i}.png", rgb.convert("L"))
            elif kind == 3:
                p = save(root / cls / f"img{i}.jpg", rgb)
            elif kind == 4:
                p = save(root / cls / f"img{i}.png", rgb.convert("LA"))
            elif kind == 5:
                p = save(root / cls / f"img{i}.jpg", rgb.convert("CMYK"))
            elif kind == 6:
                a16 = (np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
                p = save(root / cls / f"img{i}.png", Image.fromarray(a16))  # I;16
            else:
                p = save(root / cls / "sub" / f"IMG{i}.JPG", Image.fromarray(gradient(64, 48, seed)))  # other size
            names.append(p.relative_to(root).as_posix())
        files[cls] = names
    # Broken files: a truncated JPEG, a truncated PNG, a zero-byte file, a text file named .png.
    (root / "dog" / "truncated.jpg").write_bytes(jpeg_bytes(Image.fromarray(gradient(40, 30, 9)))[:300])
    png = io.BytesIO()
    Image.fromarray(gradient(40, 30, 10)).save(png, "PNG")
    (root / "Ölfass" / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (root / "café au lait" / "empty.png").write_bytes(b"")
    (root / "café au lait" / "notes.png").write_text("this is not an image\n")
    # Non-image files: ignored but counted.
    (root / "README").write_text("my dataset")
    (root / "dog" / "labels.txt").write_text("dog\n")
    (root / "dog" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return files


def test_imagefolder_mixed_modes_sizes_names_and_broken_files(tmp_path):
    root = tmp_path / "pets"
    make_mixed_folder(root)
    scan = fmt("imagefolder").scan(root)
    assert scan.classes == ["café au lait", "dog", "Ölfass"]  # sorted
    assert scan.num_samples == 24
    assert scan.report["class_counts"] == {"café au lait": 8, "dog": 8, "Ölfass": 8}
    unreadable = {u["file"]: u["error"] for u in scan.report["unreadable"]}
    assert set(unreadable) == {"dog/truncated.jpg", "Ölfass/truncated.png", "café au lait/empty.png",
                               "café au lait/notes.png"}
    assert "empty" in unreadable["café au lait/empty.png"]
    assert all(unreadable.values())
    assert scan.report["ignored_files"] == 3
    assert scan.report["modes"] == {"CMYK": 3, "I;16": 3, "L": 3, "LA": 3, "P": 3, "RGB": 6, "RGBA": 3}
    assert scan.report["image_sizes"] == {"40x30": 21, "64x48": 3}
    assert scan.image_shape == [3, 30, 40]  # colour images present: 3 channels; most common size
    assert scan.report["split_source"].startswith("random 80/10/10")
    assert sum(scan.splits.values()) == 24 and scan.splits["val"] == scan.splits["test"] == 2

    splits = fmt("imagefolder").load(root, None)
    check_splits(splits, scan)
    # Labels follow folders: every image of a class decodes to what was written for that class.
    x, y = all_of(splits)
    assert sorted(torch.bincount(y).tolist()) == [8, 8, 8]
    again = fmt("imagefolder").load(root, None)
    for a, b in zip(all_of(splits), all_of(again)):
        assert torch.equal(a, b)  # deterministic
    bigger = fmt("imagefolder").load(root, (48, 64))
    assert bigger.image_shape == (3, 48, 64) and bigger.train.tensors[0].shape[1:] == (3, 48, 64)


def test_imagefolder_labels_match_pixels_and_alpha_goes_on_white(tmp_path):
    root = tmp_path / "ds"
    # Class "black": opaque black RGB; class "clear": fully transparent red RGBA (must load white);
    # class "half": red at alpha 128 (must load pink, composited on white); "pal": transparent palette.
    for i in range(6):
        save(root / "black" / f"{i}.png", Image.new("RGB", (20, 10), (0, 0, 0)))
        save(root / "clear" / f"{i}.png", Image.new("RGBA", (20, 10), (255, 0, 0, 0)))
        save(root / "half" / f"{i}.png", Image.new("RGBA", (20, 10), (255, 0, 0, 128)))
        pal = Image.new("P", (20, 10), 1)
        pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
        save(root / "pal" / f"{i}.png", pal, transparency=1)
    scan = fmt("imagefolder").scan(root)
    assert scan.classes == ["black", "clear", "half", "pal"] and scan.image_shape == [3, 10, 20]
    x, y = all_of(fmt("imagefolder").load(root, None))
    assert torch.all(x[y == 0] == 0)
    assert torch.all(x[y == 1] == 255)
    half = x[y == 2]
    assert torch.all(half[:, 0] == 255) and torch.all((half[:, 1] - 127).abs() <= 1)
    assert torch.all(x[y == 3] == 255)


def test_imagefolder_grayscale_is_one_channel_and_16_bit_scales(tmp_path):
    root = tmp_path / "gray"
    for i in range(5):
        save(root / "bright" / f"{i}.png", Image.fromarray(np.full((12, 16), 65535, np.uint16)))  # I;16
        save(root / "dark" / f"{i}.png", Image.fromarray(np.zeros((12, 16, 2), np.uint8), "LA"))  # transparent
        save(root / "mid" / f"{i}.bmp", Image.new("L", (16, 12), 100))
        save(root / "bits" / f"{i}.png", Image.new("1", (16, 12), 1))
    scan = fmt("imagefolder").scan(root)
    assert scan.image_shape == [1, 12, 16]
    x, y = all_of(fmt("imagefolder").load(root, None))
    by_class = dict(zip(scan.classes, range(4)))
    assert torch.all(x[y == by_class["bright"]] == 255)
    assert torch.all(x[y == by_class["dark"]] == 255)  # fully transparent: white
    assert torch.all(x[y == by_class["mid"]] == 100)
    assert torch.all(x[y == by_class["bits"]] == 255)


def test_imagefolder_exif_orientation_and_unicode_normalisation(tmp_path):
    root = tmp_path / "exif"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90°: portrait
    nfd = unicodedata.normalize("NFD", "café")  # how macOS stores names
    for i in range(4):
        save(root / nfd / f"{i}.jpg", Image.fromarray(gradient(40, 30, i)), exif=exif.tobytes())
        save(root / "tea" / f"{i}.jpg", Image.fromarray(gradient(40, 30, i)), exif=exif.tobytes())
    scan = fmt("imagefolder").scan(root)
    assert scan.classes == ["café", "tea"] and scan.classes[0] == unicodedata.normalize("NFC", "café")
    assert scan.image_shape == [3, 40, 30] and scan.report["image_sizes"] == {"30x40": 8}
    assert fmt("imagefolder").load(root, None).train.tensors[0].shape[1:] == (3, 40, 30)


def test_imagefolder_size_rules(tmp_path):
    # No size shared by half the images: median height and width, then the longer side clipped to 224.
    root = tmp_path / "sizes"
    sizes = [(300, 600), (310, 620), (320, 640), (330, 500), (200, 700), (250, 650)]  # (h, w)
    for i, (h, w) in enumerate(sizes):
        save(root / ("a" if i % 2 else "b") / f"{i}.png", Image.new("RGB", (w, h), (i, i, i)))
    scan = fmt("imagefolder").scan(root)
    # medians: h = 305, w = 630 → clipped to 224 wide: h = round(305 * 224 / 630) = 108
    assert scan.image_shape == [3, 108, 224]
    assert "median" in scan.report["size_rule"] and "clipped" in scan.report["size_rule"]
    splits = fmt("imagefolder").load(root, None)
    assert splits.image_shape == (3, 108, 224)


def test_imagefolder_split_folders_and_stratified_carving(tmp_path):
    root = tmp_path / "split"
    for cls in ("ant", "bee"):
        for i in range(30):
            save(root / "train" / cls / f"{i}.png", Image.new("RGB", (8, 8), (i, 0, 0)))
        for i in range(4):
            save(root / "val" / cls / f"{i}.png", Image.new("RGB", (8, 8), (0, i, 0)))
    scan = fmt("imagefolder").scan(root)
    assert scan.classes == ["ant", "bee"]
    assert scan.splits == {"train": 54, "val": 8, "test": 6}  # test: 10 % of the 60 train images
    assert "test carved from train" in scan.report["split_source"]
    assert scan.report["split_class_counts"]["test"] == {"ant": 3, "bee": 3}  # stratified
    assert scan.report["split_class_counts"]["val"] == {"ant": 4, "bee": 4}  # the folder
    splits = fmt("imagefolder").load(root, None)
    check_splits(splits, scan)
    assert torch.all(splits.val.tensors[0][:, 0] == 0)  # val images come from val/ (red = 0)
    # All three folders: "folders".
    for cls in ("ant", "bee"):
        save(root / "test" / cls / "0.png", Image.new("RGB", (8, 8), (0, 0, 9)))
    scan = fmt("imagefolder").scan(root)
    assert scan.report["split_source"] == "folders" and scan.splits == {"train": 60, "val": 8, "test": 2}
    # No split folders: stratified 80/10/10.
    flat = tmp_path / "flat"
    for cls in ("x", "y"):
        for i in range(50):
            save(flat / cls / f"{i}.png", Image.new("L", (8, 8), i))
    scan = fmt("imagefolder").scan(flat)
    assert scan.splits == {"train": 80, "val": 10, "test": 10}
    assert scan.report["split_class_counts"]["val"] == {"x": 5, "y": 5}
    assert fmt("imagefolder").scan(flat).report["split_class_counts"] == scan.report["split_class_counts"]


def test_imagefolder_fingerprint(tmp_path):
    root = tmp_path / "fp"
    for cls in ("a", "b"):
        for i in range(3):
            save(root / cls / f"{i}.png", Image.new("RGB", (8, 8), (i, 10, 20)))
    first = fmt("imagefolder").scan(root).fingerprint
    assert len(first) == 64 and fmt("imagefolder").scan(root).fingerprint == first
    (root / "README.txt").write_text("notes")  # non-image files are not content
    assert fmt("imagefolder").scan(root).fingerprint == first
    save(root / "a" / "0.png", Image.new("RGB", (8, 8), (1, 10, 20)))  # an edited file
    edited = fmt("imagefolder").scan(root).fingerprint
    assert edited != first
    (root / "a" / "0.png").rename(root / "a" / "9.png")  # a renamed file
    assert fmt("imagefolder").scan(root).fingerprint not in (first, edited)
    shutil.move(root / "a" / "9.png", root / "b" / "9.png")  # moved to another class
    assert fmt("imagefolder").scan(root).fingerprint not in (first, edited)


def test_imagefolder_refuses_empty_and_single_class(tmp_path):
    with pytest.raises(InvalidSpec, match="does not exist"):
        fmt("imagefolder").scan(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidSpec, match="no readable images"):
        fmt("imagefolder").scan(tmp_path / "empty")
    broken = tmp_path / "broken"
    for cls in ("a", "b"):
        (broken / cls).mkdir(parents=True)
        (broken / cls / "x.png").write_bytes(b"")
    with pytest.raises(InvalidSpec, match="no readable images.*2 image file"):
        fmt("imagefolder").scan(broken)
    with pytest.raises(InvalidSpec, match="no readable images"):
        fmt("imagefolder").load(broken, None)
    one = tmp_path / "one"
    save(one / "only" / "x.png", Image.new("RGB", (4, 4)))
    with pytest.raises(InvalidSpec, match="at least 2 classes"):
        fmt("imagefolder").scan(one)
    loose = tmp_path / "loose"
    save(loose / "x.png", Image.new("RGB", (4, 4)))
    with pytest.raises(InvalidSpec, match="outside any class folder"):
        fmt("imagefolder").scan(loose)


def test_imagefolder_real_photos_from_scikit_image(tmp_path):
    skdata = pytest.importorskip("skimage.data")
    root = tmp_path / "photos"
    colour = {"astronaut": "jpg", "chelsea": "palette", "coffee": "jpg", "rocket": "png", "logo": "png"}
    gray = {"camera": "png", "coins": "jpg", "moon": "png16", "page": "png", "text": "jpg", "clock": "png"}
    for cls, entries in (("colour photos", colour), ("grayscale photos", gray)):
        for name, kind in entries.items():
            img = Image.fromarray(getattr(skdata, name)())
            if kind == "jpg":
                save(root / cls / f"{name}.jpg", img.convert("RGB" if img.mode == "RGBA" else img.mode), quality=85)
            elif kind == "palette":
                save(root / cls / f"{name}.png", img.quantize(colors=64))
            elif kind == "png16":
                save(root / cls / f"{name}.png", Image.fromarray(np.asarray(img).astype(np.uint16) * 257))
            else:
                save(root / cls / f"{name}.png", img)
    scan = fmt("imagefolder").scan(root)
    assert scan.num_samples == 11 and scan.report["unreadable"] == []
    assert scan.report["modes"] == {"I;16": 1, "L": 5, "P": 1, "RGB": 3, "RGBA": 1}
    # 3 of 11 images are 512x512 (< half): median 400 high x 500 wide, clipped to 224 wide.
    assert scan.image_shape == [3, 179, 224]
    splits = fmt("imagefolder").load(root, None)
    check_splits(splits, scan)
    x, y = all_of(splits)
    assert x.shape == (11, 3, 179, 224)
    grays = x[y == scan.classes.index("grayscale photos")]
    assert torch.equal(grays[:, 0], grays[:, 1]) and torch.equal(grays[:, 1], grays[:, 2])
    colours = x[y == scan.classes.index("colour photos")]
    assert (colours[:, 0].float() - colours[:, 2].float()).abs().mean() > 5
    assert 0.2 < min(splits.mean) and max(splits.mean) < 0.8


# ---- segmentation --------------------------------------------------------------------------------------


def halves_mask(h: int, w: int, left: int, right: int) -> np.ndarray:
    m = np.full((h, w), left, np.uint8)
    m[:, w // 2:] = right
    return m


def make_segmentation(root: Path, n: int = 10, classes_txt: bool = True) -> None:
    for i in range(n):
        image = Image.fromarray(gradient(50, 40, i))  # 50 wide, 40 high
        ext = "jpg" if i % 3 == 0 else "png"
        save(root / "images" / f"s{i:02d}.{ext}", image)
        mask = halves_mask(40, 50, i % 2, 2)
        if i % 2:
            pm = Image.fromarray(mask, "P")
            pm.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
            save(root / "masks" / f"s{i:02d}.png", pm)
        else:
            save(root / "masks" / f"s{i:02d}.png", Image.fromarray(mask, "L"))
    if classes_txt:
        (root / "classes.txt").write_text("background\ncat\ndog\n")


def test_segmentation_pairs_problems_and_exact_masks(tmp_path):
    root = tmp_path / "seg"
    make_segmentation(root)
    save(root / "images" / "lonely.png", Image.fromarray(gradient(50, 40, 99)))  # no mask
    save(root / "masks" / "orphan.png", Image.fromarray(halves_mask(40, 50, 0, 1)))  # no image
    save(root / "images" / "small.png", Image.fromarray(gradient(50, 40, 98)))
    save(root / "masks" / "small.png", Image.fromarray(halves_mask(20, 25, 0, 1)))  # size mismatch
    save(root / "images" / "rgbmask.png", Image.fromarray(gradient(50, 40, 97)))
    save(root / "masks" / "rgbmask.png", Image.new("RGB", (50, 40)))  # not class indices
    save(root / "images" / "toobig.png", Image.fromarray(gradient(50, 40, 96)))
    save(root / "masks" / "toobig.png", Image.fromarray(halves_mask(40, 50, 0, 5)))  # beyond classes.txt
    (root / "images" / "Thumbs.db").write_bytes(b"x")
    scan = fmt("segmentation").scan(root)
    assert scan.task == "segmentation" and scan.classes == ["background", "cat", "dog"]
    assert scan.num_samples == 10 and sum(scan.splits.values()) == 10
    problems = {u["file"]: u["error"] for u in scan.report["unreadable"]}
    assert set(problems) == {"images/lonely.png", "masks/orphan.png", "masks/small.png", "masks/rgbmask.png",
                             "masks/toobig.png"}
    assert "without a mask" in problems["images/lonely.png"]
    assert "without an image" in problems["masks/orphan.png"]
    assert "differs" in problems["masks/small.png"]
    assert "single-channel" in problems["masks/rgbmask.png"]
    assert "beyond" in problems["masks/toobig.png"]
    assert scan.report["ignored_files"] == 1
    assert scan.image_shape == [3, 32, 48]  # 40x50 rounded down to multiples of 16
    fractions = scan.report["class_pixel_fraction"]
    assert abs(sum(fractions.values()) - 1) < 1e-9 and abs(fractions["dog"] - 0.5) < 1e-9
    assert scan.report["class_counts"] == {"background": 5, "cat": 5, "dog": 10}
    assert scan.report["mask_modes"] == {"L": 5, "P": 5}

    splits = fmt("segmentation").load(root, None)
    check_splits(splits, scan)
    x, y = all_of(splits)
    assert x.shape == (10, 3, 32, 48) and y.shape == (10, 32, 48) and y.dtype == torch.int64
    # Nearest resizing keeps the class indices exactly: left half 0 or 1, right half 2, no blends.
    assert set(torch.unique(y).tolist()) == {0, 1, 2}
    assert torch.all(y[:, :, 24:] == 2)
    left = y[:, :, :24]
    assert torch.all(left == left[:, :1, :1])
    big = fmt("segmentation").load(root, (80, 100))
    yb = all_of(big)[1]
    assert yb.shape == (10, 80, 100) and torch.all(yb[:, :, 50:] == 2) and set(torch.unique(yb).tolist()) == {0, 1, 2}

    first = scan.fingerprint
    assert fmt("segmentation").scan(root).fingerprint == first
    save(root / "masks" / "s03.png", Image.fromarray(halves_mask(40, 50, 0, 2)))
    assert fmt("segmentation").scan(root).fingerprint != first


def test_segmentation_without_classes_txt_and_with_split_folders(tmp_path):
    root = tmp_path / "seg"
    for split, n in (("train", 20), ("val", 3)):
        make_segmentation(root / split, n=n, classes_txt=False)
    scan = fmt("segmentation").scan(root)
    assert scan.classes == ["0", "1", "2"]
    assert scan.splits == {"train": 18, "val": 3, "test": 2}
    assert "test carved from train" in scan.report["split_source"]
    check_splits(fmt("segmentation").load(root, None), scan)
    flat = tmp_path / "flat"
    make_segmentation(flat, n=20, classes_txt=False)
    scan = fmt("segmentation").scan(flat)
    assert scan.splits == {"train": 16, "val": 2, "test": 2} and scan.report["split_source"].startswith("random")
    empty = tmp_path / "nomasks"
    (empty / "images").mkdir(parents=True)
    with pytest.raises(InvalidSpec, match="masks/"):
        fmt("segmentation").scan(empty)
    (empty / "masks").mkdir()
    with pytest.raises(InvalidSpec, match="no usable image/mask pairs"):
        fmt("segmentation").scan(empty)


# ---- shapes (built in) ---------------------------------------------------------------------------------


def test_shapes_is_deterministic_and_well_formed():
    from trainyard.ml.datasets import shapes

    shapes._arrays.cache_clear()
    start = time.perf_counter()
    scan = fmt("shapes").scan(None)
    elapsed = time.perf_counter() - start
    assert elapsed < 10, elapsed  # about 1 s on one core; generous for a busy machine
    assert scan.classes == ["background", "circle", "square", "triangle"]
    assert scan.splits == {"train": 960, "val": 120, "test": 120} and scan.image_shape == [3, 64, 64]
    assert all(n > 300 for c, n in scan.report["class_counts"].items())
    first = fmt("shapes").load(None, None)
    check_splits(first, scan)
    shapes._arrays.cache_clear()  # regenerate from the seed
    assert fmt("shapes").scan(None).fingerprint == scan.fingerprint
    second = fmt("shapes").load(None, None)
    for a, b in zip(all_of(first), all_of(second)):
        assert torch.equal(a, b)
    x, y = all_of(first)
    assert torch.all((y > 0).flatten(1).any(dim=1))  # every image has a shape
    fractions = scan.report["class_pixel_fraction"]
    assert 0.6 < fractions["background"] < 0.95 and min(fractions.values()) > 0.02
    small = fmt("shapes").load(None, (32, 32))
    assert small.train.tensors[0].shape == (960, 3, 32, 32)
    assert set(torch.unique(small.train.tensors[1]).tolist()) <= {0, 1, 2, 3}
