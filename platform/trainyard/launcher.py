"""`trainyard up`: migrate, then run the web app, a worker pool and the MLflow UI on one machine."""

from __future__ import annotations

import os
import socket
import sys
import time

import httpx
from rich.console import Console

from trainyard.auth import bootstrap_admin_token
from trainyard.config import Settings
from trainyard.datasets import ensure_builtin_datasets
from trainyard.db import Database, upgrade_schema
from trainyard.gpus import discover_gpus
from trainyard.processes import ProcessGroup
from trainyard.tracking import prepare_tracking_store


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _child_env(settings: Settings) -> dict[str, str]:
    """Every child gets the resolved settings, so all of them agree on the same stores."""
    return {
        "TRAINYARD_DATA_DIR": str(settings.data_dir),
        "TRAINYARD_DATABASE_URL": settings.database_url,
        "TRAINYARD_BROKER_URL": settings.broker_url,
        "TRAINYARD_MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
        "TRAINYARD_MLFLOW_ARTIFACT_ROOT": settings.mlflow_artifact_root,
        "TRAINYARD_HOST": settings.host,
        "TRAINYARD_PORT": str(settings.port),
        "TRAINYARD_MLFLOW_HOST": settings.mlflow_host,
        "TRAINYARD_MLFLOW_PORT": str(settings.mlflow_port),
        "TRAINYARD_QUEUE": settings.queue,
        "PYTHONUNBUFFERED": "1",
        # MLflow's usage telemetry stays off in every part (see tracking.quiet_mlflow), the MLflow UI included.
        "MLFLOW_DISABLE_TELEMETRY": os.environ.get("MLFLOW_DISABLE_TELEMETRY", "true"),
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"),
    }


def run_embedded(settings: Settings, console: Console, ready_timeout: float = 180.0) -> int:
    """Run the embedded platform until Ctrl-C or a part dies; returns the exit code."""
    settings.ensure_data_dir()
    embedded_mlflow = not settings.mlflow_tracking_uri.startswith(("http://", "https://"))
    wanted = [("web", settings.host, settings.port, "TRAINYARD_PORT")]
    if embedded_mlflow:
        wanted.append(("MLflow UI", "127.0.0.1", settings.mlflow_port, "TRAINYARD_MLFLOW_PORT"))
    for what, host, port, variable in wanted:
        if not _port_free(host, port):
            console.print(f"[red]{host}:{port} is in use[/]; stop what holds it or set {variable} for the {what}.")
            return 2

    if "queue" not in settings.model_fields_set and discover_gpus(settings.simulated_gpus):
        # The pool's workers serve gpu.<type> and gpu here: jobs that name no queue go where they listen.
        settings = settings.model_copy(update={"queue": "gpu"})
    console.print(f"data directory: {settings.data_dir}")
    upgrade_schema(settings.database_url)
    db = Database(settings.database_url)
    try:
        ensure_builtin_datasets(db)
        admin_secret = bootstrap_admin_token(db, settings.admin_token_path)
    finally:
        db.dispose()
    prepare_tracking_store(settings)

    env = _child_env(settings)
    group = ProcessGroup()
    try:
        if embedded_mlflow:
            group.start("mlflow", [
                sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", settings.mlflow_tracking_uri,
                "--default-artifact-root", settings.mlflow_artifact_root,
                # The MLflow UI has no login of its own: it stays on this machine whatever TRAINYARD_HOST says.
                "--host", "127.0.0.1", "--port", str(settings.mlflow_port), "--workers", "1",
            ], env)
        group.start("worker", [sys.executable, "-m", "trainyard_workers", "pool"], env)
        group.start("reconciler", [sys.executable, "-m", "trainyard_workers", "reconciler"], env)
        group.start("sweeper", [sys.executable, "-m", "trainyard_workers", "sweeper"], env)
        group.start("web", [
            sys.executable, "-m", "gunicorn", "--bind", f"{settings.host}:{settings.port}",
            "--workers", str(settings.web_workers), "--threads", "4", "--access-logfile", "-",
            "trainyard_web:create_app()",
        ], env)

        web_url = f"http://{settings.host}:{settings.port}"
        mlflow_url = f"http://127.0.0.1:{settings.mlflow_port}" if embedded_mlflow else None
        checks = [f"{web_url}/api/v1/health"] + ([f"{mlflow_url}/health"] if mlflow_url else [])
        if not _wait_ready(group, checks, ready_timeout, console):
            return 1
        console.print(f"[green]Trainyard is up[/]\n"
                      f"  web UI   {web_url}/\n"
                      f"  REST API {web_url}/api/v1  (OpenAPI: {web_url}/api/v1/openapi.json)\n"
                      f"  MLflow   {mlflow_url or settings.mlflow_tracking_uri}\n"
                      f"  broker   {settings.broker_url}\n"
                      f"  workers  one per GPU, or one on the CPU (`trainyard worker`); "
                      f"jobs that name no queue go to {settings.queue!r}\n"
                      f"Press Ctrl-C to stop.", soft_wrap=True)
        if admin_secret:
            console.print(f"[bold]admin token[/] (shown once; also in {settings.admin_token_path}, mode 0600):\n"
                          f"  {admin_secret}\n"
                          f"Log in to the web UI with it; the CLI on this machine finds it by itself.", soft_wrap=True)
        else:
            console.print(f"admin token: in {settings.admin_token_path}", soft_wrap=True)
        exited = group.wait()
        while exited is not None and exited.name == "worker" and exited.process.returncode == 0:
            # `trainyard worker --drain` ends the pool cleanly; the web UI and API stay up to show the jobs.
            console.print("worker pool drained; jobs stay queued until a worker starts "
                          "(`trainyard worker`). The rest keeps running.")
            group.children.remove(exited)
            exited = group.wait()
        if exited is not None:
            console.print(f"[red]{exited.name} exited with code {exited.process.returncode}; stopping the rest[/]")
            return 1
        console.print("stopping…")
        return 0
    finally:
        group.stop()
        console.print("stopped.")


def _wait_ready(group: ProcessGroup, urls: list[str], timeout: float, console: Console) -> bool:
    deadline = time.monotonic() + timeout
    pending = list(urls)
    while pending:
        exited = group.first_exited()
        if exited is not None:
            console.print(f"[red]{exited.name} exited with code {exited.process.returncode} while starting[/]")
            return False
        if time.monotonic() > deadline:
            console.print(f"[red]not ready after {timeout:.0f}s[/]: {', '.join(pending)}")
            return False
        try:
            # Any answer, even 503 from a degraded health check, means the server listens.
            httpx.get(pending[0], timeout=2)
            pending.pop(0)
        except httpx.HTTPError:
            time.sleep(0.5)
    return True
