"""An evaluate job: a finished training job's weights, scored on a dataset split without training."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from trainyard import jobs
from trainyard.jobs import JobView
from trainyard.specs import JobSpec
from trainyard.tracking import JobRun
from trainyard_workers.checkpoints import load_checkpoint
from trainyard_workers.loop import evaluate
from trainyard_workers.training import batches, build_model, load_job_data, log_evaluation_artifacts, new_metrics, prefixed


def run_evaluation(ctx, job: JobView, lease, run: JobRun) -> tuple[dict[str, Any], dict[str, Any]]:
    """Score the source job's final weights on the spec's dataset split; returns (metrics, progress)."""
    spec = JobSpec.model_validate(job.spec)
    source = jobs.get_job(ctx.db, spec.source_job)
    checkpoint = load_checkpoint(source.checkpoint_path, source.checkpoint_sha256)
    # The model is rebuilt from the source job's spec, at the size it was trained on.
    source_spec = JobSpec.model_validate(source.spec)
    eval_spec = spec.model_copy(update={"params": source_spec.params.model_copy(update={"augmentation": "none"})})
    height, width = checkpoint["image_shape"][1:]
    data = load_job_data(ctx, eval_spec, torch.Generator().manual_seed(0), size=(height, width))
    run.log_dataset(name=data.dataset.name, fingerprint=data.dataset.fingerprint,
                    source=data.dataset.path or "builtin", fmt=data.dataset.format, task=data.dataset.task,
                    context=f"evaluation ({spec.split})")
    model = build_model(source_spec.model_copy(update={"weights_path": None}), data.splits, data.device)
    model.load_state_dict(checkpoint["model"])
    split = getattr(data.splits, spec.split)
    result = evaluate(
        model, batches(split, 256, shuffle=False, generator=None, device=data.device), data.pipeline,
        nn.CrossEntropyLoss(), new_metrics(data.splits.task, data.splits.classes), bf16=data.bf16,
        should_stop=lease.should_stop,
    )
    metrics = prefixed(spec.split, result.scalars)
    run.log_metrics(metrics, step=0, timestamp_ms=int(time.time() * 1000))
    log_evaluation_artifacts(run, result, spec.split)
    return {**metrics, "source_job": source.id, "source_checkpoint_epoch": checkpoint["epoch"]}, {"epoch": 0, "epochs": 0}
