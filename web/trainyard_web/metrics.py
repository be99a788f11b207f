"""`GET /metrics`: the platform's queues, jobs and workers in Prometheus' text format, read from the database
at scrape time (so every web process answers the same, and nothing is counted in process memory)."""

from __future__ import annotations

from collections.abc import Iterator

from apiflask import APIBlueprint, APIFlask
from flask import Response, current_app
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from trainyard.auth import Role
from trainyard.platform_metrics import platform_numbers

from trainyard_web.runtime import EXTENSION_KEY
from trainyard_web.security import requires

REGISTRY_KEY = "trainyard.metrics"
MB = 2**20

# Not an /api/v1 route, and not in the OpenAPI document: it answers Prometheus' text format, not JSON.
metrics_api = APIBlueprint("metrics", __name__, enable_openapi=False)


@metrics_api.get("/metrics")
@requires(Role.VIEWER)
def metrics():
    return Response(generate_latest(current_app.extensions[REGISTRY_KEY]), content_type=CONTENT_TYPE_LATEST)


def install(app: APIFlask) -> None:
    """Give `app` its own metrics registry (none is global: two apps in one process never mix numbers)."""
    registry = CollectorRegistry(auto_describe=False)  # no describe(): nothing is read until a scrape
    registry.register(PlatformCollector(app))
    app.extensions[REGISTRY_KEY] = registry
    app.register_blueprint(metrics_api)


def device_type(device: str) -> str:
    """The worker's device without its host's core count: "CPU", or the GPU model ("2× NVIDIA A100")."""
    return "CPU" if device.startswith("CPU") else device


class PlatformCollector(Collector):
    def __init__(self, app: APIFlask) -> None:
        self._app = app

    def collect(self) -> Iterator[Metric]:
        p = self._app.extensions[EXTENSION_KEY]
        numbers = platform_numbers(p.db, stale_after_seconds=p.settings.worker_stale_seconds)

        queued = GaugeMetricFamily("trainyard_queue_depth", "Jobs waiting (QUEUED) in each queue", labels=["queue"])
        running = GaugeMetricFamily("trainyard_queue_running_jobs", "Jobs RUNNING from each queue", labels=["queue"])
        for queue in numbers.queues:
            queued.add_metric([queue.name], queue.queued)
            running.add_metric([queue.name], queue.running)
        yield from (queued, running)

        by_status = GaugeMetricFamily("trainyard_jobs", "Jobs in the database by status", labels=["status"])
        for status, count in numbers.jobs_by_status.items():
            by_status.add_metric([status], count)
        yield by_status

        durations = HistogramMetricFamily(
            "trainyard_job_duration_seconds", "Finished jobs' run time (finished_at - started_at of the last "
            "attempt) by kind and final status", labels=["kind", "status"])
        for h in numbers.durations:
            durations.add_metric([h.kind, h.status], [(repr(bound), n) for bound, n in h.buckets] + [("+Inf", h.count)],
                                 sum_value=h.sum_seconds)
        yield durations

        alive = GaugeMetricFamily("trainyard_workers_alive", "Live workers (not stopped, heartbeat within "
                                  "TRAINYARD_WORKER_STALE_SECONDS) by device", labels=["device"])
        per_device: dict[str, int] = {}
        for worker in numbers.workers:  # every device ever seen, so a lost pool shows as 0, not as no data
            key = device_type(worker.device)
            per_device[key] = per_device.get(key, 0) + worker.alive
        for device, count in sorted(per_device.items()):
            alive.add_metric([device], count)
        yield alive

        labels = ["worker", "host", "device"]
        utilization = GaugeMetricFamily("trainyard_worker_gpu_utilization_ratio",
                                        "GPU utilisation (0-1) at the worker's last heartbeat (NVML)", labels=labels)
        used = GaugeMetricFamily("trainyard_worker_gpu_memory_used_bytes", "GPU memory in use at the worker's "
                                 "last heartbeat", labels=labels)
        total = GaugeMetricFamily("trainyard_worker_gpu_memory_total_bytes", "The worker's GPU memory", labels=labels)
        for worker in numbers.workers:
            if not worker.alive:  # a lost worker's last reading is not its GPU's state now
                continue
            key = [worker.name, worker.host, worker.device]
            if worker.gpu_utilization is not None:
                utilization.add_metric(key, worker.gpu_utilization / 100.0)
            if worker.gpu_memory_used_mb is not None:
                used.add_metric(key, worker.gpu_memory_used_mb * MB)
            if worker.device_memory_mb is not None:
                total.add_metric(key, worker.device_memory_mb * MB)
        yield from (utilization, used, total)
