"""MLflow access: the job's run, its params and metrics, and the trained model."""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import queue
import re
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.tracking import MlflowClient
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random

from trainyard.config import Settings
from trainyard.metric_writer import MetricWriterProcess, WriterUnavailable, log_points, shared_writer

log = logging.getLogger(__name__)

JOB_ID_TAG = "trainyard.job_id"


def quiet_mlflow() -> None:
    """Turn MLflow 3's usage telemetry off in this process and the processes it starts, unless the operator
    set MLFLOW_DISABLE_TELEMETRY themselves. A self-hosted platform does not report its users' use to a third
    party by default, and on a host without internet each process's attempt held up its exit for seconds (a
    worker's pool process is replaced every 100 jobs: 1.3-4.7 s each). Called before MLflow's first use.

    Its artifact progress bars stay off too: with tqdm installed (Optuna brings it) each upload and download
    would write carriage-return bars into the job's own log and the worker's JSON log."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def tracking_client(settings: Settings) -> MlflowClient:
    """The process's client for the settings' tracking store (built once per URI: building one resolves the
    registry URI and its store, ~1.5 ms, and a worker asks several times a job)."""
    return _client_for(settings.mlflow_tracking_uri)


@functools.lru_cache(maxsize=8)
def _client_for(tracking_uri: str) -> MlflowClient:
    quiet_mlflow()
    return MlflowClient(tracking_uri=tracking_uri)


# (tracking URI, experiment name) → id, per process: a worker asks once, not once per job.
_EXPERIMENT_IDS: dict[tuple[str, str], str] = {}


def ensure_experiment(client: MlflowClient, settings: Settings) -> str:
    """The platform's experiment id, created with its artifact root on first use (and remembered)."""
    key = (settings.mlflow_tracking_uri, settings.mlflow_experiment)
    if key not in _EXPERIMENT_IDS:
        _EXPERIMENT_IDS[key] = _find_or_create_experiment(client, settings)
    return _EXPERIMENT_IDS[key]


def _find_or_create_experiment(client: MlflowClient, settings: Settings) -> str:
    exp = client.get_experiment_by_name(settings.mlflow_experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(
            settings.mlflow_experiment, artifact_location=settings.mlflow_artifact_root or None
        )
    except mlflow.exceptions.MlflowException:
        exp = client.get_experiment_by_name(settings.mlflow_experiment)  # a concurrent worker created it
        if exp is None:
            raise
        return exp.experiment_id


def prepare_tracking_store(settings: Settings) -> str:
    """Create or migrate the MLflow store and the platform's experiment, once, before any other process
    touches it: MLflow's own SQLite migrations race when several processes start on a new store."""
    return ensure_experiment(tracking_client(settings), settings)


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """{"params": {"lr": 0.1}} → {"params.lr": "0.1"}: MLflow params are flat strings."""
    if isinstance(value, Mapping):
        out: dict[str, str] = {}
        for key, inner in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), inner))
        return out
    return {prefix: "" if value is None else str(value)}


def _lost_insert_race(exc: BaseException) -> bool:
    """A tracking store's unique-key violation (SQLite or PostgreSQL, as MLflow passes it on)."""
    text = str(exc)
    return isinstance(exc, mlflow.exceptions.MlflowException) and (
        "UNIQUE constraint failed" in text or "duplicate key value" in text)


