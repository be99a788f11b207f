"""The `trainyard` command against a live web server, a real worker and the embedded `trainyard up`."""

from __future__ import annotations

import os
import stat
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest
from typer.testing import CliRunner
from werkzeug.serving import make_server

from trainyard.cli import app as cli
from trainyard.db import upgrade_schema
from trainyard_web import create_app
from conftest import ROOT, WorkerProcess, make_settings, make_token


@pytest.fixture
def live(tmp_path):
    settings = make_settings(tmp_path).model_copy(update={"heartbeat_seconds": 0.5})
    upgrade_schema(settings.database_url)
    server = make_server("127.0.0.1", 0, create_app(settings), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {"TRAINYARD_API_URL": f"http://127.0.0.1:{server.server_port}", "TRAINYARD_DATA_DIR": str(tmp_path / "cli"),
           "TRAINYARD_TOKEN": make_token(settings)}
    yield settings, env
    server.shutdown()


def run(args: list[str], env: dict[str, str]):
    return CliRunner().invoke(cli, args, env=env)


def test_submit_status_and_jobs(live, start_worker):
    settings, env = live
    start_worker(settings)
    result = run(["submit", "-d", "digits", "-a", "cnn", "-p", "epochs=2", "-p", "lr=0.002", "--watch"], env)
    assert result.exit_code == 0, result.output
    assert "submitted job 1" in result.output and "SUCCEEDED" in result.output
    status = run(["status", "1"], env)
    assert status.exit_code == 0 and "SUCCEEDED" in status.output and "val_accuracy" in status.output
    assert "QUEUED → RUNNING" in status.output
    listing = run(["jobs"], env)
    assert listing.exit_code == 0 and "cnn-digits" in listing.output


def test_submit_refusals_are_clear(live):
    _, env = live
    bad = run(["submit", "-d", "digits", "-a", "cnn", "-p", "epochs=0"], env)
    assert bad.exit_code == 1 and "params.epochs" in bad.output
    malformed = run(["submit", "-d", "digits", "-a", "cnn", "-p", "epochs"], env)
    assert malformed.exit_code == 2 and "key=value" in malformed.output
    assert "cnn-digits" not in run(["jobs"], env).output  # nothing was submitted
    assert run(["status", "77"], env).exit_code == 1


def test_unreachable_server_is_explained(tmp_path):
    result = run(["jobs"], {"TRAINYARD_API_URL": "http://127.0.0.1:1", "TRAINYARD_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 2 and "cannot reach Trainyard" in result.output


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_trainyard_up_runs_a_job_and_stops_cleanly_on_ctrl_c(tmp_path):
    port, mlflow_port = free_port(), free_port()
    env = {**os.environ, "TRAINYARD_DATA_DIR": str(tmp_path / "data"), "TRAINYARD_PORT": str(port),
           "TRAINYARD_MLFLOW_PORT": str(mlflow_port), "TRAINYARD_WEB_WORKERS": "1",
           "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("platform", "workers", "web"))}
    for key in ("TRAINYARD_DATABASE_URL", "TRAINYARD_BROKER_URL", "TRAINYARD_MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    log = open(tmp_path / "up.log", "w+")
    up = subprocess.Popen([sys.executable, "-m", "trainyard", "up"], env=env, stdout=log,
                          stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 240
        while "Trainyard is up" not in (tmp_path / "up.log").read_text():
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            time.sleep(0.5)
        output = (tmp_path / "up.log").read_text()
        assert f"http://127.0.0.1:{port}/" in output and f"http://127.0.0.1:{mlflow_port}" in output

        token_file = tmp_path / "data" / "admin-token"
        token = token_file.read_text().strip()
        assert token in output and stat.S_IMODE(token_file.stat().st_mode) == 0o600  # printed once, kept 0600
        anonymous = httpx.Client(base_url=f"http://127.0.0.1:{port}/api/v1", timeout=30)
        assert anonymous.get("/health").json()["status"] == "ok"
        assert anonymous.get("/jobs").status_code == 401
        api = httpx.Client(base_url=f"http://127.0.0.1:{port}/api/v1", timeout=30,
                           headers={"Authorization": f"Bearer {token}"})
        # The MLflow UI has no login: it must not be reachable from other machines.
        mlflow_listeners = [c for c in psutil.net_connections("tcp")
                            if c.status == psutil.CONN_LISTEN and c.laddr.port == mlflow_port]
        assert mlflow_listeners and {c.laddr.ip for c in mlflow_listeners} == {"127.0.0.1"}
        job = api.post("/jobs", json={"kind": "train", "dataset": "digits", "architecture": "cnn",
                                      "params": {"epochs": 2}}).json()
        deadline = time.monotonic() + 180
        while (current := api.get(f"/jobs/{job['id']}").json())["status"] not in {"SUCCEEDED", "FAILED"}:
            assert time.monotonic() < deadline, current
            time.sleep(0.5)
        assert current["status"] == "SUCCEEDED", current["error"]
        assert httpx.get(f"http://127.0.0.1:{mlflow_port}/health", timeout=10).status_code == 200
        assert (tmp_path / "data" / "trainyard.db").exists() and (tmp_path / "data" / "mlflow.db").exists()

        # Draining the worker pool leaves the rest of the platform up.
        drained = subprocess.run([sys.executable, "-m", "trainyard", "worker", "--drain", "--wait"], env=env,
                                 cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert drained.returncode == 0, drained.stdout + drained.stderr
        deadline = time.monotonic() + 60
        while "worker pool drained" not in (tmp_path / "up.log").read_text():
            assert time.monotonic() < deadline and up.poll() is None, (tmp_path / "up.log").read_text()
            time.sleep(0.5)
        assert api.get("/health").status_code in (200, 503) and up.poll() is None
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(timeout=60)
    assert code == 0, (tmp_path / "up.log").read_text()
    for p in (port, mlflow_port):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", p)) != 0, f"port {p} still open after Ctrl-C"


def test_datasets_register_list_and_show(live):
    from PIL import Image

    settings, env = live
    folder = settings.dataset_roots[0] / "two colours"
    for label, colour in (("rot", (200, 0, 0)), ("grün", (0, 200, 0))):
        (folder / label).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (12, 12), colour).save(folder / label / f"{i}.png")
    registered = run(["datasets", "register", "colours", str(folder), "--format", "imagefolder"], env)
    assert registered.exit_code == 0, registered.output
    assert "10 samples" in registered.output and "2 classes" in registered.output
    listing = run(["datasets", "list"], env)
    assert "colours" in listing.output and "digits" in listing.output and "shapes" in listing.output
    assert "grün" in run(["datasets", "show", "colours"], env).output
    refused = run(["datasets", "register", "etc", "/etc", "--format", "imagefolder"], env)
    assert refused.exit_code == 1 and "outside the allowed folders" in refused.output


def test_tokens_create_list_and_revoke(live):
    settings, env = live
    created = run(["tokens", "create", "ada", "--role", "member", "--name", "laptop"], env)
    assert created.exit_code == 0, created.output
    secret = created.output.strip().splitlines()[-1]
    assert secret.startswith("ty_")
    as_ada = {**env, "TRAINYARD_TOKEN": secret}
    listed = run(["tokens", "list"], as_ada)
    assert listed.exit_code == 0 and "ada" in listed.output and secret not in listed.output
    refused = run(["tokens", "create", "eve", "--role", "admin"], as_ada)  # a member mints no tokens
    assert refused.exit_code == 1 and "403" in refused.output
    token_id = next(line.split("│")[1].strip() for line in listed.output.splitlines() if "ada" in line)
    assert run(["tokens", "revoke", token_id], as_ada).exit_code == 0
    after = run(["jobs"], as_ada)
    assert after.exit_code == 1 and "revoked" in after.output and "TRAINYARD_TOKEN" in after.output


SWEEP_YAML = """\
name: cli sweep
algorithm: grid
max_trials: 2
max_parallel: 1
register: none
base:
  dataset: digits
  architecture: cnn
  params: {epochs: 1, batch_size: 64}
space:
  params.lr: {type: choice, values: [0.003, 0.001]}
"""


def test_sweeps_submit_watch_status_list_and_cancel(live, start_worker, tmp_path):
    settings, env = live
    start_worker(settings)
    sweeper = WorkerProcess(settings, tmp_path / "sweeper.log", command="sweeper")
    try:
        spec = tmp_path / "sweep.yaml"
        spec.write_text(SWEEP_YAML)
        result = run(["sweeps", "submit", str(spec), "--watch"], env)
        assert result.exit_code == 0, result.output + sweeper.log()[-3000:]
        assert "sweep 1 cli sweep: RUNNING" in result.output and "SUCCEEDED" in result.output
        assert "best: trial" in result.output and "params.lr" in result.output
        status = run(["sweeps", "status", "1"], env)
        assert status.exit_code == 0 and "2/2 done" in status.output
        assert run(["sweeps", "list"], env).output.count("cli sweep") == 1
        assert "1 #1" in run(["jobs"], env).output  # the trials are jobs, shown with their sweep and number

        spec.write_text(SWEEP_YAML.replace("max_trials: 2", "max_trials: 20").replace("epochs: 1", "epochs: 50"))
        assert run(["sweeps", "submit", str(spec)], env).exit_code == 0
        cancelled = run(["sweeps", "cancel", "2"], env)
        assert cancelled.exit_code == 0 and "CANCELLED" in cancelled.output
        again = run(["sweeps", "cancel", "2"], env)
        assert again.exit_code == 1 and "already CANCELLED" in again.output

        spec.write_text(SWEEP_YAML.replace("params.lr:", "params.lrr:"))
        refused = run(["sweeps", "submit", str(spec)], env)
        assert refused.exit_code == 1 and "space.params.lrr" in refused.output
        spec.write_text("name: [unclosed")
        assert run(["sweeps", "submit", str(spec)], env).exit_code == 2
    finally:
        sweeper.stop()
