"""`trainyard sweeps …`: submit a sweep from a YAML (or JSON) file, follow it, list and cancel sweeps."""

from __future__ import annotations

import json
import time
import urllib.parse
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from trainyard.api_client import request

sweeps_app = typer.Typer(no_args_is_help=True, help="Sweeps: hyperparameter searches whose trials are train jobs.")
console = Console()
err = Console(stderr=True)


@sweeps_app.command("submit")
def submit(
    spec_file: Path = typer.Argument(..., exists=True, dir_okay=False, help="The sweep spec, YAML or JSON."),
    watch: bool = typer.Option(False, "--watch", "-w", help="Follow the sweep until it ends."),
) -> None:
    """Submit a sweep (see README: Sweeps for the spec)."""
    try:
        spec = yaml.safe_load(spec_file.read_text())
    except yaml.YAMLError as exc:
        err.print(f"[red]{spec_file} is not valid YAML[/]: {exc}")
        raise typer.Exit(2) from None
    if not isinstance(spec, dict):
        err.print(f"[red]{spec_file} must hold a mapping (the sweep spec)[/]")
        raise typer.Exit(2)
    sweep = request("POST", "/sweeps", json=spec)
    console.print(f"sweep [bold]{sweep['id']}[/] {sweep['name']}: {sweep['status']} "
                  f"(up to {sweep['max_trials']} trials, {sweep['max_parallel']} at a time)")
    if watch:
        _watch(sweep["id"])


@sweeps_app.command("status")
def status(
    sweep_id: int = typer.Argument(..., help="Sweep id."),
    watch: bool = typer.Option(False, "--watch", "-w", help="Refresh until the sweep ends."),
    as_json: bool = typer.Option(False, "--json", help="Print the sweep as JSON."),
) -> None:
    """A sweep's progress, best trial and every trial's values and objective."""
    if watch:
        _watch(sweep_id)
        return
    sweep = request("GET", f"/sweeps/{sweep_id}")
    if as_json:
        console.print_json(data=sweep)
        return
    console.print(_render(sweep))


@sweeps_app.command("cancel")
def cancel(sweep_id: int = typer.Argument(..., help="Sweep id.")) -> None:
    """Cancel a sweep: no more trials start; its queued and running trials are cancelled."""
    sweep = request("POST", f"/sweeps/{sweep_id}/cancel")
    console.print(f"sweep {sweep_id}: {sweep['status']}")


@sweeps_app.command("list")
def list_sweeps(limit: int = typer.Option(20, min=1, max=200)) -> None:
    """List sweeps, newest first."""
    page = request("GET", "/sweeps?" + urllib.parse.urlencode({"limit": limit}))
    table = Table("id", "name", "status", "trials", "best", "model", "created")
    for sweep in page["items"]:
        table.add_row(str(sweep["id"]), sweep["name"], sweep["status"], _counts(sweep),
                      _best(sweep), _model(sweep), sweep["created_at"][:19])
    console.print(table)


def _watch(sweep_id: int, interval: float = 2.0) -> None:
    with Live(console=console, auto_refresh=False) as live:
        while True:
            sweep = request("GET", f"/sweeps/{sweep_id}")
            live.update(_render(sweep), refresh=True)
            if sweep["status"] != "RUNNING":
                break
            time.sleep(interval)
    if sweep["status"] != "SUCCEEDED":
        raise typer.Exit(1)


def _counts(sweep: dict[str, Any]) -> str:
    counts = sweep["counts"]
    done = sum(counts.get(s, 0) for s in ("SUCCEEDED", "PRUNED", "FAILED", "CANCELLED"))
    parts = [f"{done}/{sweep['max_trials']} done"] + [f"{n} {s.lower()}" for s, n in sorted(counts.items()) if n]
    return ", ".join(parts)


def _best(sweep: dict[str, Any]) -> str:
    if sweep["best_trial"] is None:
        return ""
    return f"trial {sweep['best_trial']}: {sweep['best_value']:.4g}"


def _model(sweep: dict[str, Any]) -> str:
    return f"{sweep['model_name']} v{sweep['model_version']}" if sweep.get("model_version") else ""


def _render(sweep: dict[str, Any]) -> Group:
    objective = sweep["spec"].get("objective", {})
    header = Text.from_markup(
        f"sweep [bold]{sweep['id']}[/] {sweep['name']}: [bold]{sweep['status']}[/] — {_counts(sweep)}\n"
        f"  objective: {objective.get('metric')} ({objective.get('direction') or 'auto'}, at the "
        f"{objective.get('at', 'best')} epoch); {sweep['spec'].get('algorithm')}; early stopping: "
        f"{sweep['spec'].get('early_stopping', {}).get('type', 'none')}\n"
        f"  {sweep['status_reason'] or ''}")
    best = next((t for t in sweep["trials"] if t["number"] == sweep["best_trial"]), None)
    lines = [header]
    if best is not None:
        lines.append(Text(f"  best: trial {best['number']} = {best['value']:.4g} with "
                          f"{json.dumps(best['params'])}" + (f"; registered as {_model(sweep)}" if _model(sweep) else "")))
    paths = list(sweep["spec"].get("space", {}))
    table = Table("trial", "job", "status", "epochs", "objective", *paths)
    for trial in sweep["trials"]:
        value = trial["value"]
        table.add_row(str(trial["number"]), str(trial["job_id"] or "-"), trial["status"], str(trial["epochs"]),
                      f"{value:.4g}" if value is not None else "",
                      *(_short(trial["params"].get(p)) for p in paths))
    lines.append(table)
    return Group(*lines)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
