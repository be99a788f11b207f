"""The host's GPUs as NVML lists them (never through CUDA, so a process that forks stays CUDA-free)."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Words in NVML's device names that say nothing about the model ("NVIDIA GeForce RTX 4090").
_VENDOR_WORDS = {"nvidia", "geforce", "tesla", "quadro"}
_SERIES_WORDS = {"rtx", "gtx", "titan"}


@dataclass(frozen=True)
class Device:
    index: int  # CUDA's index with CUDA_DEVICE_ORDER=PCI_BUS_ID, which is NVML's order
    name: str
    memory_mb: int | None

    @property
    def type(self) -> str:
        return gpu_type(self.name)


def gpu_type(name: str) -> str:
    """A queue-friendly GPU model: "NVIDIA H100 80GB HBM3" → h100, "NVIDIA GeForce RTX 4090" → rtx4090."""
    words = [w for w in re.findall(r"[a-z0-9]+", name.lower()) if w not in _VENDOR_WORDS]
    if not words:
        return "unknown"
    if words[0] in _SERIES_WORDS and len(words) > 1:
        return words[0] + words[1]
    return words[0]


def parse_simulated(spec: str) -> list[Device]:
    """`name[:memory_mb],…` → devices, for a machine without GPUs (tests, demos of the pool)."""
    devices = []
    for index, item in enumerate(part.strip() for part in spec.split(",") if part.strip()):
        name, _, memory = item.rpartition(":") if re.search(r":\d+$", item) else (item, "", "")
        devices.append(Device(index, name, int(memory) if memory else None))
    return devices


def discover_gpus(simulated: str | None = None) -> list[Device]:
    """This host's GPUs through NVML (no CUDA context is made); [] without a driver. `simulated` stands in
    for NVML where there is no GPU."""
    if simulated:
        return parse_simulated(simulated)
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no NVML library or no driver: a CPU host
        return []
    try:
        devices = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total // 2**20
            devices.append(Device(index, name.decode() if isinstance(name, bytes) else name, int(memory)))
        return devices
    finally:
        pynvml.nvmlShutdown()
