"""The worker pool page: who is alive, on what device, running what, and every queue's depth."""

from __future__ import annotations

from flask import render_template

from trainyard import worker_registry
from trainyard_web.runtime import platform
from trainyard_web.ui import ui


@ui.get("/workers")
def worker_list():
    p = platform()
    pool = worker_registry.pool_status(p.db, stale_after_seconds=p.settings.worker_stale_seconds)
    return render_template("workers.html", pool=pool)
