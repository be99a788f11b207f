"""The `trainyard` command: run the platform (`up`, `worker`, `db`) and use it over REST (`submit`, `status`, `jobs`)."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from trainyard.api_client import request
from trainyard.cli_db import db_app
from trainyard.cli_logs import logs
from trainyard.cli_sweeps import sweeps_app
from trainyard.cli_tokens import admin_token, tokens_app
from trainyard.config import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Trainyard: train and serve image models.")
app.add_typer(db_app, name="db")
datasets_app = typer.Typer(no_args_is_help=True, help="Registered datasets.")
app.add_typer(datasets_app, name="datasets")
models_app = typer.Typer(no_args_is_help=True, help="The model registry: versions, aliases, promotion.")
app.add_typer(models_app, name="models")
app.add_typer(tokens_app, name="tokens")
app.add_typer(sweeps_app, name="sweeps")
app.command("admin-token")(admin_token)
app.command("logs")(logs)
console = Console()
err = Console(stderr=True)

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED", "PRUNED"}


def main() -> None:
    app()


# ---- running the platform ---------------------------------------------------------------------------


@app.command()
def worker(
    queues: str = typer.Option("", help="Comma-separated queues every worker consumes (default: gpu.<type>,gpu "
                                        "per GPU worker; cpu,cpu.x2…cpu.x8 on a host without GPUs)."),
    gpus: str = typer.Option("", help="Device indices to use, e.g. 0,2 (default: every GPU found)."),
    gpus_per_worker: int = typer.Option(1, help="GPUs per worker process, for jobs of that many devices (DDP)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the workers this would start, and exit."),
    drain: bool = typer.Option(False, "--drain", help="Instead of starting workers: let this host's running "
                               "workers finish their current job, take no new one, then exit."),
    hostname: str = typer.Option("", help="With --drain: one worker's Celery node name (any host, on Redis)."),
    wait: bool = typer.Option(False, help="With --drain: return only once the workers have exited."),
) -> None:
    """Start this host's worker pool: one Celery worker per GPU (pinned with CUDA_VISIBLE_DEVICES, named
    gpu<N>@<host>), or one on the CPU; or drain it."""
    if drain:
        argv = [sys.executable, "-m", "trainyard_workers", "drain",
                *([f"--hostname={hostname}"] if hostname else []), *(["--wait"] if wait else [])]
    else:
        argv = [sys.executable, "-m", "trainyard_workers", "pool", f"--gpus-per-worker={gpus_per_worker}",
                *([f"--queues={queues}"] if queues else []), *([f"--gpus={gpus}"] if gpus else []),
                *(["--dry-run"] if dry_run else [])]
    os.execv(sys.executable, argv)


@app.command()
def serve(
    port: int = typer.Option(8001, envvar="TRAINYARD_SERVE_PORT", help="Port of the prediction server."),
    workers: int = typer.Option(2, help="gunicorn processes."),
    threads: int = typer.Option(16, help="Request threads per process: concurrent requests for one model are "
                                         "batched into one forward, so more threads make larger batches."),
) -> None:
    """Run the prediction endpoint on its own, so inference scales apart from the API."""
    settings = Settings()
    if not settings.torch_threads:
        # One share of the cores per process: with torch's default (every core) in each of them, the
        # processes' thread pools fight over the same cores (measured: 111 → 136 predictions/s on 2 cores).
        os.environ["TRAINYARD_TORCH_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    os.execv(sys.executable, [sys.executable, "-m", "gunicorn", "--bind", f"{settings.host}:{port}",
                              "--workers", str(workers), "--threads", str(threads),
                              "trainyard_web:create_serving_app()"])


@app.command()
def up() -> None:
    """Start the web UI and API, one worker and the MLflow UI; Ctrl-C stops them all."""
    from trainyard.launcher import run_embedded

    raise typer.Exit(run_embedded(Settings(), console))


# ---- using the platform over REST -------------------------------------------------------------------


_request = request


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


@app.command()
def submit(
    dataset: str = typer.Option(None, "--dataset", "-d", help="Registered dataset name."),
    architecture: str = typer.Option(None, "--architecture", "-a", help="Registered architecture name."),
    kind: str = typer.Option(None, help="train (default), evaluate or predict."),
    source_job: int = typer.Option(None, help="evaluate: the finished training job whose model to score."),
    split: str = typer.Option(None, help="evaluate: train, val or test (default test)."),
    name: str = typer.Option(None, help="Job name (default: <architecture>-<dataset>)."),
    param: list[str] = typer.Option([], "--param", "-p", help="Hyperparameter as key=value, e.g. -p epochs=5."),
    queue: str = typer.Option(None, help="Queue (resources.queue), e.g. gpu, gpu.h100, cpu."),
    gpus: int = typer.Option(None, help="Devices (resources.gpus, 1–8); more than 1 trains with DDP."),
    priority: str = typer.Option(None, help="low, normal (default) or high: higher starts first in its queue."),
    spec_file: Path = typer.Option(None, "--spec", help="A JSON job spec; options above override its fields."),
    watch: bool = typer.Option(False, "--watch", "-w", help="Follow the job until it ends."),
) -> None:
    """Submit a job (the same fields as POST /api/v1/jobs) and print its id."""
    spec: dict[str, Any] = json.loads(spec_file.read_text()) if spec_file else {}
    spec["kind"] = kind or spec.get("kind", "train")
    for key, value in (("dataset", dataset), ("architecture", architecture), ("name", name),
                       ("priority", priority), ("source_job", source_job), ("split", split)):
        if value is not None:
            spec[key] = value
    resources = spec.setdefault("resources", {})
    if queue is not None:
        resources["queue"] = queue
    if gpus is not None:
        resources["gpus"] = gpus
    params = spec.get("params", {})
    for item in param:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            err.print(f"[red]--param {item!r}[/]: expected key=value, e.g. -p epochs=5")
            raise typer.Exit(2)
        params[key.strip()] = _parse_value(raw.strip())
    if params:
        spec["params"] = params
    job = _request("POST", "/jobs", json=spec)
    console.print(f"submitted job [bold]{job['id']}[/] ({job['name']}): {job['status']}")
    if watch:
        _watch(job["id"])


@app.command()
def status(
    job_id: int = typer.Argument(..., help="Job id."),
    watch: bool = typer.Option(False, "--watch", "-w", help="Show a progress bar until the job ends."),
    as_json: bool = typer.Option(False, "--json", help="Print the job as JSON."),
) -> None:
    """Show a job's status, progress, metrics and history."""
    if watch:
        _watch(job_id)
        return
    job = _request("GET", f"/jobs/{job_id}")
    if as_json:
        console.print_json(data=job)
        return
    _print_job(job)


