"""Dynamic batching: concurrent requests share forwards, each gets its own rows back, errors reach everyone."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from trainyard.ml.batching import MicroBatcher


class GatedForward:
    """A forward that records batch sizes and holds its first call until released, so the requests sent
    meanwhile are sure to be queued behind it."""

    def __init__(self, fn=lambda x: x * 2) -> None:
        self.fn, self.sizes = fn, []
        self.started, self.release = threading.Event(), threading.Event()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(x))
        self.started.set()
        assert self.release.wait(10), "never released"
        return self.fn(x)


def run_gated(batcher: MicroBatcher, forward: GatedForward, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The first input alone, then the rest while its forward is held; all results."""
    with ThreadPoolExecutor(len(inputs)) as pool:
        first = pool.submit(batcher.submit, inputs[0])
        assert forward.started.wait(10)
        rest = [pool.submit(batcher.submit, x) for x in inputs[1:]]
        deadline = time.monotonic() + 10
        while batcher._queue.qsize() < len(rest):  # noqa: SLF001 - wait until they are all queued
            assert time.monotonic() < deadline, "requests never queued"
            time.sleep(0.01)
        forward.release.set()
        return [f.result(timeout=10) for f in [first, *rest]]


def test_concurrent_requests_share_forwards_and_get_their_own_rows():
    forward = GatedForward()
    batcher = MicroBatcher(forward, max_batch=64)
    inputs = [torch.full((1 + i % 3, 4), float(i)) for i in range(12)]
    results = run_gated(batcher, forward, inputs)
    for x, y in zip(inputs, results):
        assert torch.equal(y, x * 2)
    # One request alone, then the eleven that queued during it, together in one forward.
    assert forward.sizes == [len(inputs[0]), sum(len(x) for x in inputs[1:])]
    assert (batcher.batches_run, batcher.requests_served) == (2, 12)
    batcher.close()


def test_the_batch_size_is_capped():
    forward = GatedForward()
    batcher = MicroBatcher(forward, max_batch=4)
    run_gated(batcher, forward, [torch.zeros(1, 2) for _ in range(9)])
    assert forward.sizes == [1, 4, 4]
    batcher.close()


def test_a_failing_forward_fails_each_waiting_request_and_the_batcher_carries_on():
    def forward(x: torch.Tensor) -> torch.Tensor:
        if (x < 0).any():
            raise ValueError("negative input")
        return x + 1

    batcher = MicroBatcher(forward)
    with pytest.raises(ValueError, match="negative input"):
        batcher.submit(torch.tensor([[-1.0]]))
    assert torch.equal(batcher.submit(torch.tensor([[1.0]])), torch.tensor([[2.0]]))
    batcher.close()
