"""A worker's row in the platform's worker registry: registered when Celery is ready, kept fresh by a
heartbeat thread in the worker's main process, marked stopped on shutdown. The job it runs is set by the
pool process that trains (see engine.run_job)."""

from __future__ import annotations

import logging
import os
import socket
import threading

from trainyard import worker_registry
from trainyard.config import Settings
from trainyard.db import Database

log = logging.getLogger(__name__)
BEAT_SECONDS = 5.0


def describe_device() -> tuple[str, int | None]:
    """The GPU this process is pinned to (by CUDA_VISIBLE_DEVICES, read through NVML so CUDA is never
    initialised in a process that forks), or the CPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if visible and visible.split(",")[0].isdigit():
        try:
            import pynvml

            pynvml.nvmlInit()
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(int(visible.split(",")[0]))
                name = pynvml.nvmlDeviceGetName(handle)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total // 2**20
                return (name.decode() if isinstance(name, bytes) else name), int(memory)
            finally:
                pynvml.nvmlShutdown()
        except Exception as exc:  # no driver, or a simulated device list: say what we know
            return f"GPU {visible} ({type(exc).__name__})", None
    return f"CPU ({os.cpu_count()} cores)", None


class Presence:
    """Registers the worker and beats for it until stopped."""

    def __init__(self, settings: Settings, name: str, queues: list[str]) -> None:
        self.settings, self.name, self.queues = settings, name, queues
        self._stopped = threading.Event()
        self._db: Database | None = None

    def start(self) -> None:
        self._db = Database(self.settings.database_url)
        try:
            self._register()
        except Exception:  # the registry is for people; a database hiccup must not stop the worker
            log.exception("could not register worker %s", self.name)
        threading.Thread(target=self._beat, name="worker-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        while not self._stopped.wait(BEAT_SECONDS):
            try:
                if not worker_registry.heartbeat(self._db, self.name):
                    self._register()  # its row was removed (a wiped database): register again
            except Exception:
                log.warning("worker heartbeat failed; trying again in %.0f s", BEAT_SECONDS, exc_info=True)

    def _register(self) -> None:
        device, memory = describe_device()
        worker_registry.register_worker(self._db, name=self.name, host=socket.gethostname(), device=device,
                                        device_memory_mb=memory, queues=self.queues)

    def stop(self) -> None:
        self._stopped.set()
        if self._db is not None:
            try:
                worker_registry.worker_stopped(self._db, self.name)
            except Exception:
                log.warning("could not mark worker %s stopped", self.name, exc_info=True)
            self._db.dispose()
