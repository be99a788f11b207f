"""Checkpoints: written atomically (temp file, fsync, rename) with a sha256, read back without unpickling.

Each checkpoint `X.pt` has a sidecar `X.pt.sha256`, written after it. The job row records the newest
checkpoint's sha256; the sidecars let a resume verify an older one too when the newest is torn.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".sha256"
# attempt-<a>-epoch-<e>.pt, the name the training engine gives each epoch's checkpoint
_NAME = re.compile(r"attempt-(\d+)-epoch-(\d+)\.pt")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomically(path: Path, write) -> None:
    """Temp file, fsync, rename, fsync the folder: a crash leaves the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def save_checkpoint(state: dict[str, Any], path: Path) -> str:
    """Write `state` to `path` (and its sha256 beside it) so that a crash leaves either the old file or the
    new one; returns the sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, lambda f: torch.save(state, f))
    sha = _sha256(path)
    _write_atomically(sidecar(path), lambda f: f.write(sha.encode()))
    return sha


def remove_checkpoint(path: Path) -> None:
    path.unlink(missing_ok=True)
    sidecar(path).unlink(missing_ok=True)


class CheckpointMismatch(Exception):
    """The file on disk is not the checkpoint the job row recorded."""


def load_checkpoint(path: str | Path, sha256: str | None = None) -> dict[str, Any]:
    """Read a checkpoint (tensors and plain containers only: `weights_only=True`), checking its sha256."""
    path = Path(path)
    if sha256 is not None and _sha256(path) != sha256:
        raise CheckpointMismatch(f"{path} does not match the recorded sha256 {sha256[:12]}…")
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_epoch(path: Path) -> int | None:
    """The epoch in a checkpoint's name, or None for a file that is not one of ours."""
    match = _NAME.fullmatch(path.name)
    return int(match.group(2)) if match else None


def _older_checkpoints(newest: Path, newest_epoch: int) -> list[Path]:
    """Checkpoints of earlier epochs beside `newest`, newest first. Only epochs before the recorded one:
    a file of a later epoch was never recorded (its attempt died or was fenced off before saying so)."""
    found = [(epoch, p.stat().st_mtime, p) for p in newest.parent.glob("attempt-*-epoch-*.pt")
             if (epoch := checkpoint_epoch(p)) is not None and epoch < newest_epoch]
    return [p for _, _, p in sorted(found, reverse=True)]


@dataclass
class ResumePoint:
    """The checkpoint a resumed attempt starts from, and why any newer one was passed over."""

    state: dict[str, Any] | None
    path: Path | None
    rejected: list[str] = field(default_factory=list)  # "<file>: <reason>", newest first


def _try_load(path: Path, sha256: str | None) -> dict[str, Any]:
    if sha256 is None:
        raise CheckpointMismatch("no sha256 recorded beside it (its write never finished)")
    state = load_checkpoint(path, sha256)
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise CheckpointMismatch("not a training checkpoint")
    return state


def latest_usable_checkpoint(newest: str | Path, newest_sha256: str | None, newest_epoch: int) -> ResumePoint:
    """The recorded checkpoint if it is intact, else the newest older one that is (checked against its
    sidecar sha256 and loaded with `weights_only`); `state` is None when none is usable."""
    newest = Path(newest)
    rejected: list[str] = []
    for path in [newest, *_older_checkpoints(newest, newest_epoch)]:
        recorded = (newest_sha256 if path == newest else None) or _read_sidecar(path)
        try:
            return ResumePoint(_try_load(path, recorded), path, rejected)
        except Exception as exc:  # missing, truncated, tampered or hostile: every case means "use an older one"
            reason = "missing" if isinstance(exc, FileNotFoundError) else f"{type(exc).__name__}: {exc}"
            log.warning("checkpoint %s is unusable (%s)", path, reason)
            rejected.append(f"{path.name}: {reason.splitlines()[0][:200]}")
    return ResumePoint(None, None, rejected)


def _read_sidecar(path: Path) -> str | None:
    try:
        return sidecar(path).read_text().strip() or None
    except FileNotFoundError:
        return None


def prune_checkpoints(directory: Path, keep: set[Path], up_to_epoch: int) -> None:
    """Remove the job's checkpoints up to `up_to_epoch` other than `keep` (torn ones, superseded ones).

    Later epochs are left alone: they can only belong to an attempt that now owns the job.
    """
    for path in directory.glob("attempt-*-epoch-*.pt"):
        epoch = checkpoint_epoch(path)
        if epoch is not None and epoch <= up_to_epoch and path not in keep:
            remove_checkpoint(path)


def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every random stream a resumed run must continue: torch's, CUDA's and the data order's."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if generator is not None:
        state["data"] = generator.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    if generator is not None and "data" in state:
        generator.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
