"""`python -m trainyard_workers worker|pool|drain|reconciler|sweeper`: one Celery worker, one per GPU on this
host, draining them, the reconciler, and the sweep driver."""

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
    from trainyard_workers import drain

    drain.install_signal_handler()  # first: a drain request must never meet SIGUSR2's default (exit)
    from trainyard_workers.app import create_celery_app

    settings = Settings()
    _require_current_schema(settings)
    app = create_celery_app(settings)
    node = drain.node_name(hostname)
    app.worker_main([
        "worker",
        f"--queues={queues or settings.queue}",
        f"--hostname={node}",
        f"--loglevel={loglevel}",
        "--concurrency=1",
        # Jobs are coordinated through the database, not between workers: no start-up sync of revoked
        # tasks (mingle) and no worker-to-worker heartbeats (gossip). Remote control (drain) still works.
        "--without-mingle", "--without-gossip",
        *_pid_file_option(settings, node),
    ])


def _pid_file_option(settings: Settings, node: str) -> list[str]:
    """`--pidfile` in <data dir>/workers/, so `drain` can find this worker without a broadcast."""
    from trainyard_workers.drain import live_worker_pid, pid_file

    path = pid_file(settings, node)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only data dir: drain still works over a broker that broadcasts
        typer.echo(f"trainyard worker: no pid file ({exc}); drain will need a Redis broker", err=True)
        return []
    if path.exists() and live_worker_pid(path) is None:
        # Left by a killed worker; Celery would refuse to start if its pid now belongs to another process.
        path.unlink(missing_ok=True)
    return [f"--pidfile={path}"]


