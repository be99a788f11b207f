"""Real parts for the benchmarks to run against: throwaway PostgreSQL databases, a Redis logical database of
their own, gunicorn web apps and Celery workers as subprocesses. Everything made here is removed by the
context managers that made it; processes are stopped by their own process group, never by name.

Mirrors tests/conftest.py's patterns without importing from tests/.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg
import redis

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "bench"
POSTGRES_ADMIN_URL = os.environ.get("TRAINYARD_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TRAINYARD_BENCH_REDIS", "redis://127.0.0.1:6379")
REDIS_DB_CHOICES = range(12, 16)  # the tests take 1–15 from the bottom; benchmarks start at the top
PYTHONPATH = os.pathsep.join(str(ROOT / p) for p in ("platform", "workers", "web", "bench"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def temp_dir(prefix: str = "trainyard-bench-") -> Iterator[Path]:
    import shutil

    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def postgres_database(migrate: bool = True) -> Iterator[str]:
    """A fresh `bench_<hex>` database (migrated to head unless told otherwise); its SQLAlchemy URL. Dropped after."""
    name = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    url = f"{base}/{name}"
    try:
        if migrate:
            from trainyard.db import upgrade_schema

            upgrade_schema(url)
        yield url
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def redis_database() -> Iterator[str]:
    """A Redis logical database (12–15) to ourselves, flushed before and after; its URL."""
    client = redis.Redis.from_url(REDIS_URL)
    for index in REDIS_DB_CHOICES:
        if client.set(f"trainyard-bench-lock:{index}", os.getpid(), nx=True, ex=3600):
            break
    else:
        raise RuntimeError(f"no free Redis logical database among {list(REDIS_DB_CHOICES)}")
    url = f"{REDIS_URL}/{index}"
    redis.Redis.from_url(url).flushdb()
    try:
        yield url
    finally:
        redis.Redis.from_url(url).flushdb()
        client.delete(f"trainyard-bench-lock:{index}")


def platform_settings(data_dir: Path, **overrides):
    """Settings under `data_dir` (embedded MLflow store there), with URLs overridden."""
    from trainyard.config import Settings

    return Settings(data_dir=data_dir, **overrides)


def settings_env(settings, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "TRAINYARD_DATA_DIR": str(settings.data_dir),
        "TRAINYARD_DATABASE_URL": settings.database_url,
        "TRAINYARD_BROKER_URL": settings.broker_url,
        "TRAINYARD_MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
        "TRAINYARD_MLFLOW_ARTIFACT_ROOT": settings.mlflow_artifact_root,
        "TRAINYARD_QUEUE": settings.queue,
        "TRAINYARD_HEARTBEAT_SECONDS": str(settings.beat_seconds),
        "TRAINYARD_LEASE_SECONDS": str(settings.lease_seconds),
        "TRAINYARD_TORCH_THREADS": str(settings.torch_threads or 1),
        "PYTHONPATH": PYTHONPATH,
        "PYTHONUNBUFFERED": "1",
    }
    env.update(extra)
    return env


def make_token(settings, role: str = "admin", user: str = "bench") -> str:
    from trainyard import auth
    from trainyard.db import Database

    db = Database(settings.database_url)
    try:
        return auth.create_token(db, user=user, role=role, created_by="bench")[1]
    finally:
        db.dispose()


def prepare_platform(settings) -> None:
    """What `trainyard up` does before starting children: data folder, built-in datasets, and the MLflow store
    (created once here: MLflow's own migrations race when several processes start on a new store)."""
    from trainyard.datasets import ensure_builtin_datasets
    from trainyard.db import Database
    from trainyard.tracking import prepare_tracking_store

    settings.ensure_data_dir()
    db = Database(settings.database_url)
    try:
        ensure_builtin_datasets(db)
    finally:
        db.dispose()
    prepare_tracking_store(settings)


class Process:
    """A subprocess in a session of its own, logging to a file; stop() ends it and its children by group."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(list(argv), env=dict(env), stdout=self._log, stderr=subprocess.STDOUT,
                                        cwd=ROOT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.log()[-3000:]}")
            time.sleep(0.1)

    def wait_for_http(self, url: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                httpx.get(url, timeout=30)
                return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not answering {url} after {timeout}s:\n{self.log()[-3000:]}")
            time.sleep(0.2)

    def stop(self, grace: float = 20) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass
        # Children left in the group (a pool process that ignored SIGTERM) go too; the group is ours alone.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()


class Processes:
    """Starts processes and stops them all, last first, on exit."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[Process] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.started):
            proc.stop()

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> Process:
        proc = Process(name, argv, env, self.log_dir)
        self.started.append(proc)
        return proc

    def gunicorn(self, name: str, app: str, env: Mapping[str, str], *, workers: int = 2, threads: int = 4) -> str:
        """gunicorn serving `app` (a "module:factory()" spec) on a free port, as `trainyard up` runs the web
        app (2 workers × 4 threads by default); its base URL once it answers."""
        port = free_port()
        proc = self.start(name, [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}",
                                 "--workers", str(workers), "--threads", str(threads), app], env)
        url = f"http://127.0.0.1:{port}"
        proc.wait_for_http(f"{url}/api/v1/health" if "trainyard_web" in app else url)
        return url

    def platform_worker(self, settings, *, queues: str = "", extra_env: Mapping[str, str] | None = None) -> Process:
        """A real `python -m trainyard_workers worker` (concurrency 1, prefetch 1), ready."""
        argv = [sys.executable, "-m", "trainyard_workers", "worker", "--loglevel=INFO",
                f"--hostname=bench-{uuid.uuid4().hex[:6]}@%h"]
        if queues:
            argv.append(f"--queues={queues}")
        proc = self.start("worker", argv, settings_env(settings, **(extra_env or {})))
        proc.wait_for_log(" ready.")
        return proc


def ui_login(client: httpx.Client, base_url: str, token: str) -> None:
    """Log an httpx client in to the web UI through the login form, as a browser would."""
    page = client.get(f"{base_url}/login").text
    csrf = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)
    response = client.post(f"{base_url}/login", data={"token": token, "csrf_token": csrf})
    if response.status_code >= 400:
        raise RuntimeError(f"UI login failed: {response.status_code} {response.text[:300]}")
