"""Dataset service: the registered datasets, as dataclasses."""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.exc import IntegrityError

from trainyard.archives import Limits, safe_extract
from trainyard.db import Database
from trainyard.errors import Conflict, InvalidSpec, NotFound
from trainyard.ml.datasets import BUILTIN_DATASETS, FORMATS, DatasetScan
from trainyard.models import Dataset, to_view
from trainyard.statements import Statement


@dataclass(frozen=True)
class DatasetView:
    name: str
    format: str
    task: str
    path: str | None
    builtin: bool
    num_samples: int
    num_classes: int
    classes: list[str]
    splits: dict[str, int]
    image_shape: list[int]
    fingerprint: str
    report: dict[str, Any]
    created_at: datetime


def ensure_builtin_datasets(db: Database) -> None:
    """Register the built-in datasets that are not registered yet (idempotent, safe to race)."""
    with db.session_scope() as s:
        present = set(s.scalars(select(Dataset.name)))
    for name, fmt in BUILTIN_DATASETS:
        if name in present:
            continue
        path = None
        scan = FORMATS.get(fmt).obj.scan(path)
        try:
            with db.session_scope() as s:
                s.add(_row(name, fmt, path, scan, builtin=True))
        except IntegrityError:
            pass  # another process registered it first: the name is unique


DATASET_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.\-]{0,99}$")


def resolve_under_roots(raw: str, roots: Sequence[Path], field: str, *, want: str) -> Path:
    """The real path of `raw` if it lies inside one of `roots` and is a `want` ("file" or "dir")."""
    path = Path(raw).expanduser()
    if not path.is_absolute():
        raise InvalidSpec(f"{field} must be an absolute path (got {raw!r}).",
                          errors=[{"field": field, "message": "not an absolute path"}])
    try:
        real = path.resolve()  # follows symlinks, so a link cannot smuggle in a path outside the roots
    except (ValueError, OSError) as exc:  # e.g. a NUL byte, or a symlink loop
        raise InvalidSpec(f"{field} is not a usable path ({exc}).",
                          errors=[{"field": field, "message": "unusable path"}]) from None
    if not any(real == root or real.is_relative_to(root) for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise InvalidSpec(f"{raw} is outside the allowed folders ({allowed}); set TRAINYARD_DATASET_ROOTS "
                          "to allow another.", errors=[{"field": field, "message": "outside the allowed folders"}])
    exists = real.is_file() if want == "file" else real.is_dir()
    if not exists:
        raise InvalidSpec(f"{raw} is not an existing {'file' if want == 'file' else 'folder'}.",
                          errors=[{"field": field, "message": f"no such {want}"}])
    return real


def register_dataset(db: Database, roots: Sequence[Path], *, name: str, format: str, path: str) -> DatasetView:
    """Scan the folder at `path` in `format` and register it as `name`; nothing is stored on any error."""
    if not DATASET_NAME_PATTERN.match(name):
        raise InvalidSpec(f"Dataset name {name!r} must be 1–100 lower-case letters, digits, '.', '_' or '-'.",
                          errors=[{"field": "name", "message": "invalid name"}])
    fmt = FORMATS.get(format).obj
    if fmt.builtin:
        raise InvalidSpec(f"{format!r} is a built-in dataset, not a format for your own folder; choose one of: "
                          f"{', '.join(f.name for f in FORMATS if not f.obj.builtin)}.",
                          errors=[{"field": "format", "message": "built-in"}])
    with db.session_scope() as s:
        if s.scalar(select(Dataset.id).where(Dataset.name == name)) is not None:
            raise Conflict(f"A dataset named {name!r} is already registered.")
    folder = resolve_under_roots(path, roots, "path", want="dir")
    scan = fmt.scan(folder)
    try:
        with db.session_scope() as s:
            s.add(_row(name, format, str(folder), scan, builtin=False))
    except IntegrityError:
        raise Conflict(f"A dataset named {name!r} is already registered.") from None
    return get_dataset(db, name)


def _row(name: str, fmt: str, path: str | None, scan: DatasetScan, *, builtin: bool) -> Dataset:
    return Dataset(
        name=name, format=fmt, task=scan.task, path=path, builtin=builtin, num_samples=scan.num_samples,
        num_classes=len(scan.classes), classes=scan.classes, splits=scan.splits,
        image_shape=scan.image_shape, fingerprint=scan.fingerprint, report=scan.report,
    )


def list_datasets(db: Database) -> list[DatasetView]:
    with db.read_scope() as s:
        return [to_view(DatasetView, row) for row in s.scalars(select(Dataset).order_by(Dataset.name))]


def get_dataset(db: Database, name: str) -> DatasetView:
    with db.connection() as conn:  # read on every submit: precompiled, and its view needs no copy
        row = _DATASET_BY_NAME.first(conn, name=name)
    if row is None:
        with db.read_scope() as s:
            known = ", ".join(s.scalars(select(Dataset.name).order_by(Dataset.name))) or "none"
        raise NotFound(f"No dataset named {name!r} is registered (registered: {known}).")
    return to_view(DatasetView, row)


_DATASET_BY_NAME = Statement("dataset_by_name", select(*Dataset.__table__.c).where(
    Dataset.__table__.c.name == bindparam("name")))


def register_uploaded_dataset(db: Database, roots: Sequence[Path], *, name: str, format: str, archive: Path,
                              limits: Limits) -> DatasetView:
    """Unpack an uploaded archive into `<first root>/uploads/<name>` and register it; on any error nothing
    is kept, neither files nor the registration."""
    if not DATASET_NAME_PATTERN.match(name):
        raise InvalidSpec(f"Dataset name {name!r} must be 1–100 lower-case letters, digits, '.', '_' or '-'.",
                          errors=[{"field": "name", "message": "invalid name"}])
    FORMATS.get(format)  # an unknown format is refused before anything is unpacked
    with db.session_scope() as s:
        if s.scalar(select(Dataset.id).where(Dataset.name == name)) is not None:
            raise Conflict(f"A dataset named {name!r} is already registered.")
    target = roots[0] / "uploads" / name
    if target.exists():
        raise Conflict(f"{target} already exists; register it by path, or remove it first.")
    folder = safe_extract(archive, target, limits)
    try:
        return register_dataset(db, roots, name=name, format=format, path=str(folder))
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
