"""Measure 8 — serving efficiency of the platform's prediction endpoint.

(a) batch-1 p50 latency of `POST /api/v1/models/{name}/predict?alias=production` (one PNG, multipart, a real
    admin token) against the platform's prediction server as `trainyard serve` runs it, vs a bare forward of
    the same model on the same preprocessed batch-1 tensor in this process, with the torch threads of one
    serving process. Target: platform p50 ≤ bare p50 + 3 ms.
(b) predictions/s with 16 concurrent clients (each sends batch-1 requests back to back over a kept-alive
    connection), vs bare forwards on every core at the batch size the server forms (its dynamic batching joins
    the requests in flight in one process: at most one per request thread, so SERVE_THREADS), and side by
    side with `mlflow models serve`
    (`--env-manager local`, same number of worker processes) on the same registered version, fed the same
    image already preprocessed as MLflow's JSON `inputs` (it has no image decoding of its own).
    Targets: ≥ 0.7 of bare, and ≥ 2× mlflow models serve. Bare forwards at batch 16 are also recorded:
    they are what dynamic batching would let the server reach.

Set-up, all torn down at the end: a PostgreSQL database `bench_<random>` (platform DB), Redis logical
database 10 (broker; the endpoint never touches it), a local MLflow store (SQLite + artifact folder) in a
temp dir, a model built by the platform (`training_setup.build_model`), logged through the engine's own
`training.log_model` (torch.export program + safetensors + recipe) and registered with
`model_registry.register_version`, then promoted with `model_registry.promote`. The prediction server runs
as deployed: `trainyard serve` with its defaults (gunicorn, 2 processes × 16 threads, torch threads = cores /
processes, bearer tokens remembered 5 s), with the per-token prediction rate limit raised (the default
600/minute would turn the load test into 429s). Ports are found by binding port 0.

The model defaults to resnet18 on the built-in `digits` dataset (1×8×8, CIFAR-style stem): a real image
network whose forward is a few milliseconds on a CPU. `--arch cnn` serves the README's small CNN, whose forward
is ~0.1 ms, so every ratio then measures HTTP overhead alone.

    .venv/bin/python bench/bench_08_serving.py [--quick] [--repeats N] [--arch resnet18]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _src in ("platform", "workers", "web"):
    if str(ROOT / _src) not in sys.path:
        sys.path.insert(0, str(ROOT / _src))

import harness
import numpy as np
import torch
from harness import compare, percentile, report

MEASURE = "08 serving"
POSTGRES_ADMIN_URL = os.environ.get("BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379")
REDIS_DB = 10
MODEL = "bench-serving"
CLIENTS = 16
SERVE_WORKERS, SERVE_THREADS = 2, 16  # `trainyard serve`'s defaults
API_WORKERS, API_THREADS = 2, 4  # the API app as `make up` runs it (TRAINYARD_WEB_WORKERS default, launcher)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def postgres_database():
    import psycopg

    name = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def redis_database(index: int):
    import redis

    url = f"{REDIS_URL}/{index}"
    redis.Redis.from_url(url).flushdb()
    try:
        yield url
    finally:
        redis.Redis.from_url(url).flushdb()


@contextmanager
def process(argv: list[str], env: dict[str, str], log_path: Path):
    """A child in its own process group (gunicorn and uvicorn fork workers), stopped with the whole group."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def child_env(settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINYARD_")}
    env.update({
        "TRAINYARD_DATA_DIR": str(settings.data_dir), "TRAINYARD_DATABASE_URL": settings.database_url,
        "TRAINYARD_BROKER_URL": settings.broker_url, "TRAINYARD_MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
        "TRAINYARD_MLFLOW_ARTIFACT_ROOT": settings.mlflow_artifact_root,
        "TRAINYARD_PREDICT_RATE_LIMIT": "1000000/minute",
        "PYTHONPATH": os.pathsep.join([str(ROOT / p) for p in ("platform", "workers", "web")]
                                      + [env_path for env_path in [os.environ.get("PYTHONPATH", "")] if env_path]),
        **extra,
    })
    return env


