"""An evaluate job: trained weights (a finished job's checkpoint, or a registered model version) scored on a
dataset split, with the same metrics as training and nothing trained."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from torch import nn

from trainyard import jobs, model_registry
from trainyard.jobs import JobView
from trainyard.specs import JobSpec
from trainyard.tracking import JobRun
from trainyard_workers.checkpoints import load_checkpoint
from trainyard_workers.loop import evaluate
from trainyard_workers.training import load_job_data, log_evaluation_artifacts, prefixed
from trainyard_workers.training_setup import batches, build_model, new_metrics


@dataclasses.dataclass
class TrainedWeights:
    model: nn.Module | None  # a registered version comes built; a checkpoint's model is built for the data
    state: dict[str, Any] | None
    image_shape: tuple[int, int, int]
    mean: list[float] | None  # the training run's normalisation; None: an old checkpoint without it
    std: list[float] | None
    classes: list[str] | None
    source: dict[str, Any]


def trained_weights(ctx, spec: JobSpec) -> TrainedWeights:
    if spec.source_job is not None:
        source = jobs.get_job(ctx.db, spec.source_job)
        checkpoint = load_checkpoint(source.checkpoint_path, source.checkpoint_sha256)
        # With early stopping the job's model is the best epoch's, kept beside the last epoch's.
        weights = checkpoint.get("best_model") or checkpoint["model"]
        return TrainedWeights(None, weights, tuple(checkpoint["image_shape"]), checkpoint.get("mean"),
                              checkpoint.get("std"), None,
                              {"source_job": source.id, "source_checkpoint_epoch": checkpoint["epoch"]})
    loaded = model_registry.load_version(ctx.settings, spec.model_name, spec.model_version)
    return TrainedWeights(loaded.module, None, loaded.image_shape, loaded.mean.tolist(), loaded.std.tolist(),
                          loaded.classes, {"model_name": spec.model_name, "model_version": spec.model_version})


def run_evaluation(ctx, job: JobView, lease, run: JobRun) -> tuple[dict[str, Any], dict[str, Any]]:
    """Score the spec's trained weights on its dataset split; returns (metrics, progress)."""
    spec = JobSpec.model_validate(job.spec)
    weights = trained_weights(ctx, spec)
    eval_spec = spec.model_copy(update={"params": spec.params.model_copy(update={"augmentation": "none"})})
    data = load_job_data(ctx, eval_spec, torch.Generator().manual_seed(0), size=weights.image_shape[1:])
    if weights.classes is not None and len(weights.classes) != len(data.splits.classes):
        # (A checkpoint's head is checked by load_state_dict below, which names the mismatched layer.)
        raise ValueError(f"the model predicts {len(weights.classes)} classes; "
                         f"{data.dataset.name!r} has {len(data.splits.classes)}")
    if weights.mean is not None:  # inputs are normalised as in training, not by the evaluated data's statistics
        data.pipeline.mean = torch.tensor(weights.mean, device=data.device)
        data.pipeline.std = torch.tensor(weights.std, device=data.device)
    run.log_dataset(name=data.dataset.name, fingerprint=data.dataset.fingerprint,
                    source=data.dataset.path or "builtin", fmt=data.dataset.format, task=data.dataset.task,
                    context=f"evaluation ({spec.split})")
    if weights.model is not None:
        model = weights.model.to(data.device)
    else:
        model = build_model(spec.model_copy(update={"weights_path": None}), data.splits, data.device)
        model.load_state_dict(weights.state)
    result = evaluate(
        model, batches(getattr(data.splits, spec.split), 256, shuffle=False, generator=None, device=data.device),
        data.pipeline, nn.CrossEntropyLoss(), new_metrics(data.splits.task, data.splits.classes), bf16=data.bf16,
        should_stop=lease.should_stop,
    )
    metrics = prefixed(spec.split, result.scalars)
    run.log_metrics(metrics, step=0, timestamp_ms=int(time.time() * 1000))
    log_evaluation_artifacts(run, result, spec.split)
    return {**metrics, **weights.source}, {"epoch": 0, "epochs": 0}

