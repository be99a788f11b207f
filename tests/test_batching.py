"""Dynamic batching: concurrent requests share forwards, each gets its own rows back, errors reach everyone."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from trainyard.ml.batching import MicroBatcher


def test_concurrent_requests_share_forwards_and_get_their_own_rows():
    release = threading.Event()
    sizes: list[int] = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        sizes.append(len(x))
        release.wait(5)  # the first forward holds on while the other requests queue up behind it
        return x * 2

    batcher = MicroBatcher(forward, max_batch=64)
    inputs = [torch.full((1 + i % 3, 4), float(i)) for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(batcher.submit, x) for x in inputs]
        while batcher._queue.qsize() < 11:  # noqa: SLF001 - wait until all but the running one are queued
            threading.Event().wait(0.01)
        release.set()
        results = [f.result(timeout=10) for f in futures]
    for x, y in zip(inputs, results):
        assert torch.equal(y, x * 2)
    # One request alone, then the eleven that queued during it, together.
    assert sizes[0] == len(inputs[0]) and sum(sizes) == sum(len(x) for x in inputs)
    assert len(sizes) == 2 and batcher.batches_run == 2 and batcher.requests_served == 12
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


def test_the_batch_size_is_capped():
    release = threading.Event()
    sizes: list[int] = []

    def forward(x):
        sizes.append(len(x))
        release.wait(5)
        return x

    batcher = MicroBatcher(forward, max_batch=4)
    with ThreadPoolExecutor(9) as pool:
        futures = [pool.submit(batcher.submit, torch.zeros(1, 2)) for _ in range(9)]
        while batcher._queue.qsize() < 8:  # noqa: SLF001
            threading.Event().wait(0.01)
        release.set()
        [f.result(timeout=10) for f in futures]
    assert sizes == [1, 4, 4]
    batcher.close()
