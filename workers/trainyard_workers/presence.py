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
from trainyard_workers import gpu_stats

log = logging.getLogger(__name__)
BEAT_SECONDS = 5.0


def describe_device(simulated_gpus: str | None = None) -> tuple[str, int | None]:
    """The GPU(s) this process is pinned to by CUDA_VISIBLE_DEVICES, read through NVML (so CUDA is never
    initialised in a process that forks), or the CPU."""
    from trainyard.gpus import discover_gpus

    visible = gpu_stats.pinned_devices()
    if visible:
        found = {d.index: d for d in discover_gpus(simulated_gpus)}
        mine = [found[i] for i in visible if i in found]
        if not mine:
            return f"GPU {','.join(map(str, visible))} (not found by NVML)", None
        names = sorted({d.name for d in mine})
        name = names[0] if len(names) == 1 else " + ".join(names)
        return (name if len(mine) == 1 else f"{len(mine)}× {name}"), mine[0].memory_mb
    return f"CPU ({os.cpu_count()} cores)", None


class Presence:
    """Registers the worker and beats for it until stopped."""

    def __init__(self, settings: Settings, name: str, queues: list[str]) -> None:
        self.settings, self.name, self.queues = settings, name, queues
        self._stopped = threading.Event()
        self._db: Database | None = None

    def start(self) -> None:
        self._db = Database(self.settings.database_url, pool_size=1, max_overflow=1)  # one heartbeat thread
        try:
            self._register()
        except Exception:  # the registry is for people; a database hiccup must not stop the worker
            log.exception("could not register worker %s", self.name)
        threading.Thread(target=self._beat, name="worker-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        while not self._stopped.wait(BEAT_SECONDS):
            try:
                gpu = gpu_stats.read_gpu()  # NVML only; all None on a CPU worker
                if not worker_registry.heartbeat(self._db, self.name, gpu_utilization=gpu.utilization,
                                                 gpu_memory_used_mb=gpu.memory_used_mb):
                    self._register()  # its row was removed (a wiped database): register again
            except Exception:
                log.warning("worker heartbeat failed; trying again in %.0f s", BEAT_SECONDS, exc_info=True)

    def _register(self) -> None:
        device, memory = describe_device(self.settings.simulated_gpus)
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