@cli.command()
def drain(
    hostname: str = typer.Option("", help="Celery node name of the worker to drain (default: every worker "
                                          "on this host)."),
    wait: bool = typer.Option(False, help="Return only once the drained workers have exited."),
    timeout: float = typer.Option(5.0, help="Seconds to wait for workers to answer the drain request."),
) -> None:
    """Let workers finish their running job, take no new one, then exit."""
    from trainyard_workers.drain import DrainError, request_drain, wait_until_exited

    settings = Settings()
    try:
        told = request_drain(settings, hostname, timeout=timeout)
    except DrainError as exc:
        typer.echo(f"trainyard drain: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"trainyard drain: draining {', '.join(told)}")
    if wait:
        wait_until_exited(settings, told)
        typer.echo("trainyard drain: drained")


@cli.command()
def reconciler(once: bool = typer.Option(False, help="Look once and exit.")) -> None:
    """Re-queue (or fail) jobs whose worker was lost, every TRAINYARD_RECONCILE_SECONDS.

    A process of its own rather than a Celery beat task: workers run one long job at a time, so a
    scheduled task could wait hours behind training before it ran.
    """
    import logging
    import time

    from trainyard import reconciling
    from trainyard.queueing import CeleryDispatch

    from trainyard.logging_setup import configure_logging

    configure_logging(logging.INFO)
    log = logging.getLogger("trainyard.reconciler")
    settings = Settings()
    _require_current_schema(settings)
    db, dispatch = Database(settings.database_url, pool_size=1, max_overflow=1), CeleryDispatch(settings)
    wakeups = reconciling.WakeUps()
    log.info("watching for lost jobs every %.1f s", settings.reconcile_seconds)
    while True:
        try:
            report = reconciling.reconcile(db, dispatch, wakeups=wakeups,
                                           stale_after_seconds=settings.worker_stale_seconds)
            if report.requeued or report.failed or report.cancelled:
                log.info("lost jobs: re-queued %s, failed %s, cancelled %s", report.requeued, report.failed,
                         report.cancelled)
            if report.woken:
                log.info("woke stalled queues (messages sent): %s", report.woken)
        except Exception:  # the database or broker is briefly away: try again next round
            log.exception("reconcile round failed")
        if once:
            return
        time.sleep(settings.reconcile_seconds)


@cli.command()
def sweeper(once: bool = typer.Option(False, help="One pass and exit.")) -> None:
    """Drive sweeps: start their trials, end them and register their best model, every TRAINYARD_SWEEP_SECONDS.

    A process of its own, like the reconciler: a sweep outlives any web request, and a Celery task would wait
    behind hours of training. It keeps nothing in memory, so it can be killed and restarted at any time.
    """
    import logging
    import time

    from trainyard import sweep_driver
    from trainyard.logging_setup import configure_logging
    from trainyard.queueing import CeleryDispatch
    from trainyard.tracking import quiet_mlflow

    configure_logging(logging.INFO)
    quiet_mlflow()
    log = logging.getLogger("trainyard.sweeper")
    settings = Settings()
    _require_current_schema(settings)
    db, dispatch = Database(settings.database_url, pool_size=1, max_overflow=1), CeleryDispatch(settings)
    try:
        woken = sweep_driver.wake_queued_trials(db, dispatch)
        if woken:
            log.info("re-sent %d queued trials' messages (a driver before this one may have died before sending)",
                     woken)
    except Exception:
        log.exception("could not re-send queued trials' messages; the reconciler's wake-ups will")
    log.info("driving sweeps every %.1f s", settings.sweep_seconds)
    while True:
        try:
            report = sweep_driver.drive(db, dispatch, settings)
            for sweep_id, job_ids in report.started.items():
                log.info("sweep %s: started trials as jobs %s", sweep_id, job_ids)
            for sweep_id, status in report.ended.items():
                log.info("sweep %s: %s", sweep_id, status)
        except Exception:  # the database or broker is briefly away: try again next pass
            log.exception("sweep pass failed")
        if once:
            return
        time.sleep(settings.sweep_seconds)


@cli.command()
def pool(
    queues: str = typer.Option("", help="Comma-separated queues every worker consumes, instead of "
                                        "gpu.<type>,gpu (GPU) or cpu,cpu.x2…cpu.x8 (CPU)."),
    gpus: str = typer.Option("", help="Device indices to use, e.g. 0,2 (default: every GPU found)."),
    gpus_per_worker: int = typer.Option(1, help="GPUs per worker; a worker of N serves jobs of N devices "
                                               "(queues <queue>.x<N>)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the workers this would start, and exit."),
    loglevel: str = typer.Option("INFO"),
) -> None:
    """Start one worker per GPU (pinned by CUDA_VISIBLE_DEVICES), or one CPU worker; stop them on Ctrl-C."""
    from trainyard.gpus import discover_gpus

    from trainyard_workers.pool import PoolError, parse_indices, plan_workers

    settings = Settings()
    host = socket.gethostname()
    try:
        devices = discover_gpus(settings.simulated_gpus)
        plans = plan_workers(devices, host=host, gpus=parse_indices(gpus) if gpus else None,
                             queues=[q.strip() for q in queues.split(",") if q.strip()] or None,
                             gpus_per_worker=gpus_per_worker)
    except PoolError as exc:
        typer.echo(f"trainyard worker: {exc}", err=True)
        raise typer.Exit(2) from None
    if dry_run:
        for plan in plans:
            typer.echo(plan.describe())
        return
    _require_current_schema(settings)
    group = ProcessGroup()
    for plan in plans:
        group.start(f"worker {plan.name}", [
            sys.executable, "-m", "trainyard_workers", "worker", f"--loglevel={loglevel}",
            f"--hostname={plan.name}", f"--queues={','.join(plan.queues)}",
        ], env=plan.env)
    kind = f"{len(devices)} GPU(s) found" if devices else "no GPU: CPU"
    typer.echo(f"trainyard worker: {len(plans)} worker(s) on {host} ({kind})")
    for plan in plans:
        typer.echo(f"  {plan.describe()}")
    while (exited := group.wait()) is not None and exited.process.returncode == 0:
        # Status 0 is a drained worker: the others carry on until they are drained too.
        group.children.remove(exited)
        typer.echo(f"trainyard worker: {exited.name} drained")
        if not group.children:
            return
    group.stop()
    if exited is not None:
        typer.echo(f"trainyard worker: {exited.name} exited with {exited.process.returncode}", err=True)
        raise typer.Exit(1)


if __name__ == "__main__":
    cli()
