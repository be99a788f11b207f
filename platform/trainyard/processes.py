"""A small supervisor for the processes `trainyard up` and the worker pool start: start, watch, stop cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass
class Child:
    name: str
    process: subprocess.Popen


class ProcessGroup:
    """Children run in their own sessions, so a terminal's Ctrl-C reaches only the supervisor,
    which then stops them in order (SIGTERM, then SIGKILL to the child's group after `grace` seconds)."""

    def __init__(self, grace: float = 20.0) -> None:
        self.grace = grace
        self.children: list[Child] = []
        self._stopping = False

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Child:
        process = subprocess.Popen(
            list(argv), env={**os.environ, **(env or {})}, start_new_session=True
        )
        child = Child(name, process)
        self.children.append(child)
        return child

    def first_exited(self) -> Child | None:
        return next((c for c in self.children if c.process.poll() is not None), None)

    def wait(self) -> Child | None:
        """Block until a child exits or a SIGINT/SIGTERM arrives; returns the child that exited, if any."""
        signalled: list[int] = []

        def _on_signal(signum, _frame):
            signalled.append(signum)

        previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not signalled:
                exited = self.first_exited()
                if exited is not None:
                    return exited
                time.sleep(0.2)
            return None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stop(self) -> None:
        """SIGTERM every child (last started first), wait up to `grace` seconds, SIGKILL the rest."""
        if self._stopping:
            return
        self._stopping = True
        for child in reversed(self.children):
            if child.process.poll() is None:
                # Only the child's main process: it stops its own helpers in order (Celery's warm
                # shutdown, gunicorn's workers); the whole group is killed only if it overstays.
                child.process.terminate()
        deadline = time.monotonic() + self.grace
        for child in reversed(self.children):
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(child.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                child.process.wait()
