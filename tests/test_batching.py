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


class Arrivals:
    """The count a server reports of requests accepted and not yet queued (decoding their images)."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __call__(self) -> int:
        return self.count


def test_a_forward_waits_for_requests_already_on_their_way():
    sizes: list[int] = []
    arrivals = Arrivals(2)
    batcher = MicroBatcher(lambda x: sizes.append(len(x)) or x, arriving=arrivals, max_wait=5.0)
    first = batcher.enqueue(torch.zeros(1, 2))
    arrivals.count = 1
    time.sleep(0.05)  # the second is still decoding: without the wait, the first would run alone
    second = batcher.enqueue(torch.ones(1, 2))
    arrivals.count = 0
    assert torch.equal(first.result(timeout=10), torch.zeros(1, 2))
    assert torch.equal(second.result(timeout=10), torch.ones(1, 2))
    assert sizes == [2]
    batcher.close()


def test_a_lone_request_does_not_wait_and_a_straggler_is_waited_for_at_most_max_wait():
    sizes: list[int] = []
    arrivals = Arrivals(0)
    batcher = MicroBatcher(lambda x: sizes.append(len(x)) or x, arriving=arrivals, max_wait=30.0)
    started = time.monotonic()
    batcher.submit(torch.zeros(1, 2))
    assert time.monotonic() - started < 15, "a lone request waited for max_wait"
    batcher.close()

    arrivals.count = 1  # reported, but it never comes (its image failed to decode, say)
    batcher = MicroBatcher(lambda x: sizes.append(len(x)) or x, arriving=arrivals, max_wait=0.3)
    started = time.monotonic()
    batcher.submit(torch.zeros(1, 2))
    assert 0.3 <= time.monotonic() - started < 15
    assert sizes == [1, 1]
    batcher.close()
