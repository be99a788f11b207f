"""What the web process holds for its lifetime: settings, the database and the dispatcher."""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app
from sqlalchemy import text

from trainyard.config import Settings
from trainyard.db import Database
from trainyard.queueing import CeleryDispatch
from trainyard.tracking import tracking_client
from trainyard_web.schemas import CheckOut, HealthOut
from trainyard_web.serving import ModelServer

EXTENSION_KEY = "trainyard"


@dataclass
class Platform:
    settings: Settings
    db: Database
    dispatch: CeleryDispatch
    models: ModelServer

    def health(self) -> HealthOut:
        checks = {
            "database": _check(lambda: self._ping_database()),
            "broker": _check(lambda: self.dispatch.ping(timeout=2.0)),
            "mlflow": _check(lambda: tracking_client(self.settings).search_experiments(max_results=1)),
        }
        return HealthOut(status="ok" if all(c.ok for c in checks.values()) else "degraded", checks=checks)

    def _ping_database(self) -> None:
        with self.db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))


def _check(probe) -> CheckOut:
    try:
        probe()
    except Exception as exc:  # health reports every failure as data; it must never raise
        return CheckOut(ok=False, detail=f"{type(exc).__name__}: {exc}"[:500])
    return CheckOut(ok=True, detail="reachable")


def platform() -> Platform:
    """The current app's platform services."""
    return current_app.extensions[EXTENSION_KEY]
