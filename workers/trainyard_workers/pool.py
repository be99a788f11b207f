"""This host's worker pool: find the GPUs (NVML, never CUDA: the pool forks its workers), and plan one
Celery worker per GPU (or per group of GPUs), pinned with CUDA_VISIBLE_DEVICES, named gpu<N>@<host>,
consuming its GPU type's queue and the generic one; or one CPU worker on the `cpu` queues."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from trainyard.gpus import Device
from trainyard.specs import dispatch_queue

MAX_DEVICES_PER_JOB = 8  # specs.Resources.gpus' upper bound
class PoolError(ValueError):
    """A pool that cannot be built as asked (an unknown device, a group size that does not divide)."""


@dataclass(frozen=True)
class WorkerPlan:
    name: str  # Celery node name
    queues: list[str]
    env: dict[str, str] = field(default_factory=dict)
    devices: list[Device] = field(default_factory=list)

    def describe(self) -> str:
        what = ", ".join(f"{d.index}: {d.name}" for d in self.devices) or "CPU"
        pinned = " ".join(f"{k}={v!r}" for k, v in sorted(self.env.items()))
        return f"{self.name}  [{what}]  queues {','.join(self.queues)}  {pinned}"


def parse_indices(text: str) -> list[int]:
    try:
        indices = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise PoolError(f"--gpus takes device indices like 0,2, not {text!r}") from None
    if len(set(indices)) != len(indices):
        raise PoolError(f"--gpus names a device twice: {text!r}")
    return indices


def plan_workers(devices: Sequence[Device], *, host: str, gpus: Sequence[int] | None = None,
                 queues: Sequence[str] | None = None, gpus_per_worker: int = 1) -> list[WorkerPlan]:
    """The workers to start on this host; `gpus` picks devices by index, `queues` overrides the defaults."""
    if not 1 <= gpus_per_worker <= MAX_DEVICES_PER_JOB:
        raise PoolError(f"--gpus-per-worker must be 1 to {MAX_DEVICES_PER_JOB}, not {gpus_per_worker}")
    by_index = {d.index: d for d in devices}
    if gpus:
        unknown = [i for i in gpus if i not in by_index]
        if unknown:
            found = ", ".join(f"{d.index} ({d.name})" for d in devices) or "none"
            raise PoolError(f"no GPU with index {', '.join(map(str, unknown))} on {host}; GPUs found: {found}")
    chosen = [by_index[i] for i in gpus] if gpus else list(devices)
    if not chosen:
        # A CPU worker runs a job of any size (N gloo processes), so it also serves <queue>.x2 … .x8.
        base = list(queues) if queues else ["cpu"]
        names = base if queues else [dispatch_queue(q, n) for q in base for n in range(1, MAX_DEVICES_PER_JOB + 1)]
        return [WorkerPlan(f"cpu@{host}", names, {"CUDA_VISIBLE_DEVICES": ""})]
    if len(chosen) % gpus_per_worker:
        raise PoolError(f"{len(chosen)} GPU(s) do not split into workers of {gpus_per_worker}")
    plans = []
    for start in range(0, len(chosen), gpus_per_worker):
        group = chosen[start:start + gpus_per_worker]
        types = sorted({d.type for d in group})
        if queues:
            names = list(queues)
        else:
            # A group of mixed models serves only the generic queue: no job asked for that mix by name.
            base = ([f"gpu.{types[0]}"] if len(types) == 1 else []) + ["gpu"]
            names = [dispatch_queue(q, gpus_per_worker) for q in base]
        label = "-".join(str(d.index) for d in group)
        plans.append(WorkerPlan(
            f"gpu{label}@{host}", names,
            {"CUDA_VISIBLE_DEVICES": ",".join(str(d.index) for d in group), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
            list(group)))
    return plans
