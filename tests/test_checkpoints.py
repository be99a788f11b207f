"""Checkpoints are written atomically with a sha256 and read back without unpickling anything."""

from __future__ import annotations

import hashlib
import pickle

import pytest
import torch

from trainyard_workers.checkpoints import CheckpointMismatch, load_checkpoint, rng_state, save_checkpoint


def test_round_trip_with_sha256_and_no_temp_files_left(tmp_path):
    path = tmp_path / "job-1" / "last.pt"
    state = {"model": {"w": torch.arange(6.0).view(2, 3)}, "epoch": 3, "rng": rng_state(),
             "spec": {"params": {"lr": 0.1}}, "mean": [0.5], "image_shape": [1, 8, 8]}
    sha = save_checkpoint(state, path)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = load_checkpoint(path, sha)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["epoch"] == 3
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    newer = save_checkpoint({**state, "epoch": 4}, path)  # replaced in place, atomically
    assert newer != sha and load_checkpoint(path, newer)["epoch"] == 4


def test_a_changed_file_is_refused(tmp_path):
    path = tmp_path / "last.pt"
    sha = save_checkpoint({"epoch": 1}, path)
    path.write_bytes(path.read_bytes() + b"tampered")
    with pytest.raises(CheckpointMismatch):
        load_checkpoint(path, sha)


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_never_runs_even_with_a_matching_sha(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "last.pt"
    torch.save({"model": Payload(str(marker))}, path)  # what an attacker with write access could plant
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path, sha)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file really is hostile: an unsafe load runs it
    assert marker.exists()
