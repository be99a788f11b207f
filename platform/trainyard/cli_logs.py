"""`trainyard logs JOB_ID [--follow] [--attempt N]`: a job's own log, read over REST."""

from __future__ import annotations

import time
import urllib.parse

import typer

from trainyard.api_client import request

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
PAGE = 1000
# A worker writes a job's last lines just after recording its outcome, then lets go of the job: how long
# to wait for that once the job has ended (a worker that died never lets go).
LAST_LINES_GRACE_SECONDS = 15.0


def logs(
    job_id: int = typer.Argument(..., help="Job id."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines until the job ends; "
                                "exit 0 if it SUCCEEDED, 1 if it FAILED or was CANCELLED."),
    attempt: int = typer.Option(None, "--attempt", min=1, help="Only this attempt's lines."),
    interval: float = typer.Option(1.0, help="Seconds between polls with --follow.", min=0.05),
) -> None:
    """Print a job's own log (what its worker logged while running it), oldest first."""
    after = _print_new_lines(job_id, 0, attempt)
    if not follow:
        return
    while (status := request("GET", f"/jobs/{job_id}")["status"]) not in TERMINAL:
        time.sleep(interval)
        after = _print_new_lines(job_id, after, attempt)
    deadline = time.monotonic() + LAST_LINES_GRACE_SECONDS
    while _worker_still_holds(job_id) and time.monotonic() < deadline:
        time.sleep(min(interval, 0.5))
    _print_new_lines(job_id, after, attempt)
    if status != "SUCCEEDED":
        raise typer.Exit(1)


def _print_new_lines(job_id: int, after: int, attempt: int | None) -> int:
    """Print every line after line id `after`, page by page; return the last id seen."""
    while True:
        page = request("GET", f"/jobs/{job_id}/logs?" + urllib.parse.urlencode({"after": after, "limit": PAGE}))
        for item in page["items"]:
            if attempt is None or item["attempt"] == attempt:
                # Plain print, not rich: a log line's [brackets] are text, not markup.
                print(f"{item['at'][:19].replace('T', ' ')} [attempt {item['attempt']}] {item['line']}", flush=True)
        after = page["next_after"]
        if len(page["items"]) < PAGE:
            return after


def _worker_still_holds(job_id: int) -> bool:
    return any(w["alive"] and w["current_job"] == job_id for w in request("GET", "/workers")["workers"])
