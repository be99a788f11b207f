"""Unpack an uploaded dataset archive without trusting it.

Refused, with nothing left on disk: members that would land outside the target (absolute paths, `..`,
backslashes, drive letters: zip-slip), links, devices and anything but plain files and folders,
encrypted zip members, more than `max_files` members or `max_bytes` unpacked (zip bombs: sizes are
counted as bytes are written, not only as the archive declares them).
"""

from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from trainyard.errors import InvalidSpec

CHUNK = 1024 * 1024


class UnsafeArchive(InvalidSpec):
    title = "Unsafe or unusable archive"


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    max_files: int


@dataclass(frozen=True)
class _Member:
    name: str
    is_dir: bool
    size: int
    open: object  # () -> IO[bytes]


def safe_extract(archive: Path, target: Path, limits: Limits) -> Path:
    """Unpack `archive` (zip, tar, tar.gz/bz2/xz) into the new folder `target`, all or nothing.

    Returns the dataset's folder: `target`, or its single top-level folder when the archive has one.
    """
    if target.exists():
        raise UnsafeArchive(f"{target} already exists.")
    staging = target.with_name(f".{target.name}.unpacking")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with _members(archive) as members:
            _unpack(members, staging, limits)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    entries = list(target.iterdir())
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else target


def _unpack(members: Iterator[_Member], root: Path, limits: Limits) -> None:
    written = count = 0
    for member in members:
        count += 1
        if count > limits.max_files:
            raise UnsafeArchive(f"The archive holds more than {limits.max_files} entries.")
        relative = _safe_relative(member.name)
        if relative is None:
            continue
        destination = root.joinpath(*relative.parts)
        if member.is_dir:
            destination.mkdir(parents=True, exist_ok=True)
            continue
        if written + member.size > limits.max_bytes:
            raise UnsafeArchive(f"The archive unpacks to more than {limits.max_bytes} bytes.")
        destination.parent.mkdir(parents=True, exist_ok=True)
        with member.open() as source, open(destination, "xb") as sink:  # "x": a duplicate name is refused
            while chunk := source.read(CHUNK):
                written += len(chunk)
                if written > limits.max_bytes:
                    raise UnsafeArchive(f"The archive unpacks to more than {limits.max_bytes} bytes.")
                sink.write(chunk)


def _safe_relative(name: str) -> PurePosixPath | None:
    """The member's path relative to the target, or None for one to skip ("./"); refuses escapes."""
    if "\\" in name or "\x00" in name:
        raise UnsafeArchive(f"Refused member {name!r}: backslashes and NUL bytes are not allowed in names.")
    path = PurePosixPath(name)
    if path.is_absolute() or (path.parts and ":" in path.parts[0]):
        raise UnsafeArchive(f"Refused member {name!r}: absolute paths are not allowed.")
    parts = [p for p in path.parts if p != "."]
    if ".." in parts:
        raise UnsafeArchive(f"Refused member {name!r}: '..' would leave the dataset folder.")
    return PurePosixPath(*parts) if parts else None


@contextmanager
def _members(archive: Path) -> Iterator[Iterator[_Member]]:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            yield _zip_members(zf)
        return
    try:
        tf = tarfile.open(archive, mode="r:*")
    except (tarfile.TarError, OSError):
        raise UnsafeArchive("The upload is not a zip or tar archive (tar.gz, tar.bz2 and tar.xz are fine).") from None
    with tf:
        yield _tar_members(tf)


def _zip_members(zf: zipfile.ZipFile) -> Iterator[_Member]:
    for info in zf.infolist():
        file_type = stat.S_IFMT(info.external_attr >> 16)  # 0 when the zip was made without Unix modes
        if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise UnsafeArchive(f"Refused member {info.filename!r}: links and special files are not allowed.")
        if info.flag_bits & 0x1:
            raise UnsafeArchive(f"Refused member {info.filename!r}: encrypted members cannot be read.")
        yield _Member(info.filename, info.is_dir(), info.file_size, lambda info=info: zf.open(info))


def _tar_members(tf: tarfile.TarFile) -> Iterator[_Member]:
    try:
        for info in tf:
            if not (info.isreg() or info.isdir()):
                raise UnsafeArchive(f"Refused member {info.name!r}: links, devices and FIFOs are not allowed.")
            yield _Member(info.name, info.isdir(), info.size, lambda info=info: _tar_open(tf, info))
    except tarfile.TarError as exc:
        raise UnsafeArchive(f"The tar archive is damaged: {exc}.") from None


def _tar_open(tf: tarfile.TarFile, info: tarfile.TarInfo) -> IO[bytes]:
    handle = tf.extractfile(info)
    assert handle is not None  # a regular file always has data
    return handle
