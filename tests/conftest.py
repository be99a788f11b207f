"""Fixtures that stand up real parts: SQLite and PostgreSQL databases, Redis and SQLite brokers,
MLflow stores under a temporary folder, and Celery worker processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import psycopg
import pytest
import redis

from trainyard import auth
from trainyard.config import Settings
from trainyard.db import Database, upgrade_schema
from trainyard_web import create_app

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_ADMIN_URL = os.environ.get("TRAINYARD_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TRAINYARD_TEST_REDIS", "redis://127.0.0.1:6379")


# ---- databases --------------------------------------------------------------------------------------


class PostgresDatabases:
    """Creates throwaway databases on the test PostgreSQL server and drops them afterwards."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.created: list[str] = []

    def create(self) -> str:
        name = f"trainyard_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        base = self.admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
        return f"{base}/{name}"

    def drop_all(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            for name in self.created:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresDatabases]:
    try:
        psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL} ({exc}); run `make services`")
    dbs = PostgresDatabases(POSTGRES_ADMIN_URL)
    yield dbs
    dbs.drop_all()


@pytest.fixture(scope="session")
def redis_server() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=3).ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_URL} ({exc}); run `make services`")
    return REDIS_URL


@contextmanager
def claimed_redis_database(redis_server: str) -> Iterator[str]:
    """A Redis logical database to ourselves (so parallel runs do not share queues), flushed around use."""
    client = redis.Redis.from_url(redis_server)
    for index in range(1, 16):
        if client.set(f"trainyard-test-lock:{index}", os.getpid(), nx=True, ex=3600):
            break
    else:
        pytest.fail("no free Redis logical database for the test")
    url = f"{redis_server}/{index}"
    redis.Redis.from_url(url).flushdb()
    try:
        yield url
    finally:
        redis.Redis.from_url(url).flushdb()
        client.delete(f"trainyard-test-lock:{index}")


@pytest.fixture
def redis_broker_url(redis_server: str) -> Iterator[str]:
    with claimed_redis_database(redis_server) as url:
        yield url


def redis_queue_messages(broker_url: str, queue: str = "cpu") -> list[bytes]:
    """Messages waiting in a Redis-backed Celery queue, across kombu's per-priority lists."""
    client = redis.Redis.from_url(broker_url)
    keys = [queue] + [f"{queue}:{p}" for p in range(1, 10)]
    return [m for key in keys for m in client.lrange(key, 0, -1)]


def sqlite_queue_messages(broker_url: str, queue: str = "cpu") -> int:
    """Messages waiting (not yet handed to a worker) in a queue of the embedded SQLite broker: kombu's
    SQLAlchemy transport keeps them as rows, hidden once delivered."""
    import sqlite3

    with closing(sqlite3.connect(broker_url.removeprefix("sqla+sqlite:///"))) as conn:
        return conn.execute("SELECT count(*) FROM kombu_message m JOIN kombu_queue q ON m.queue_id = q.id "
                            "WHERE q.name = ? AND m.visible", (queue,)).fetchone()[0]


def make_settings(tmp_path: Path, **overrides: str) -> Settings:
    """Embedded defaults under `tmp_path`, with any URL overridden."""
    return Settings(data_dir=tmp_path / "data", **overrides)


@pytest.fixture
def web_settings(tmp_path, redis_broker_url) -> Settings:
    """Embedded SQLite stores under tmp_path, migrated, with a Redis broker of the test's own."""
    settings = make_settings(tmp_path, broker_url=redis_broker_url)
    upgrade_schema(settings.database_url)
    return settings


def make_token(settings: Settings, role: str = "admin", user: str = "admin") -> str:
    """A real API token with `role`, stored in the settings' platform database."""
    db = Database(settings.database_url)
    try:
        return auth.create_token(db, user=user, role=role, created_by="tests")[1]
    finally:
        db.dispose()


def authed_client(app, role: str = "admin", user: str = "admin"):
    """A test client of `app` that sends a fresh token of `role` with every request."""
    settings = app.extensions["trainyard"].settings
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {make_token(settings, role, user)}"
    return client


def ui_login(client, token: str | None = None):
    """Log `client` in to the web UI through the login form (CSRF token included), as a browser would."""
    token = token or client.environ_base["HTTP_AUTHORIZATION"].removeprefix("Bearer ")
    page = client.get("/login").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)
    return client.post("/login", data={"token": token, "csrf_token": csrf})


@pytest.fixture
def web_app(web_settings):
    app = create_app(web_settings)
    app.testing = True
    return app


