"""How busy this worker's GPU is, read through NVML for the heartbeat. Never through CUDA: the worker's main
process forks its pool children, and a CUDA context must not cross a fork."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuReading:
    utilization: float | None = None  # percent of the last sample period the GPU was busy
    memory_used_mb: int | None = None


NO_READING = GpuReading()


def pinned_devices() -> list[int]:
    """The device indices CUDA_VISIBLE_DEVICES pins this process to; [] on a CPU worker."""
    return [int(i) for i in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if i.strip().isdigit()]


def read_gpu(devices: list[int] | None = None) -> GpuReading:
    """Utilisation and memory in use of the pinned GPU(s); NO_READING on a CPU worker or without NVML.

    A worker of several GPUs reports their mean utilisation and the most memory used on any one of them
    (the number that matters against one device's total).
    """
    devices = pinned_devices() if devices is None else devices
    if not devices:
        return NO_READING
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no library or no driver (a simulated pool): nothing to read
        return NO_READING
    try:
        busy, used = [], []
        for index in devices:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            busy.append(float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))
            used.append(int(pynvml.nvmlDeviceGetMemoryInfo(handle).used) // 2**20)
        return GpuReading(utilization=sum(busy) / len(busy), memory_used_mb=max(used))
    except Exception as exc:  # a device that vanished or an old driver: report nothing rather than fail
        log.debug("no GPU reading for devices %s: %s", devices, exc)
        return NO_READING
    finally:
        pynvml.nvmlShutdown()