@app.command()
def cancel(job_id: int = typer.Argument(..., help="Job id.")) -> None:
    """Cancel a job: at once if queued, within a batch if running."""
    job = _request("POST", f"/jobs/{job_id}/cancel")
    console.print(f"job {job_id}: {job['status']}{' (cancelling)' if job['cancel_requested'] and job['status'] == 'RUNNING' else ''}")


@app.command()
def retry(job_id: int = typer.Argument(..., help="Job id."),
          watch: bool = typer.Option(False, "--watch", "-w")) -> None:
    """Run a FAILED or CANCELLED job again, resuming from its last checkpoint."""
    job = _request("POST", f"/jobs/{job_id}/retry")
    console.print(f"job {job_id}: {job['status']} (attempt {job['attempt'] + 1} next)")
    if watch:
        _watch(job_id)


def _print_job(job: dict[str, Any]) -> None:
    progress = job.get("progress") or {}
    console.print(f"job [bold]{job['id']}[/] {job['name']}: [bold]{job['status']}[/] "
                  f"(attempt {job['attempt']}/{job['max_attempts']}, epoch {progress.get('epoch', 0)}/"
                  f"{progress.get('epochs', '?')})")
    for key, value in (job.get("metrics") or {}).items():
        console.print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
    if job.get("mlflow_run_id"):
        console.print(f"  mlflow run: {job['mlflow_run_id']}")
    if job.get("error"):
        console.print(f"  [red]error[/]: {job['error'].splitlines()[0]}")
    for event in job.get("events", []):
        console.print(f"  {event['at']}  {event['from_status'] or '-'} → {event['to_status']}  "
                      f"(attempt {event['attempt']}) {event['message']}")


