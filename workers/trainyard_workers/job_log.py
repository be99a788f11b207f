"""Capture what is logged while a job runs into the job's own log in the platform database."""

from __future__ import annotations

import logging
import threading
from datetime import datetime

from trainyard import job_logs
from trainyard.db import Database
from trainyard.models import utcnow

MAX_BUFFERED = 10_000  # during a long database outage keep the newest lines, not all memory


class JobLogCapture(logging.Handler):
    """A logging handler that buffers lines; `flush_to_db` (called from the heartbeat) writes them."""

    def __init__(self, db: Database, job_id: int, attempt: int) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self._db, self._job_id, self._attempt = db, job_id, attempt
        self._lines: list[tuple[datetime, str]] = []
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            return
        with self._lock:
            self._lines.append((utcnow(), line))
            del self._lines[:-MAX_BUFFERED]

    def flush_to_db(self) -> None:
        with self._lock:
            lines, self._lines = self._lines, []
        try:
            job_logs.append(self._db, self._job_id, self._attempt, lines)
        except Exception:  # put them back: the next beat tries again
            with self._lock:
                self._lines[:0] = lines

    def __enter__(self) -> JobLogCapture:
        root = logging.getLogger()
        root.addHandler(self)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().removeHandler(self)
        self.flush_to_db()