class JobRun:
    """One job's MLflow run. Metrics go out as one `log_batch` per call, never one request per value."""

    def __init__(self, settings: Settings, run_id: str, client: MlflowClient | None = None) -> None:
        self.settings = settings
        self.client = client or tracking_client(settings)
        self.run_id = run_id

    @classmethod
    def start(cls, settings: Settings, *, job_id: int, name: str, spec: Mapping[str, Any],
              tags: Mapping[str, str] | None = None) -> JobRun:
        client = tracking_client(settings)
        experiment_id = ensure_experiment(client, settings)
        run = client.create_run(
            experiment_id, run_name=f"job-{job_id}-{name}", tags={JOB_ID_TAG: str(job_id), **(tags or {})}
        )
        client.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, v in flatten("", spec).items()])
        return cls(settings, run.info.run_id, client)

    def log_metrics(self, metrics: Mapping[str, float], step: int, timestamp_ms: int) -> None:
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), timestamp_ms, step) for k, v in metrics.items()]
        )

    def log_pytorch_model(self, model, input_example, metadata: Mapping[str, Any] | None = None,
                          extra_files: list[str] | None = None) -> str:
        """Log `model` as a torch.export program (no pickle), batch dimension dynamic; returns the model URI.

        `metadata` (preprocessing, classes) is stored with the model so serving can repeat it exactly.
        """
        import mlflow.pytorch
        from mlflow.models import infer_signature

        mlflow.set_tracking_uri(self.settings.mlflow_tracking_uri)
        signature = infer_signature(input_example, model(_as_tensor(input_example)).detach().numpy())
        with mlflow.start_run(run_id=self.run_id):
            info = mlflow.pytorch.log_model(
                model, name="model", serialization_format="pt2", signature=signature,
                input_example=input_example, pip_requirements=["torch", "torchvision"],
                metadata=dict(metadata or {}), extra_files=extra_files,
            )
        return info.model_uri

    def log_dataset(self, *, name: str, fingerprint: str, source: str, fmt: str, task: str,
                    context: str = "training") -> None:
        """Record the dataset (by content fingerprint) as the run's input."""
        dataset = Dataset(name=name, digest=fingerprint[:36], source_type=fmt, source=json.dumps({"uri": source}),
                          profile=json.dumps({"task": task, "fingerprint": fingerprint}))
        inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])]
        # MLflow looks for the experiment's dataset row, then inserts it: runs starting together (a sweep's
        # trials on several workers) all but one lose that race on its unique key. Once it exists, a retry
        # links this run to it.
        for attempt in Retrying(retry=retry_if_exception(_lost_insert_race), stop=stop_after_attempt(3),
                                wait=wait_random(0.01, 0.1), reraise=True):
            with attempt:
                self.client.log_inputs(self.run_id, inputs)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, dict(data), artifact_file)

    def log_png(self, png: bytes, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_bytes(png)
            self.client.log_artifact(self.run_id, str(path), str(Path(artifact_file).parent or ""))

    def log_image_step(self, png: bytes, key: str, step: int) -> None:
        """An image MLflow shows as a series over steps (e.g. sample predictions every few epochs)."""
        from PIL import Image

        self.client.log_image(self.run_id, Image.open(io.BytesIO(png)), key=key, step=step)

    def log_file(self, path: str | Path, artifact_dir: str) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_dir)

    def start_system_metrics(self):
        """Sample CPU, memory and GPU use into the run every 10 s; returns the monitor (call .finish())."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # resume_logging: a resumed attempt continues the steps of the one before instead of repeating them
        monitor = SystemMetricsMonitor(self.run_id, sampling_interval=10, resume_logging=True,
                                       tracking_uri=self.settings.mlflow_tracking_uri)
        monitor.start()
        return monitor

    def reopen(self) -> None:
        """Mark a run RUNNING again: a resumed attempt continues the same run."""
        self.client.update_run(self.run_id, status="RUNNING")

    def logged_steps(self, key: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


class MetricBuffer:
    """Collects metrics from the training loop and writes them in the background, so a slow store never
    stalls training; values may be device tensors, turned into floats only when written.

    Nothing is written until `commit()`, which the engine calls right after an epoch's checkpoint: an epoch
    cut short by a lost worker is never logged, and its resumed attempt logs every step exactly once.
    A thread hands committed points to this process's metric writer process (see `trainyard.metric_writer`:
    the store's own work never shares the GIL with the loop), at most once per `min_interval` seconds;
    commits that arrive meanwhile (short epochs) ride along in the next write. Where the writer process is
    unavailable the thread writes through MLflow's client itself.
    """

    def __init__(self, run: JobRun, min_interval: float = 1.0, writer: MetricWriterProcess | None = None) -> None:
        self._run = run
        self._min_interval = min_interval
        self._writer = writer or shared_writer()
        self._writer.start(run.settings.mlflow_tracking_uri)  # ready by the first commit
        self._pending: list[tuple[str, Any, int, int]] = []
        self._committed: queue.Queue[list[tuple[str, Any, int, int]] | None] = queue.Queue()
        self._closing = threading.Event()
        self.writes = 0  # writes handed to the store, for tests and the benchmark's report
        self._thread = threading.Thread(target=self._write_forever, name="metric-writer", daemon=True)
        self._thread.start()

    def add(self, key: str, value: Any, step: int) -> None:
        self._pending.append((key, value, step, int(time.time() * 1000)))

    def discard(self) -> None:
        """Drop what was added since the last commit (an epoch whose values the run already holds)."""
        self._pending = []

    def commit(self) -> None:
        pending, self._pending = self._pending, []
        if pending:
            self._committed.put(pending)

    def _write_forever(self) -> None:
        last_write: float | None = None
        closed = False
        while not closed and (points := self._committed.get()) is not None:
            if last_write is not None and not self._closing.is_set():
                self._closing.wait(max(0.0, last_write + self._min_interval - time.monotonic()))
            while True:  # everything committed while we waited goes out in the same write
                try:
                    more = self._committed.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    closed = True
                    break
                points.extend(more)
            last_write = time.monotonic()
            self._write(points)

    def _write(self, points: list[tuple[str, Any, int, int]]) -> None:
        values = [(k, float(v), step, ts) for k, v, step, ts in points]
        try:
            try:
                self._writer.write(self._run.settings.mlflow_tracking_uri, self._run.run_id, values)
            except WriterUnavailable as exc:
                log.warning("%s; writing %d metrics from the training process", exc, len(values))
                log_points(self._run.client, self._run.run_id, values)
            self.writes += 1
        except Exception:  # a store hiccup loses these points, never the job
            log.exception("could not write %d metrics to run %s", len(values), self._run.run_id)

    def close(self) -> None:
        """Write what was committed (uncommitted points are dropped) at once, and stop the writer."""
        self._closing.set()
        self._committed.put(None)
        self._thread.join(timeout=60)


def _as_tensor(array):
    import torch

    return torch.from_numpy(array)


def metric_history(settings: Settings, run_id: str, *, skip: tuple[str, ...] = ("train_step_loss",)
                   ) -> dict[str, list[tuple[int, float]]]:
    """Every metric of a run as (step, value) pairs by step: what the job page's charts draw."""
    client = tracking_client(settings)
    run = client.get_run(run_id)
    history = {}
    for key in sorted(run.data.metrics):
        if key in skip or key.startswith("system/"):
            continue
        points = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        history[key] = sorted(points.items())
    return history


