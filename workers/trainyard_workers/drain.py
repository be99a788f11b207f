"""Draining a worker: it finishes the job it is running, takes no new one, then exits with status 0.

Two ways in, one effect:

- a remote-control broadcast (`trainyard.drain`) on brokers that have one (Redis, AMQP): it reaches
  workers on any host by node name;
- SIGUSR2 to the worker's main process, for the embedded broker: kombu's SQLAlchemy transport has no
  fanout exchange, so nothing can be broadcast over it. That broker is a SQLite file, so its workers all
  run on this machine, and `drain` finds them by the pid files they write in `<data dir>/workers/`.

Either one only sets a flag. A consumer bootstep looks at it every second from the worker's own loop,
stops consuming every queue, and asks for a warm shutdown once no task is reserved or running; a job
queued meanwhile stays on the broker for another worker.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

import psutil
from celery import Celery, bootsteps
from celery.platforms import EX_OK
from celery.utils.nodenames import default_nodename, host_format
from celery.worker import state as worker_state
from celery.worker.control import control_command
from kombu.exceptions import OperationalError as KombuOperationalError

from trainyard.config import Settings
from trainyard.queueing import celery_config

log = logging.getLogger(__name__)

DRAIN_COMMAND = "trainyard.drain"
DRAIN_SIGNAL = signal.SIGUSR2  # unused by Celery's worker (unless CELERY_RDBSIG turns on its debugger)
DRAIN_REQUESTED = threading.Event()


class DrainError(Exception):
    """No worker could be told to drain; the message says why."""


# ---- the worker's side ----------------------------------------------------------------------------------


def node_name(hostname: str = "") -> str:
    """The Celery node name a worker started with `--hostname=hostname` gets (`%h` and friends expanded)."""
    return host_format(default_nodename(hostname or f"cpu@{socket.gethostname()}"))


def pid_folder(settings: Settings) -> Path:
    return settings.data_dir / "workers"


def pid_file(settings: Settings, node: str) -> Path:
    return pid_folder(settings) / f"{node}.pid"


def install_signal_handler() -> None:
    """Make DRAIN_SIGNAL start a drain; call in the worker's main process before Celery starts."""
    signal.signal(DRAIN_SIGNAL, lambda *_: DRAIN_REQUESTED.set())


@control_command(name=DRAIN_COMMAND)
def _drain_by_broadcast(state) -> dict[str, str]:
    """Finish the running job, take no new one, then exit."""
    DRAIN_REQUESTED.set()
    return {"ok": "draining"}


class DrainStep(bootsteps.StartStopStep):
    """Turns a drain request into "stop consuming, then shut down once idle", on the consumer's loop."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent, **kwargs) -> None:
        super().__init__(parent, **kwargs)
        self._timer_entry = None
        self._stopped_consuming = False

    def start(self, c) -> None:
        # A consumer restarted after a broker outage consumes its queues afresh: stop consuming again.
        self._stopped_consuming = False
        # call_soon: with the embedded broker the timer is a thread of its own, and consumer changes must
        # happen on the consumer's loop.
        self._timer_entry = c.timer.call_repeatedly(1.0, c.call_soon, (self._check, c))

    def stop(self, c) -> None:
        if self._timer_entry is not None:
            self._timer_entry.cancel()
            self._timer_entry = None

    def _check(self, c) -> None:
        if not DRAIN_REQUESTED.is_set():
            return
        if not self._stopped_consuming and c.task_consumer is not None:
            queues = [queue.name for queue in c.task_consumer.queues]
            log.warning("draining: taking no new job from %s; exiting once the running one ends", ", ".join(queues))
            for queue in queues:
                c.cancel_task_queue(queue)
            self._stopped_consuming = True
        if self._stopped_consuming and not worker_state.reserved_requests and worker_state.should_stop is None:
            log.warning("drained: no job left; shutting down")
            worker_state.should_stop = EX_OK


# ---- the side that asks -------------------------------------------------------------------------------


def request_drain(settings: Settings, hostname: str = "", timeout: float = 5.0) -> list[str]:
    """Tell a worker (`hostname`, a Celery node name) or every worker on this host to drain.

    Returns the node names told; raises DrainError if there were none.
    """
    app = Celery("trainyard-drain")
    app.conf.update(celery_config(settings))
    try:
        if _broadcasts(app):
            return _drain_by_control(app, node_name(hostname) if hostname else "", timeout)
        return _drain_by_signal(settings, node_name(hostname) if hostname else "")
    except (OSError, KombuOperationalError) as exc:
        raise DrainError(f"cannot reach the broker ({exc})") from exc
    finally:
        app.close()


def wait_until_exited(settings: Settings, nodes: list[str], timeout: float = 0) -> bool:
    """Wait for drained workers to exit (0: as long as it takes); False on timeout."""
    app = Celery("trainyard-drain")
    app.conf.update(celery_config(settings))
    deadline = time.monotonic() + timeout if timeout else None
    try:
        broadcasts = _broadcasts(app)
        while nodes:
            if broadcasts:
                alive = {node for reply in app.control.ping(destination=nodes, timeout=1.0) for node in reply}
            else:
                alive = {node for node in nodes if live_worker_pid(pid_file(settings, node)) is not None}
            nodes = [node for node in nodes if node in alive]
            if deadline is not None and time.monotonic() > deadline:
                return not nodes
            time.sleep(1.0)
        return True
    finally:
        app.close()


def _broadcasts(app: Celery) -> bool:
    with app.connection_for_write() as conn:
        return "fanout" in conn.transport.implements.exchange_type


def _drain_by_control(app: Celery, node: str, timeout: float) -> list[str]:
    if node:
        targets = [node]
    else:
        here = f"@{socket.gethostname()}"
        targets = [name for reply in app.control.ping(timeout=timeout) for name in reply if name.endswith(here)]
        if not targets:
            raise DrainError(f"no worker on this host ({socket.gethostname()}) answered on the broker")
    replies = app.control.broadcast(DRAIN_COMMAND, destination=targets, reply=True, timeout=timeout)
    told = sorted(name for reply in replies for name, answer in reply.items() if "ok" in answer)
    if not told:
        raise DrainError(f"no worker named {', '.join(targets)} answered within {timeout:g} s")
    return told


def _drain_by_signal(settings: Settings, node: str) -> list[str]:
    folder = pid_folder(settings)
    # The folder may be shared with other hosts (a data volume): their pids mean nothing here.
    here = f"@{socket.gethostname()}.pid"
    candidates = [pid_file(settings, node)] if node else sorted(folder.glob(f"*{here}"))
    told = []
    for path in candidates:
        pid = live_worker_pid(path)
        if pid is not None:
            os.kill(pid, DRAIN_SIGNAL)
            told.append(path.name.removesuffix(".pid"))
    if not told:
        who = f" named {node}" if node else ""
        raise DrainError(
            f"no running worker{who} found in {folder}. The embedded broker cannot carry control messages, "
            "so drain reaches only workers on this machine started with the same TRAINYARD_DATA_DIR.")
    return told


def live_worker_pid(path: Path) -> int | None:
    """The pid in a worker's pid file if that process is still one of our workers (not a reused pid)."""
    try:
        pid = int(path.read_text().strip())
        process = psutil.Process(pid)
        is_worker = any("trainyard_workers" in part for part in process.cmdline())
        return pid if is_worker and process.create_time() <= path.stat().st_mtime + 1 else None
    except (FileNotFoundError, ValueError, psutil.Error):
        return None