def wait_http(port: int, path: str, proc: subprocess.Popen, log_path: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", path)
            if conn.getresponse().status < 500:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"server on port {port} not ready after {timeout}s:\n{log_path.read_text()[-3000:]}")


def log_and_register(settings, architecture: str, seed: int, dataset_name: str = "digits", copies: int = 1):
    """A model built by the platform, logged by the engine's log_model and registered `copies` times (each a
    version of its own over the same files): returns (versions, the job data)."""
    from trainyard.datasets import get_dataset
    from trainyard.db import Database
    from trainyard.model_registry import register_version
    from trainyard.specs import JobSpec
    from trainyard.tracking import JobRun
    from trainyard_workers.training import PRIMARY_METRIC, job_data, log_model
    from trainyard_workers.training_setup import build_model

    spec = JobSpec.model_validate({"kind": "train", "dataset": dataset_name, "architecture": architecture,
                                   "params": {"epochs": 1, "seed": seed}})
    db = Database(settings.database_url)
    try:
        dataset = get_dataset(db, dataset_name)
    finally:
        db.dispose()
    torch.manual_seed(seed)
    data = job_data(dataset, spec, torch.Generator().manual_seed(seed), None, torch.device("cpu"))
    model = build_model(spec, data.splits, torch.device("cpu"))
    run = JobRun.start(settings, job_id=0, name=f"bench-{architecture}-{seed}", spec=spec.model_dump(mode="json"))
    uri = log_model(run, model, spec, data)
    primary = "test_" + PRIMARY_METRIC[data.splits.task]
    versions = [register_version(settings, name=MODEL, model_uri=uri, run_id=run.run_id, job_id=0,
                                 primary_metric=primary, metrics={primary: 0.5}, tags={}).version
                for _ in range(copies)]
    run.end()
    return versions, data


class Platform:
    """PostgreSQL + Redis + MLflow store + a logged, registered, promoted model; gunicorn started by `serve`."""

    def __init__(self, stack: ExitStack, tmp: Path, architecture: str, versions: int = 1,
                 redis_db: int = REDIS_DB) -> None:
        from trainyard import auth, model_registry
        from trainyard.config import Settings
        from trainyard.datasets import ensure_builtin_datasets
        from trainyard.db import Database, upgrade_schema
        from trainyard.tracking import prepare_tracking_store

        self.stack, self.tmp = stack, tmp
        database_url = stack.enter_context(postgres_database())
        broker_url = stack.enter_context(redis_database(redis_db))
        self.settings = Settings(data_dir=tmp / "data", database_url=database_url, broker_url=broker_url)
        self.settings.ensure_data_dir()
        upgrade_schema(database_url)
        prepare_tracking_store(self.settings)
        db = Database(database_url)
        try:
            ensure_builtin_datasets(db)
            self.token = auth.create_token(db, user="bench", role="admin", created_by="bench")[1]
        finally:
            db.dispose()
        self.versions, self.data = log_and_register(self.settings, architecture, 0, copies=versions)
        db = Database(database_url)
        try:
            model_registry.promote(db, self.settings, name=MODEL, alias="production", version=self.versions[0],
                                   actor="bench")
        finally:
            db.dispose()

    def serve(self) -> int:
        """The prediction server as deployed: `trainyard serve` with its defaults; returns its port."""
        port = free_port()
        log_path = self.tmp / f"serve-{port}.log"
        proc = self.stack.enter_context(process(
            [sys.executable, "-m", "trainyard", "serve", "--port", str(port), "--workers", str(SERVE_WORKERS),
             "--threads", str(SERVE_THREADS)], child_env(self.settings), log_path))
        wait_http(port, "/api/v1/health", proc, log_path)
        return port

    def api(self) -> int:
        """The web app (UI + API) under gunicorn as `make up` runs it; returns its port."""
        port = free_port()
        log_path = self.tmp / f"api-{port}.log"
        proc = self.stack.enter_context(process(
            [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", str(API_WORKERS),
             "--threads", str(API_THREADS), "trainyard_web:create_app()"], child_env(self.settings), log_path))
        wait_http(port, "/api/v1/health", proc, log_path)
        return port