def latest_step_image(settings: Settings, run_id: str, key: str) -> tuple[int, bytes] | None:
    """The newest image logged with `log_image(key=…, step=…)`, as (step, PNG bytes), or None."""
    client = tracking_client(settings)
    best: tuple[int, str] | None = None
    for item in client.list_artifacts(run_id, "images"):
        name = Path(item.path).name
        # MLflow names step images "<key>+step+<n>+timestamp+<ms>+<uuid>.png" (older releases used "%"),
        # each with a compressed .webp twin.
        parts = re.split(r"[%+]", name.removesuffix(".png"))
        if item.is_dir or parts[0] != key or "step" not in parts or not name.endswith(".png"):
            continue
        step = int(parts[parts.index("step") + 1])
        if best is None or step > best[0]:
            best = (step, item.path)
    if best is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, best[1], tmp)
        return best[0], Path(local).read_bytes()


SWEEP_ID_TAG = "trainyard.sweep_id"
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own convention: its UI nests a run under this one


def start_sweep_run(settings: Settings, *, sweep_id: int, name: str, spec: Mapping[str, Any]) -> str:
    """The sweep's parent run, under which every trial's run nests; returns its id."""
    client = tracking_client(settings)
    run = client.create_run(ensure_experiment(client, settings), run_name=f"sweep-{sweep_id}-{name}",
                            tags={SWEEP_ID_TAG: str(sweep_id), "trainyard.kind": "sweep"})
    searched = {key: value for key, value in spec.items() if key != "base"}
    client.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, v in flatten("", searched).items()])
    return run.info.run_id


def end_sweep_run(settings: Settings, run_id: str, status: str, *, best: Mapping[str, Any] | None = None,
                  metrics: Mapping[str, float] | None = None) -> None:
    """Close the sweep's run with its best trial's parameters (as best.<path> tags) and figures."""
    client = tracking_client(settings)
    if best:
        client.set_tag(run_id, "trainyard.best_params", json.dumps(best, sort_keys=True)[:5000])
    if metrics:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    client.set_terminated(run_id, status=status)


def logged_model_uri(settings: Settings, run_id: str) -> str | None:
    """The `models:/` URI of the model a run logged last (MLflow 3 links logged models as run outputs)."""
    outputs = tracking_client(settings).get_run(run_id).outputs
    models = outputs.model_outputs if outputs is not None else []
    return f"models:/{models[-1].model_id}" if models else None
