"""`python -m trainyard_workers worker|pool`: one Celery worker, or one per GPU on this host."""

from __future__ import annotations

import socket
import sys

import typer

from trainyard.config import Settings
from trainyard.db import Database, check_schema
from trainyard.errors import SchemaOutOfDate
from trainyard.processes import ProcessGroup

cli = typer.Typer(add_completion=False, help="Trainyard worker processes.")


def _require_current_schema(settings: Settings) -> None:
    db = Database(settings.database_url)
    try:
        check_schema(db)
    except SchemaOutOfDate as exc:
        typer.echo(f"trainyard worker: {exc.detail}", err=True)
        raise typer.Exit(2) from None
    finally:
        db.dispose()


@cli.command()
def worker(
    queues: str = typer.Option("", help="Comma-separated queues (default: the settings' queue)."),
    hostname: str = typer.Option("", help="Celery node name (default: cpu@<host>)."),
    loglevel: str = typer.Option("INFO"),
) -> None:
    """Run one Celery worker: one job at a time, prefetch 1."""
    from trainyard_workers.app import create_celery_app

    settings = Settings()
    _require_current_schema(settings)
    app = create_celery_app(settings)
    app.worker_main([
        "worker",
        f"--queues={queues or settings.queue}",
        f"--hostname={hostname or 'cpu@' + socket.gethostname()}",
        f"--loglevel={loglevel}",
        "--concurrency=1",
    ])


@cli.command()
def reconciler(once: bool = typer.Option(False, help="Look once and exit.")) -> None:
    """Re-queue (or fail) jobs whose worker was lost, every TRAINYARD_RECONCILE_SECONDS.

    A process of its own rather than a Celery beat task: workers run one long job at a time, so a
    scheduled task could wait hours behind training before it ran.
    """
    import logging
    import time

    from trainyard import jobs
    from trainyard.queueing import CeleryDispatch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s reconciler: %(message)s")
    log = logging.getLogger("trainyard.reconciler")
    settings = Settings()
    _require_current_schema(settings)
    db, dispatch = Database(settings.database_url), CeleryDispatch(settings)
    log.info("watching for lost jobs every %.1f s", settings.reconcile_seconds)
    while True:
        try:
            requeued = jobs.requeue_lost_jobs(db, dispatch)
            if requeued:
                log.info("re-queued lost jobs %s", requeued)
        except Exception:  # the database or broker is briefly away: try again next round
            log.exception("reconcile round failed")
        if once:
            return
        time.sleep(settings.reconcile_seconds)


def gpu_count() -> int:
    """GPUs visible to this host (NVML when available, else torch)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML library or no driver: ask torch, which is 0 on a CPU-only machine
        import torch

        return torch.cuda.device_count()


@cli.command()
def pool(
    queues: str = typer.Option("", help="Comma-separated queues (default: the settings' queue)."),
    loglevel: str = typer.Option("INFO"),
) -> None:
    """Start one worker per GPU (pinned by CUDA_VISIBLE_DEVICES), or one CPU worker; stop them on Ctrl-C."""
    settings = Settings()
    _require_current_schema(settings)
    host = socket.gethostname()
    gpus = gpu_count()
    group = ProcessGroup()
    base = [sys.executable, "-m", "trainyard_workers", "worker", f"--loglevel={loglevel}"]
    if queues:
        base.append(f"--queues={queues}")
    if gpus == 0:
        group.start("worker cpu", [*base, f"--hostname=cpu@{host}"], env={"CUDA_VISIBLE_DEVICES": ""})
    for index in range(gpus):
        group.start(f"worker gpu{index}", [*base, f"--hostname=gpu{index}@{host}"],
                    env={"CUDA_VISIBLE_DEVICES": str(index)})
    typer.echo(f"trainyard pool: {max(gpus, 1)} worker(s) on {host} ({'%d GPU(s)' % gpus if gpus else 'CPU'})")
    exited = group.wait()
    group.stop()
    if exited is not None:
        typer.echo(f"trainyard pool: {exited.name} exited with {exited.process.returncode}", err=True)
        raise typer.Exit(1)


if __name__ == "__main__":
    cli()