@pytest.fixture
def web_client(web_app):
    """Flask's test client on the real web app for `web_settings`, as an admin."""
    return authed_client(web_app)


@pytest.fixture
def anonymous_client(web_app):
    """The same app's test client with no token."""
    return web_app.test_client()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path: Path) -> str:
    """A migrated platform database on each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'platform.db'}"
    else:
        url = request.getfixturevalue("postgres").create()
    upgrade_schema(url)
    return url


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    yield database
    database.dispose()


# ---- a running platform -----------------------------------------------------------------------------


class WorkerProcess:
    """A real `python -m trainyard_workers worker` process with the given settings."""

    def __init__(self, settings: Settings, log_path: Path, queues: str = "", command: str = "worker",
                 extra: tuple[str, ...] = ()) -> None:
        self.settings = settings
        self.log_path = log_path
        env = {
            **os.environ,
            "TRAINYARD_DATA_DIR": str(settings.data_dir),
            "TRAINYARD_DATABASE_URL": settings.database_url,
            "TRAINYARD_BROKER_URL": settings.broker_url,
            "TRAINYARD_MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
            "TRAINYARD_MLFLOW_ARTIFACT_ROOT": settings.mlflow_artifact_root,
            "TRAINYARD_HEARTBEAT_SECONDS": str(settings.beat_seconds),
            "TRAINYARD_LEASE_SECONDS": str(settings.lease_seconds),
            "TRAINYARD_RECONCILE_SECONDS": str(settings.reconcile_seconds),
            "TRAINYARD_TORCH_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("platform", "workers", "web")),
        }
        args = [sys.executable, "-m", "trainyard_workers", command, *extra]
        if command == "worker":
            args += ["--loglevel=INFO", f"--hostname=test-{uuid.uuid4().hex[:6]}@%h"]
        if queues:
            args.append(f"--queues={queues}")
        self._log = open(log_path, "w")
        # A session of its own, so a test can kill the worker with its pool children like a lost machine.
        self.process = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
                                        start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in self.log():
                return
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited with {self.process.returncode}:\n{self.log()}")
            time.sleep(0.2)
        raise AssertionError(f"worker not ready after {timeout}s:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL the worker and its pool children at once, as when a machine is lost."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture
def start_worker(tmp_path: Path):
    workers: list[WorkerProcess] = []

    def start(settings: Settings, queues: str = "") -> WorkerProcess:
        worker = WorkerProcess(settings, tmp_path / f"worker-{len(workers)}.log", queues)
        workers.append(worker)
        worker.wait_ready()
        return worker

    yield start
    for worker in workers:
        worker.stop()


def wait_for_job(client, job_id: int, statuses: set[str], timeout: float = 180) -> dict:
    """Poll GET /api/v1/jobs/{id} until the job reaches one of `statuses`."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/api/v1/jobs/{job_id}").get_json()
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s: {job}")
        time.sleep(0.3)


def submit_digits_job(client, epochs: int, batch_size: int) -> int:
    """Submit a cnn-on-digits training job (not registered as a model version) through the API; its id."""
    response = client.post("/api/v1/jobs", json={"kind": "train", "dataset": "digits", "architecture": "cnn",
                                                 "register": False,
                                                 "params": {"epochs": epochs, "batch_size": batch_size}})
    assert response.status_code == 201, response.get_json()
    return response.get_json()["id"]


# ---- outages: a Redis server of the test's own, waiting on conditions --------------------------------


def processes_running(module: str, parent: int | None = None, recursive: bool = False) -> list:
    """Children (or all descendants) of `parent` (default: this process) running `python -m module`."""
    import psutil

    found = []
    for process in psutil.Process(parent).children(recursive=recursive):
        try:
            if module in process.cmdline():
                found.append(process)
        except psutil.NoSuchProcess:
            pass
    return found


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):
    """Poll `predicate` until it returns something truthy, and return that; fail with `what` on timeout."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, what
        time.sleep(interval)
    return value


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A `redis-server` of the test's own, persisting to an append-only file, so that it can be restarted
    (like the deployment's Redis) without touching the shared one."""

    def __init__(self, folder: Path) -> None:
        import shutil

        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not on PATH; run `make services` (it installs Redis)")
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--appendonly", "yes",
                      "--dir", str(folder), "--save", ""]
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self._log = open(self.folder / "redis.log", "a")
        self.process = subprocess.Popen(self._argv, stdout=self._log, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_timeout=1)
        wait_until(lambda: _pings(client), 20, f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        """SIGTERM, as an orderly restart does: Redis flushes its append-only file and exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)
        self._log.close()

    def restart(self) -> None:
        self.stop()
        self.start()


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()
