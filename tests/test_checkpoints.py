"""Checkpoints are written atomically with a sha256 and read back without unpickling anything."""

from __future__ import annotations

import hashlib
import pickle

import pytest
import torch

from trainyard_workers.checkpoints import (
    CheckpointMismatch,
    latest_usable_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
)


def test_round_trip_with_sha256_and_no_temp_files_left(tmp_path):
    path = tmp_path / "job-1" / "last.pt"
    state = {"model": {"w": torch.arange(6.0).view(2, 3)}, "epoch": 3, "rng": rng_state(),
             "spec": {"params": {"lr": 0.1}}, "mean": [0.5], "image_shape": [1, 8, 8]}
    sha = save_checkpoint(state, path)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = load_checkpoint(path, sha)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["epoch"] == 3
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt", "last.pt.sha256"]
    assert (path.parent / "last.pt.sha256").read_text() == sha
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


def _epochs(tmp_path, *names):
    """Checkpoints named like the engine's, each holding its epoch; returns {name: (path, sha256)}."""
    out = {}
    for name in names:
        path = tmp_path / name
        epoch = int(name.rsplit("-", 1)[1].removesuffix(".pt"))
        out[name] = (path, save_checkpoint({"model": {"w": torch.full((2,), float(epoch))}, "epoch": epoch}, path))
    return out


def _torn_truncated(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _torn_missing(path):
    path.unlink()


def _torn_hostile(path):
    torch.save({"model": Payload(str(path.with_suffix(".pwned"))), "epoch": 3}, path)


@pytest.mark.parametrize("tear", [_torn_truncated, _torn_missing, _torn_hostile])
def test_a_torn_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, tear):
    saved = _epochs(tmp_path, "attempt-1-epoch-1.pt", "attempt-1-epoch-2.pt", "attempt-1-epoch-3.pt")
    newest, sha = saved["attempt-1-epoch-3.pt"]
    assert latest_usable_checkpoint(newest, sha, 3).state["epoch"] == 3  # intact: used as recorded
    tear(newest)
    point = latest_usable_checkpoint(newest, sha, 3)
    assert point.path == saved["attempt-1-epoch-2.pt"][0] and point.state["epoch"] == 2
    assert len(point.rejected) == 1 and point.rejected[0].startswith("attempt-1-epoch-3.pt: ")
    assert not list(tmp_path.glob("*.pwned"))


def test_fallback_skips_unverifiable_and_unrecorded_files_and_may_find_nothing(tmp_path):
    saved = _epochs(tmp_path, "attempt-1-epoch-1.pt", "attempt-1-epoch-2.pt", "attempt-2-epoch-3.pt",
                    "attempt-1-epoch-4.pt")  # epoch 4: written by a lost attempt that never recorded it
    newest, sha = saved["attempt-2-epoch-3.pt"]
    newest.write_bytes(b"torn")
    (tmp_path / "attempt-1-epoch-2.pt.sha256").unlink()  # its write never finished
    point = latest_usable_checkpoint(newest, sha, 3)
    assert point.state["epoch"] == 1 and len(point.rejected) == 2
    saved["attempt-1-epoch-1.pt"][0].write_bytes(b"also torn")
    nothing = latest_usable_checkpoint(newest, sha, 3)
    assert nothing.state is None and nothing.path is None and len(nothing.rejected) == 3


def test_prune_keeps_the_last_two_and_any_later_epoch(tmp_path):
    _epochs(tmp_path, "attempt-1-epoch-1.pt", "attempt-1-epoch-2.pt", "attempt-2-epoch-2.pt", "attempt-2-epoch-3.pt",
            "attempt-3-epoch-4.pt")
    keep = {tmp_path / "attempt-1-epoch-2.pt", tmp_path / "attempt-2-epoch-3.pt"}
    prune_checkpoints(tmp_path, keep, up_to_epoch=3)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == [
        "attempt-1-epoch-2.pt", "attempt-2-epoch-3.pt", "attempt-3-epoch-4.pt"]
    assert sorted(p.name for p in tmp_path.glob("*.sha256")) == [
        "attempt-1-epoch-2.pt.sha256", "attempt-2-epoch-3.pt.sha256", "attempt-3-epoch-4.pt.sha256"]
