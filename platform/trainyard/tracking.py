"""MLflow access: the job's run, its params and metrics, and the trained model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from trainyard.config import Settings

JOB_ID_TAG = "trainyard.job_id"


def tracking_client(settings: Settings) -> MlflowClient:
    return MlflowClient(tracking_uri=settings.mlflow_tracking_uri)


def ensure_experiment(client: MlflowClient, settings: Settings) -> str:
    """The platform's experiment id, created with its artifact root on first use."""
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


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """{"params": {"lr": 0.1}} → {"params.lr": "0.1"}: MLflow params are flat strings."""
    if isinstance(value, Mapping):
        out: dict[str, str] = {}
        for key, inner in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), inner))
        return out
    return {prefix: "" if value is None else str(value)}


class JobRun:
    """One job's MLflow run. Metrics go out as one `log_batch` per call, never one request per value."""

    def __init__(self, settings: Settings, run_id: str) -> None:
        self.settings = settings
        self.client = tracking_client(settings)
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
        return cls(settings, run.info.run_id)

    def log_metrics(self, metrics: Mapping[str, float], step: int, timestamp_ms: int) -> None:
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), timestamp_ms, step) for k, v in metrics.items()]
        )

    def log_pytorch_model(self, model, input_example) -> str:
        """Log `model` as a torch.export program (no pickle), batch dimension dynamic; returns the model URI."""
        import mlflow.pytorch
        from mlflow.models import infer_signature

        mlflow.set_tracking_uri(self.settings.mlflow_tracking_uri)
        signature = infer_signature(input_example, model(_as_tensor(input_example)).detach().numpy())
        with mlflow.start_run(run_id=self.run_id):
            info = mlflow.pytorch.log_model(
                model, name="model", serialization_format="pt2", signature=signature,
                input_example=input_example, pip_requirements=["torch", "torchvision"],
            )
        return info.model_uri

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def _as_tensor(array):
    import torch

    return torch.from_numpy(array)


def run_status_for(job_status: str) -> str:
    """The MLflow run status matching a job's terminal status."""
    return {
        "SUCCEEDED": RunStatus.to_string(RunStatus.FINISHED),
        "CANCELLED": RunStatus.to_string(RunStatus.KILLED),
    }.get(job_status, RunStatus.to_string(RunStatus.FAILED))
