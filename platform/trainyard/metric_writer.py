"""MLflow metric writes in a process of their own, so the tracking store's Python work never runs beside a
training loop.

On the embedded SQLite store a `log_batch` costs ~4 ms plus ~45 µs a point of ORM work, all of it holding
the GIL: from a thread of the training process, every millisecond of it is a millisecond the loop waits for
(4.5 % of a small model's images/s at 240 steps a second, measured by bench_05). A training process starts one
writer, `python -m trainyard.metric_writer`, on first use and keeps it for its life (a CPU worker's pool
process runs many jobs); requests and answers are JSON lines over the child's stdin and stdout, so nothing
is unpickled. The child exits when its stdin closes, i.e. when the training process ends, however it ends.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence

log = logging.getLogger(__name__)

MAX_BATCH = 1000  # MLflow's log_batch limit on metrics per call

Point = tuple[str, float, int, int]  # key, value, step, timestamp (ms)


class WriterUnavailable(Exception):
    """The writer process could not be started, or died: the caller writes the points itself."""


class MetricWriteError(Exception):
    """The store refused the points (the writer process itself is fine)."""


class MetricWriterProcess:
    """The client side: one request at a time, answered before the next (a thread waits in `write`)."""

    def __init__(self, command: Sequence[str] | None = None) -> None:
        self.command = list(command or [sys.executable, "-m", "trainyard.metric_writer"])
        self._lock = threading.Lock()
        self._child: subprocess.Popen | None = None
        self._pid = os.getpid()

    def start(self, tracking_uri: str | None = None) -> bool:
        """Start the process now if it is not running, opening `tracking_uri`'s store ahead of the first write
        (MLflow's import and store set-up take a second or two, meanwhile the job builds its data and model);
        False if it cannot start, and `write` will say why."""
        with self._lock:
            try:
                self._running_child(tracking_uri)
            except WriterUnavailable:
                return False
            return True

    def write(self, tracking_uri: str, run_id: str, points: Sequence[Point]) -> None:
        """Write `points` to the run and return once the store has them."""
        request = json.dumps({"tracking_uri": tracking_uri, "run_id": run_id, "points": list(points)}) + "\n"
        with self._lock:
            child = self._running_child()
            try:
                child.stdin.write(request.encode())
                child.stdin.flush()
                answer = child.stdout.readline()  # blocks without the GIL
            except (OSError, ValueError) as exc:
                self._forget(child)
                raise WriterUnavailable(f"metric writer process: {exc}") from exc
            if not answer:
                self._forget(child)
                raise WriterUnavailable(f"metric writer process exited with code {child.wait()}")
        error = json.loads(answer).get("error")
        if error:
            raise MetricWriteError(error)

    def close(self) -> None:
        with self._lock:
            if self._child is not None:
                self._forget(self._child)

    def _running_child(self, warm_uri: str | None = None) -> subprocess.Popen:
        if self._pid != os.getpid():  # forked: the pipes belong to the parent's writer
            self._child, self._pid = None, os.getpid()
        if self._child is not None:
            if self._child.poll() is None:
                return self._child
            self._forget(self._child)  # died between requests: a new one takes over
        try:
            command = self.command + (["--open", warm_uri] if warm_uri else [])
            self._child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        except OSError as exc:
            raise WriterUnavailable(f"could not start the metric writer process: {exc}") from exc
        return self._child

    def _forget(self, child: subprocess.Popen) -> None:
        self._child = None
        try:
            child.stdin.close()  # the child's cue to exit
            child.wait(timeout=10)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            child.kill()
            child.wait()
        finally:
            child.stdout.close()


_shared: MetricWriterProcess | None = None
_shared_lock = threading.Lock()


def shared_writer() -> MetricWriterProcess:
    """This process's writer (its process starts on `start()` or the first write, not here)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = MetricWriterProcess()
            atexit.register(_shared.close)
        return _shared


def log_points(client, run_id: str, points: Sequence[Point]) -> None:
    """Write `points` with MLflow's client, `MAX_BATCH` to a `log_batch`."""
    from mlflow.entities import Metric

    for start in range(0, len(points), MAX_BATCH):
        client.log_batch(run_id, metrics=[Metric(key, float(value), int(ts), int(step))
                                          for key, value, step, ts in points[start:start + MAX_BATCH]])


def serve(requests, answers, open_uris: Sequence[str] = ()) -> None:
    """The child: write each request's points with MLflow's client, answer each with one line."""
    from mlflow.tracking import MlflowClient

    from trainyard.tracking import quiet_mlflow

    quiet_mlflow()
    clients: dict[str, MlflowClient] = {}
    for uri in open_uris:  # set the store up (engine, schema check) before the first request needs it
        try:
            clients[uri] = MlflowClient(tracking_uri=uri)
            clients[uri].search_experiments(max_results=1)
        except Exception:  # the first write will report it
            log.warning("could not open the tracking store %s", uri, exc_info=True)
            clients.pop(uri, None)
    for line in requests:
        try:
            request = json.loads(line)
            uri = request["tracking_uri"]
            if uri not in clients:
                clients[uri] = MlflowClient(tracking_uri=uri)
            log_points(clients[uri], request["run_id"], request["points"])
            answer = {}
        except Exception as exc:  # the store's refusal goes back to the job's log; the writer keeps serving
            answer = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        answers.write((json.dumps(answer) + "\n").encode())
        answers.flush()


if __name__ == "__main__":
    # Ctrl-C in a terminal reaches the whole process group: the training process decides when to stop, and
    # this process follows when its stdin closes (after the last points are written).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Background work: where training keeps every core busy, the scheduler lets the loop's threads go first
    # (this process needs ~1 % of a core and still gets ~10 % under full load).
    os.nice(10)
    logging.basicConfig(level=logging.WARNING)
    # Answers get a copy of stdout of their own; anything a library prints goes to stderr, not into them.
    answer_stream = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin.buffer, answer_stream, sys.argv[2:3] if sys.argv[1:2] == ["--open"] else ())
