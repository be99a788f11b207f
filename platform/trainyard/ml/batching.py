"""Dynamic batching for serving: concurrent requests for one model share a forward pass.

One thread per model runs the forwards. It takes the first waiting request and whatever else is queued
at that moment, up to `max_batch` images, and runs them as one batch. A lone request runs at once (no
added latency). Under load, when the caller reports requests already on their way (`arriving`: accepted,
still decoding their images), it waits up to `max_wait` seconds for them: on a CPU a ResNet-18 forward of
8 images costs about what 4 do, so a batch that waits a few milliseconds for its stragglers serves twice
the requests for the same compute.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import torch

_STOP = object()


class MicroBatcher:
    """Runs `forward` on batches gathered from concurrent `submit` calls, one forward at a time."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], *, max_batch: int = 64,
                 name: str = "batcher", arriving: Callable[[], int] = lambda: 0, max_wait: float = 0.005) -> None:
        self._forward = forward
        self.max_batch = max_batch
        self._arriving = arriving
        self.max_wait = max_wait
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self.batches_run = 0  # for tests and the curious: how many forwards served how many requests
        self.requests_served = 0

    def submit(self, batch: torch.Tensor) -> torch.Tensor:
        """`forward(batch)`, computed together with whatever other requests are waiting; blocks until done."""
        return self.enqueue(batch).result()

    def enqueue(self, batch: torch.Tensor) -> Future:
        """Queue `batch` for the next forward; the future's result is its slice of the output."""
        future: Future = Future()
        self._queue.put((batch, future))
        return future

    def close(self) -> None:
        """Stop the thread once the requests already queued are served."""
        self._queue.put(_STOP)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            items, size = [item], len(item[0])
            stop = False
            deadline = None
            while size < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    if self._arriving() <= 0:
                        break
                    deadline = deadline or time.monotonic() + self.max_wait
                    try:
                        more = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break
                if more is _STOP:
                    stop = True
                    break
                items.append(more)
                size += len(more[0])
            self._serve(items)
            if stop:
                return

    def _serve(self, items: list[tuple[torch.Tensor, Future]]) -> None:
        try:
            inputs = items[0][0] if len(items) == 1 else torch.cat([batch for batch, _ in items])
            with torch.inference_mode():
                outputs = self._forward(inputs)
        except BaseException as exc:  # every waiting request hears about it; the thread carries on
            for _, future in items:
                future.set_exception(exc)
            return
        self.batches_run += 1
        self.requests_served += len(items)
        start = 0
        for batch, future in items:
            future.set_result(outputs[start:start + len(batch)])
            start += len(batch)