def png_of(image: torch.Tensor) -> bytes:
    from PIL import Image

    array = image.numpy()
    array = array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def multipart(png: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


class Endpoint:
    """One kept-alive HTTP connection posting the same request body."""

    def __init__(self, port: int, path: str, body: bytes, headers: dict[str, str]) -> None:
        self.port, self.path, self.body, self.headers = port, path, body, headers
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def post(self) -> bytes:
        try:
            self.conn.request("POST", self.path, self.body, self.headers)
            response = self.conn.getresponse()
        except (http.client.HTTPException, OSError):  # a dropped keep-alive connection: reconnect once
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            self.conn.request("POST", self.path, self.body, self.headers)
            response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"POST {self.path} → {response.status}: {data[:500]!r}")
        return data

    def close(self) -> None:
        self.conn.close()


def p50_ms_of(fn, count: int) -> float:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return percentile(times, 50)


def throughput(make_client, seconds: float, clients: int = CLIENTS) -> float:
    """Requests/s of `clients` threads each posting back to back for `seconds` (after a connect)."""
    endpoints = [make_client() for _ in range(clients)]
    counts = [0] * clients
    stop = threading.Event()
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients + 1)

    def hammer(i: int) -> None:
        barrier.wait()
        try:
            while not stop.is_set():
                endpoints[i].post()
                counts[i] += 1
        except Exception as exc:  # noqa: BLE001 - any client failure is reported after the run
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    done_at = time.perf_counter()
    for t in threads:
        t.join(timeout=120)
    for e in endpoints:
        e.close()
    if errors:
        raise RuntimeError(f"{len(errors)} client errors, first: {errors[0]}")
    return sum(counts) / (done_at - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18", help="architecture of the served model (digits dataset)")
    args = harness.parse_args(parser=parser)
    requests_per_rep = 40 if args.quick else 200
    load_seconds = 3.0 if args.quick else 10.0
    tmp = Path(tempfile.mkdtemp(prefix="bench08-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, True)
        print(f"{MEASURE}: setting up PostgreSQL, Redis db {REDIS_DB}, MLflow store, {args.arch} on digits ...",
              flush=True)
        plat = Platform(stack, tmp, args.arch)
        port = plat.serve()
        from trainyard.ml.servable import preprocess
        from trainyard.model_registry import load_version

        loaded = load_version(plat.settings, MODEL, plat.versions[0])
        image = plat.data.splits.test.tensors[0][0]
        png = png_of(image)
        x1 = preprocess(loaded, [("x.png", png)])
        x16 = x1.repeat(CLIENTS, 1, 1, 1)
        x_server = x1.repeat(min(SERVE_THREADS, CLIENTS), 1, 1, 1)  # the largest batch one process can form
        module = loaded.module
        all_threads = torch.get_num_threads()
        process_threads = max(1, (os.cpu_count() or 1) // SERVE_WORKERS)  # what one serving process uses

        def bare_forward(x, threads: int = all_threads):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                return module(x)

        body, content_type = multipart(png)
        headers = {"Authorization": f"Bearer {plat.token}", "Content-Type": content_type}
        path = f"/api/v1/models/{MODEL}/predict?alias=production&top_k=5"
        sequential = Endpoint(port, path, body, headers)
        answer = json.loads(sequential.post())
        assert answer["version"] == plat.versions[0], answer
        print(f"  platform answers: version {answer['version']}, top-1 {answer['predictions'][0]['top'][0]}",
              flush=True)

        # ---- (a) batch-1 p50 latency
        latency = compare(MEASURE, "(a) batch-1 p50 latency", lambda: p50_ms_of(sequential.post, requests_per_rep),
                          lambda: p50_ms_of(lambda: bare_forward(x1, process_threads), requests_per_rep),
                          repeats=args.repeats, unit="ms", higher_is_better=False, warmup=1)
        sequential.close()
        latency.extra.update(overhead_ms=round(latency.difference, 3), model=f"{args.arch} digits 1x8x8",
                             requests_per_rep=requests_per_rep)

        # ---- mlflow models serve on the same version
        mlflow_port = free_port()
        mlflow_log = tmp / "mlflow-serve.log"
        mlflow_proc = stack.enter_context(process(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}/{plat.versions[0]}",
             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(mlflow_port),
             "--workers", str(SERVE_WORKERS)],
            # It runs `uvicorn` from PATH: the venv's bin folder goes first.
            {**child_env(plat.settings), "MLFLOW_TRACKING_URI": plat.settings.mlflow_tracking_uri,
             "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])},
            mlflow_log))
        wait_http(mlflow_port, "/ping", mlflow_proc, mlflow_log)
        mlflow_body = json.dumps({"inputs": x1.numpy().tolist()}).encode()
        mlflow_headers = {"Content-Type": "application/json"}
        probe = json.loads(Endpoint(mlflow_port, "/invocations", mlflow_body, mlflow_headers).post())
        same = int(np.argmax(np.asarray(probe["predictions"])[0])) == int(answer["predictions"][0]["top"][0]["label"])
        print(f"  mlflow models serve answers (same top-1 as the platform: {same})", flush=True)

        def platform_load() -> float:
            return throughput(lambda: Endpoint(port, path, body, headers), load_seconds)

        def mlflow_load() -> float:
            return throughput(lambda: Endpoint(mlflow_port, "/invocations", mlflow_body, mlflow_headers), load_seconds)

        def bare_load(x: torch.Tensor):
            def run() -> float:
                count, started = 0, time.perf_counter()
                while time.perf_counter() - started < load_seconds:
                    bare_forward(x)
                    count += len(x)
                return count / (time.perf_counter() - started)
            return run

        # ---- (b) 16 concurrent clients vs bare forwards at the batch the server forms
        vs_bare = compare(MEASURE, f"(b) 16 clients vs bare batch-{SERVE_THREADS}", platform_load,
                          bare_load(x_server),
                          repeats=args.repeats, unit="predictions/s", higher_is_better=True, warmup=1)
        vs_mlflow = compare(MEASURE, "(b) 16 clients vs mlflow models serve", platform_load, mlflow_load,
                            repeats=args.repeats, unit="predictions/s", higher_is_better=True, warmup=1)
        batch16 = compare(MEASURE, "(b) bare batch-16 vs bare batch-1 (what dynamic batching could reach)",
                          bare_load(x16), bare_load(x1), repeats=args.repeats, unit="predictions/s",
                          higher_is_better=True, warmup=1)
        mlflow_latency = p50_ms_of(Endpoint(mlflow_port, "/invocations", mlflow_body, mlflow_headers).post,
                                   requests_per_rep)

        quick = "; --quick" if args.quick else ""
        report(latency, "≤ bare + 3 ms", latency.difference <= 3.0,
               f"trainyard serve {SERVE_WORKERS}x{SERVE_THREADS} threads, bare with {process_threads} torch "
               f"thread(s) as one serving process, PostgreSQL, multipart PNG, top_k=5; "
               f"mlflow models serve p50 {mlflow_latency:.2f} ms (preprocessed JSON){quick}")
        vs_bare.extra.update(server_batch_max=SERVE_THREADS, bare_batch16_per_s=round(batch16.platform_median, 1),
                             platform_vs_bare_batch16=round(vs_bare.platform_median / batch16.platform_median, 3))
        report(vs_bare, "≥ 0.7 of bare", vs_bare.ratio >= 0.7,
               f"dynamic batching forms at most {SERVE_THREADS} per process (one per thread); bare on all "
               f"{all_threads} threads; vs bare at batch 16 "
               f"{vs_bare.extra['platform_vs_bare_batch16']:.3f}{quick}")
        vs_mlflow.extra.update(mlflow_top1_agrees=same, mlflow_workers=SERVE_WORKERS)
        report(vs_mlflow, "≥ 2× mlflow models serve", vs_mlflow.ratio >= 2.0,
               f"mlflow models serve --env-manager local --workers {SERVE_WORKERS}, same version, "
               f"preprocessed JSON inputs{quick}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
