"""Checkpoints: written atomically (temp file, fsync, rename) with a sha256, read back without unpickling."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(state: dict[str, Any], path: Path) -> str:
    """Write `state` to `path` so that a crash leaves either the old file or the new one; returns its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return _sha256(path)


class CheckpointMismatch(Exception):
    """The file on disk is not the checkpoint the job row recorded."""


def load_checkpoint(path: str | Path, sha256: str | None = None) -> dict[str, Any]:
    """Read a checkpoint (tensors and plain containers only: `weights_only=True`), checking its sha256."""
    path = Path(path)
    if sha256 is not None and _sha256(path) != sha256:
        raise CheckpointMismatch(f"{path} does not match the recorded sha256 {sha256[:12]}…")
    return torch.load(path, map_location="cpu", weights_only=True)


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
