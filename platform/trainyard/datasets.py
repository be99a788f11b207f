"""Dataset service: the registered datasets, as dataclasses."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from trainyard.db import Database
from trainyard.errors import NotFound
from trainyard.ml.datasets import BUILTIN_DATASETS, FORMATS
from trainyard.models import Dataset, to_view


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
    for name, fmt, path in BUILTIN_DATASETS:
        if name in present:
            continue
        scan = FORMATS.get(fmt).obj.scan(path)
        try:
            with db.session_scope() as s:
                s.add(
                    Dataset(
                        name=name,
                        format=fmt,
                        task=scan.task,
                        path=path,
                        builtin=True,
                        num_samples=scan.num_samples,
                        num_classes=len(scan.classes),
                        classes=scan.classes,
                        splits=scan.splits,
                        image_shape=scan.image_shape,
                        fingerprint=scan.fingerprint,
                        report=scan.report,
                    )
                )
        except IntegrityError:
            pass  # another process registered it first: the name is unique


def list_datasets(db: Database) -> list[DatasetView]:
    with db.session_scope() as s:
        return [to_view(DatasetView, row) for row in s.scalars(select(Dataset).order_by(Dataset.name))]


def get_dataset(db: Database, name: str) -> DatasetView:
    with db.session_scope() as s:
        row = s.scalar(select(Dataset).where(Dataset.name == name))
        if row is None:
            known = ", ".join(s.scalars(select(Dataset.name).order_by(Dataset.name))) or "none"
            raise NotFound(f"No dataset named {name!r} is registered (registered: {known}).")
        return to_view(DatasetView, row)