def _watch(job_id: int, interval: float = 1.0) -> None:
    with Progress(TextColumn("job {task.fields[job]} {task.fields[status]}"), BarColumn(),
                  TextColumn("epoch {task.fields[epoch]}"), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("job", job=job_id, status="", epoch="", total=None)
        while True:
            job = _request("GET", f"/jobs/{job_id}")
            progress = job.get("progress") or {}
            epochs = progress.get("epochs") or None
            # Within an epoch, batches move the bar too: epoch 2 of 5, batch 30 of 40 → 1.75 of 5.
            done = progress.get("epoch", 0)
            if progress.get("batches") and progress.get("batch") and done < (epochs or 0):
                done = min(done + progress["batch"] / progress["batches"], epochs)
            bar.update(task, status=job["status"], total=epochs, completed=done,
                       epoch=f"{progress.get('epoch', 0)}/{epochs or '?'}")
            if job["status"] in TERMINAL:
                break
            time.sleep(interval)
    _print_job(job)
    if job["status"] not in ("SUCCEEDED", "PRUNED"):  # a trial its sweep stopped early did not fail
        raise typer.Exit(1)


@app.command("jobs")
def list_jobs(
    status_filter: str = typer.Option(None, "--status", help="Comma-separated statuses."),
    limit: int = typer.Option(20, min=1, max=200),
) -> None:
    """List jobs, newest first."""
    query = {"limit": limit, **({"status": status_filter} if status_filter else {})}
    page = _request("GET", "/jobs?" + urllib.parse.urlencode(query))
    trials = any(job.get("sweep_id") for job in page["items"])  # the sweep column only when it says something
    table = Table("id", "name", "status", "epoch", "val_accuracy", "attempt", *(["sweep"] if trials else []), "created")
    for job in page["items"]:
        acc = job["metrics"].get("val_accuracy")
        trial = [f"{job['sweep_id']} #{job['trial']}" if job.get("sweep_id") else ""] if trials else []
        table.add_row(str(job["id"]), job["name"], job["status"],
                      f"{job['progress'].get('epoch', 0)}/{job['progress'].get('epochs', '?')}",
                      f"{acc:.4f}" if isinstance(acc, float) else "", f"{job['attempt']}/{job['max_attempts']}",
                      *trial, job["created_at"][:19])
    console.print(table)


@datasets_app.command("register")
def datasets_register(
    name: str = typer.Argument(..., help="Name to register the dataset under."),
    path: Path = typer.Argument(..., help="The dataset's folder (inside TRAINYARD_DATASET_ROOTS)."),
    fmt: str = typer.Option(..., "--format", "-f", help="A dataset format (imagefolder, segmentation, mnist, ...; "
                                                          "the refusal of an unknown one lists them all)."),
) -> None:
    """Scan a folder and register it as a dataset (same as POST /api/v1/datasets)."""
    dataset = _request("POST", "/datasets", json={"name": name, "format": fmt, "path": str(path.expanduser().resolve())})
    _print_dataset(dataset)


@datasets_app.command("list")
def datasets_list() -> None:
    """Registered datasets."""
    table = Table("name", "format", "task", "samples", "classes", "image shape", "fingerprint")
    for d in _request("GET", "/datasets")["items"]:
        table.add_row(d["name"], d["format"], d["task"], str(d["num_samples"]), str(d["num_classes"]),
                      "×".join(map(str, d["image_shape"])), d["fingerprint"][:12])
    console.print(table)


@datasets_app.command("show")
def datasets_show(name: str = typer.Argument(...)) -> None:
    """A dataset's scan report."""
    _print_dataset(_request("GET", f"/datasets/{urllib.parse.quote(name)}"))


def _print_dataset(d: dict[str, Any]) -> None:
    console.print(f"dataset [bold]{d['name']}[/] ({d['format']}, {d['task']}): {d['num_samples']} samples, "
                  f"{d['num_classes']} classes, loads at {'×'.join(map(str, d['image_shape']))}, splits {d['splits']}")
    report = d.get("report") or {}
    for key in ("class_counts", "image_sizes", "modes"):
        if report.get(key):
            console.print(f"  {key}: {report[key]}")
    for bad in report.get("unreadable", []):
        console.print(f"  [yellow]unreadable[/] {bad['file']}: {bad['error']}")


@models_app.command("list")
def models_list() -> None:
    """Registered models with their aliases and latest version."""
    table = Table("name", "latest", "aliases", "updated")
    for m in _request("GET", "/models")["items"]:
        aliases = ", ".join(f"{a}→v{v}" for a, v in sorted(m["aliases"].items()))
        table.add_row(m["name"], f"v{m['latest_version']}" if m["latest_version"] else "-", aliases,
                      m["updated_at"][:19])
    console.print(table)


@models_app.command("show")
def models_show(name: str = typer.Argument(...)) -> None:
    """A model's versions with their metrics, source job and aliases, and its alias history."""
    quoted = urllib.parse.quote(name, safe="")
    model = _request("GET", f"/models/{quoted}")
    console.print(f"model [bold]{model['name']}[/]  {model['links'].get('mlflow_model', '')}")
    table = Table("version", "aliases", "primary metric", "job", "created")
    for v in model["versions"]:
        metric = f"{v['primary_metric']} {v['primary_value']:.4f}" if v["primary_value"] is not None else ""
        table.add_row(str(v["version"]), ", ".join(v["aliases"]), metric, str(v["job_id"] or ""), v["created_at"][:19])
    console.print(table)
    for e in _request("GET", f"/models/{quoted}/history")["items"][:10]:
        console.print(f"  {e['at'][:19]}  {e['alias']}: v{e['from_version'] or '-'} → v{e['to_version'] or '-'} "
                      f"by {e['actor']}{' (forced)' if e['forced'] else ''} {e['reason']}")


@models_app.command("promote")
def models_promote(
    name: str = typer.Argument(...), version: int = typer.Argument(...),
    alias: str = typer.Option("production", "--alias", "-a"),
    force: bool = typer.Option(False, help="Promote even if its primary metric is worse than the holder's."),
) -> None:
    """Point an alias (default production) at a version."""
    event = _request("PUT", f"/models/{urllib.parse.quote(name, safe='')}/aliases/{alias}",
                     json={"version": version, "force": force})
    console.print(f"{name}@{alias}: v{event['from_version'] or '-'} → v{event['to_version']}")


@models_app.command("rollback")
def models_rollback(name: str = typer.Argument(...), alias: str = typer.Option("production", "--alias", "-a")) -> None:
    """Move an alias back to the version it held before its last move."""
    quoted = urllib.parse.quote(name, safe="")
    last = next((e for e in _request("GET", f"/models/{quoted}/history")["items"] if e["alias"] == alias), None)
    if last is None or last["from_version"] is None:
        err.print(f"[red]{name}@{alias} has no earlier version to roll back to[/]")
        raise typer.Exit(1)
    # A rollback is a deliberate move to an older version: the metric guard does not apply.
    event = _request("PUT", f"/models/{quoted}/aliases/{alias}", json={"version": last["from_version"], "force": True})
    console.print(f"{name}@{alias}: rolled back v{event['from_version']} → v{event['to_version']}")
