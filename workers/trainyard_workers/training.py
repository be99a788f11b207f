"""A training job: data, model, optimizer, the epoch loop, checkpoints, metrics and the logged model."""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainyard import attempts, sweeps
from trainyard.datasets import DatasetView, get_dataset
from trainyard.jobs import JobView
from trainyard.metric_writer import shared_writer
from trainyard.ml.datasets import ImageSplits
from trainyard.ml.metrics import PRIMARY_METRIC, confusion_matrix_png, segmentation_overlay_png
from trainyard.ml.servable import METADATA_FILE, WEIGHTS_FILE
from trainyard.model_registry import register_version
from trainyard.specs import JobSpec, TrainParams
from trainyard.tracking import JobRun, MetricBuffer
from trainyard_workers.checkpoints import (
    ResumePoint,
    latest_usable_checkpoint,
    prune_checkpoints,
    remove_checkpoint,
    rng_state,
    save_checkpoint,
)
from trainyard_workers.db_retry import call_db
from trainyard_workers.distributed import Rank0, threads_per_rank
from trainyard_workers.loop import BatchPipeline, StopRequested, TrialPruned, evaluate, train_one_epoch
from trainyard_workers.training_setup import (
    SingleDevice,
    batches,
    build_training_parts,
    decode_splits,
    make_pipeline,
    new_metrics,
    restore_training_state,
    select_device,
    training_module,
    use_bf16,
)

log = logging.getLogger(__name__)

OVERLAY_EVERY = 5  # epochs between segmentation sample images


@dataclass
class JobData:
    dataset: DatasetView
    splits: ImageSplits
    device: torch.device
    pipeline: BatchPipeline
    bf16: bool


def load_job_data(ctx, spec: JobSpec, generator: torch.Generator, size: tuple[int, int] | None = None) -> JobData:
    """Decode the dataset into memory (at `size`, else params.image_size, else the dataset's own size)."""
    dataset = call_db(get_dataset, ctx.db, spec.dataset)
    return job_data(dataset, spec, generator, size, select_device())


def job_data(dataset: DatasetView, spec: JobSpec, generator: torch.Generator, size: tuple[int, int] | None,
             device: torch.device) -> JobData:
    splits = decode_splits(dataset.format, dataset.path, spec.params, size)
    pipeline = make_pipeline(splits, device, spec.params, generator)
    return JobData(dataset, splits, device, pipeline, use_bf16(device, spec.params.precision))


def model_metadata(spec: JobSpec, data: JobData) -> dict[str, Any]:
    """What serving needs to preprocess exactly as training did."""
    splits = data.splits
    return {
        "trainyard": {
            "task": splits.task, "classes": splits.classes, "image_shape": list(splits.image_shape),
            "mean": splits.mean, "std": splits.std, "architecture": spec.architecture,
            "architecture_options": spec.architecture_options,
            "dataset": data.dataset.name, "dataset_fingerprint": data.dataset.fingerprint,
        }
    }


def prefixed(prefix: str, scalars: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_{k}": v for k, v in scalars.items()}


def run_training(ctx, job: JobView, lease, run: JobRun) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train the job's architecture on its dataset, with DDP over N devices when resources.gpus is N > 1;
    returns (final metrics, final progress)."""
    spec = JobSpec.model_validate(job.spec)
    torch.manual_seed(spec.params.seed)
    dataset = call_db(get_dataset, ctx.db, spec.dataset)
    point = resume_state(ctx, job)
    run.client.set_tag(run.run_id, "trainyard.world_size", str(spec.resources.gpus))
    with devices_for(ctx, job, spec, dataset, point) as devices:
        try:
            return train(ctx, job, lease, run, spec, dataset, point, devices)
        except StopRequested:
            raise
        except Exception as exc:
            failure = devices.describe_failure(exc)  # a collective broken by a dead rank names that rank
            if failure is exc:
                raise
            raise failure from exc


def devices_for(ctx, job: JobView, spec: JobSpec, dataset: DatasetView, point: ResumePoint | None):
    """This process alone, or rank 0 of a DDP job whose other ranks it starts from a plan of their own."""
    world_size = spec.resources.gpus
    if world_size == 1:
        return SingleDevice(spec.params.seed)
    plan = {"job_id": job.id, "spec": job.spec, "dataset": {"format": dataset.format, "path": dataset.path},
            "resume": str(point.path) if point is not None and point.state is not None else None}
    threads = ctx.settings.torch_threads or os.cpu_count() or 1
    return Rank0(plan, world_size, threads_per_rank(threads, world_size))


def train(ctx, job: JobView, lease, run: JobRun, spec: JobSpec, dataset: DatasetView, point: ResumePoint | None,
          devices: SingleDevice | Rank0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Rank 0's (or the only process's) training: the epochs, checkpoints, metrics and the logged model."""
    params: TrainParams = spec.params
    shared_writer().start(ctx.settings.mlflow_tracking_uri)  # sets MLflow up while the data and model are built
    data = job_data(dataset, spec, devices.augmentation_generator, None, devices.device)
    splits, device = data.splits, data.device
    run.log_dataset(name=data.dataset.name, fingerprint=data.dataset.fingerprint, source=data.dataset.path or "builtin",
                    fmt=data.dataset.format, task=data.dataset.task)

    parts = build_training_parts(spec, splits, device, devices.train_batches(splits.train, params.batch_size))
    # `model` is the unwrapped module: validation, checkpoints, the test pass and the logged model use it
    # on rank 0 alone; only the training step goes through the (DDP-)wrapped one.
    model, optimizer, scheduler, per_batch = parts.model, parts.optimizer, parts.scheduler, parts.per_batch
    loss_fn, train_batches = parts.loss_fn, parts.train_batches
    eval_size = max(params.batch_size, 256)
    val_batches = batches(splits.val, eval_size, shuffle=False, generator=None, device=device)
    metrics = new_metrics(splits.task, splits.classes)
    primary = PRIMARY_METRIC[splits.task]

    step_metrics = MetricBuffer(run)
    monitor = run.start_system_metrics()
    checkpoint_dir = ctx.settings.checkpoint_dir / f"job-{job.id}"
    last_checkpoint: Path | None = None
    best = {"value": -1.0, "epoch": 0, "state": None}
    summary: dict[str, Any] = {}
    progress: dict[str, Any] = {}
    start_epoch = 1
    # Epochs whose metrics an earlier attempt already logged: retrained after falling back past a torn
    # checkpoint, they are not logged again (MLflow keeps one value per epoch, the first).
    logged_epochs: set[int] = run.logged_steps("train_loss") if point is not None else set()
    resumed = point.state if point is not None else None
    if resumed is not None:
        last_checkpoint = point.path
        restore_training_state(parts, resumed, devices.data_generator)
        best.update(value=resumed["best"]["value"], epoch=resumed["best"]["epoch"], state=resumed.get("best_model"))
        start_epoch, summary = resumed["epoch"] + 1, dict(resumed["summary"])
        if "stopped_early_at_epoch" in summary or "pruned_at_epoch" in summary:
            start_epoch = params.epochs + 1  # the lost attempt had already decided to stop
        progress = {"epoch": resumed["epoch"], "epochs": params.epochs, "batch": 0, "batches": len(train_batches)}
        epoch_history = checkpointed_epoch_metrics(resumed)
        missing = sorted(set(epoch_history) - logged_epochs)
        if missing:
            # The lost attempt checkpointed these epochs but died before their metrics reached the store.
            for logged_epoch in missing:
                for key, value in epoch_history[logged_epoch].items():
                    step_metrics.add(key, value, logged_epoch)
            step_metrics.commit()
            logged_epochs.update(missing)
    else:
        epoch_history = {}
    try:
        devices.start()
        trained = training_module(devices.wrap(model), params)
        stop_check = devices.stop_check(lease.should_stop)  # agreed by all ranks, once per batch
        for epoch in range(start_epoch, params.epochs + 1):
            devices.announce_epoch(epoch)
            started = time.perf_counter()
            step0 = (epoch - 1) * len(train_batches)

            def on_batch(i: int, loss: torch.Tensor, epoch: int = epoch, step0: int = step0) -> None:
                lease.progress = {"epoch": epoch - 1, "epochs": params.epochs, "batch": i,
                                  "batches": len(train_batches)}
                step_metrics.add("train_step_loss", loss, step0 + i)  # with DDP: rank 0's slice of the batch

            train_loss = train_one_epoch(
                trained, train_batches, optimizer, data.pipeline, loss_fn, bf16=data.bf16,
                grad_clip_norm=params.grad_clip_norm, batch_scheduler=scheduler if per_batch else None,
                should_stop=stop_check, on_batch=on_batch,
            )
            train_loss = devices.epoch_loss(train_loss)
            if scheduler is not None and not per_batch:
                scheduler.step()
            val = evaluate(model, val_batches, data.pipeline, loss_fn, metrics, bf16=data.bf16,
                           should_stop=lease.should_stop)
            epoch_metrics = {"train_loss": train_loss, **prefixed("val", val.scalars),
                             "lr": optimizer.param_groups[0]["lr"], "epoch_seconds": time.perf_counter() - started}
            if val.scalars[primary] > best["value"]:
                best.update(value=val.scalars[primary], epoch=epoch,
                            state=copy.deepcopy(model.state_dict()) if params.early_stopping_patience else None)
            summary = {**epoch_metrics, f"best_val_{primary}": best["value"], "best_epoch": best["epoch"]}
            progress = {"epoch": epoch, "epochs": params.epochs, "batch": len(train_batches),
                        "batches": len(train_batches)}

            patience = params.early_stopping_patience
            if patience is not None and epoch - best["epoch"] >= patience:
                summary["stopped_early_at_epoch"] = epoch
            # A sweep's trial reports its objective and learns whether its sweep stops it here; asked before the
            # checkpoint, so a resumed attempt finds the decision in it.
            last = epoch == params.epochs or "stopped_early_at_epoch" in summary
            if job.sweep_id is not None and call_db(sweeps.report_epoch, ctx.db, job.id, epoch, epoch_metrics,
                                                    last=last):
                summary["pruned_at_epoch"] = epoch

            # Checkpoint first, metrics second: a resumed attempt never logs an epoch twice. A new file per
            # epoch: the one the job row names is never overwritten, even by an attempt fenced off meanwhile.
            checkpoint_path = checkpoint_dir / f"attempt-{job.attempt}-epoch-{epoch}.pt"
            epoch_history[epoch] = epoch_metrics
            sha = save_checkpoint({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else {},
                "epoch": epoch, "rng": rng_state(devices.data_generator), "spec": job.spec, "metrics": epoch_metrics,
                "epoch_history": epoch_history,
                "summary": summary, "image_shape": list(splits.image_shape), "mean": splits.mean, "std": splits.std,
                "best": {"value": best["value"], "epoch": best["epoch"]}, "best_model": best["state"],
            }, checkpoint_path)
            lease.progress = progress
            log.info("epoch %s/%s: %s", epoch, params.epochs,
                     " ".join(f"{k}={v:.4g}" for k, v in epoch_metrics.items() if isinstance(v, float)))
            # Retried through a database outage: training waits here rather than log an unrecorded epoch.
            if not call_db(attempts.record_progress, ctx.db, job.id, job.attempt, progress=progress, metrics=summary,
                           checkpoint_path=str(checkpoint_path), checkpoint_sha256=sha, checkpoint_epoch=epoch):
                lease.lease_lost.set()  # fenced off: another attempt owns the job now; write nothing more
                remove_checkpoint(checkpoint_path)
                raise StopRequested
            # Keep this epoch's checkpoint and the one before it: if this one turns out torn, a resume
            # falls back to the previous one.
            prune_checkpoints(checkpoint_dir, keep={checkpoint_path, *([last_checkpoint] if last_checkpoint else [])},
                              up_to_epoch=epoch)
            last_checkpoint = checkpoint_path
            if epoch in logged_epochs:
                step_metrics.discard()
            else:
                for key, value in epoch_metrics.items():
                    step_metrics.add(key, value, epoch)
                step_metrics.commit()
                if splits.task == "segmentation" and (epoch % OVERLAY_EVERY == 0 or epoch == params.epochs):
                    run.log_image_step(sample_overlay(model, splits, data), "sample_predictions", epoch)

            if "stopped_early_at_epoch" in summary or "pruned_at_epoch" in summary:
                break
        devices.announce_epoch(0)  # training is over: the other ranks exit; the rest is rank 0's alone

        if lease.should_stop():  # fenced off or asked to stop after the last epoch: log and register nothing
            raise StopRequested
        if "pruned_at_epoch" in summary:  # no test pass, no logged model: the sweep has no use for them
            raise TrialPruned(summary["pruned_at_epoch"], summary, progress)
        if best["state"] is not None:
            model.load_state_dict(best["state"])  # early stopping keeps the best epoch's weights
        test_batches = batches(splits.test, eval_size, shuffle=False, generator=None, device=device)
        test = evaluate(model, test_batches, data.pipeline, loss_fn, metrics, bf16=data.bf16,
                        should_stop=lease.should_stop)
        summary.update(prefixed("test", test.scalars))
        test_step = progress.get("epoch", 0)
        if point is None or test_step not in run.logged_steps(f"test_{primary}"):  # not if a lost attempt did
            for key, value in prefixed("test", test.scalars).items():
                step_metrics.add(key, value, test_step)
            step_metrics.commit()
    finally:
        step_metrics.close()
        monitor.finish()
    log_evaluation_artifacts(run, test, "test")
    if last_checkpoint is not None:
        run.log_file(last_checkpoint, "checkpoints")
    model_uri = log_model(run, model, spec, data)
    if lease.should_stop():
        raise StopRequested
    if spec.register:
        register_model(ctx, job, spec, run, model_uri, summary, data)
    return summary, progress


def checkpointed_epoch_metrics(state: dict[str, Any]) -> dict[int, dict[str, float]]:
    """Every epoch's metrics up to the checkpoint's epoch (a checkpoint from before `epoch_history` was kept
    holds its own epoch's only)."""
    return dict(state.get("epoch_history") or {state["epoch"]: state["metrics"]})


def resume_state(ctx, job: JobView) -> ResumePoint | None:
    """Where an attempt after the first resumes: the last complete checkpoint of an earlier attempt, or the
    one before it when that one is torn (noted in the job's history); None on a first attempt."""
    if job.attempt <= 1 or not job.checkpoint_path:
        return None
    point = latest_usable_checkpoint(job.checkpoint_path, job.checkpoint_sha256, job.checkpoint_epoch or 0)
    epoch = point.state["epoch"] if point.state is not None else 0
    if point.rejected:
        unusable = "; ".join(point.rejected)
        where = f"fell back to the epoch-{epoch} checkpoint" if epoch else "no usable checkpoint; starting over"
        call_db(attempts.note_event, ctx.db, job.id, job.attempt, f"checkpoint unusable ({unusable}); {where}"[:2000])
    log.info("job %s attempt %s resumes from epoch %s", job.id, job.attempt, epoch)
    return point


def sample_overlay(model: nn.Module, splits: ImageSplits, data: JobData, count: int = 8) -> bytes:
    images, masks = splits.val.tensors[0][:count], splits.val.tensors[1][:count]
    model.eval()
    with torch.no_grad():
        x, _ = data.pipeline(images, masks, train=False)
        predicted = model(x).argmax(dim=1).cpu()
    return segmentation_overlay_png(images, masks, predicted, len(splits.classes))


def log_evaluation_artifacts(run: JobRun, result, split: str) -> None:
    """Confusion matrix (PNG and JSON) and per-class figures of an evaluation pass."""
    per_class = getattr(result, "per_class_accuracy", None) or getattr(result, "per_class_iou", {})
    run.log_dict({"classes": result.class_names, "confusion_matrix": result.confusion_matrix,
                  "per_class": per_class, "scalars": result.scalars}, f"{split}/metrics.json")
    run.log_png(confusion_matrix_png(result.confusion_matrix, result.class_names), f"{split}/confusion_matrix.png")


def log_model(run: JobRun, model: nn.Module, spec: JobSpec, data: JobData) -> str:
    """Log the model two ways: a torch.export program for MLflow's own tooling, and safetensors weights plus
    the recipe to rebuild it (what Trainyard serves: loading it runs no code from the file)."""
    from safetensors.torch import save_file

    model = model.eval().to("cpu", memory_format=torch.contiguous_format)
    images, targets = data.splits.test.tensors[0][:2], data.splits.test.tensors[1][:2]
    cpu_pipeline = copy.copy(data.pipeline)
    cpu_pipeline.device = torch.device("cpu")
    cpu_pipeline.mean, cpu_pipeline.std = data.pipeline.mean.cpu(), data.pipeline.std.cpu()
    cpu_pipeline.channels_last = False
    example, _ = cpu_pipeline(images, targets, train=False)  # batch of 2: the exported batch dim stays dynamic
    metadata = model_metadata(spec, data)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / WEIGHTS_FILE
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        recipe = Path(tmp) / METADATA_FILE
        recipe.write_text(json.dumps(metadata["trainyard"], indent=2))
        return run.log_pytorch_model(model, example.numpy(), metadata=metadata,
                                     extra_files=[str(weights), str(recipe)])


def register_model(ctx, job: JobView, spec: JobSpec, run: JobRun, model_uri: str, metrics: dict[str, Any],
                   data: JobData) -> None:
    """Add the trained model to the registry as a new version and note it on the job."""
    name = spec.model_name or f"{spec.dataset}-{spec.architecture}"
    primary = "test_" + PRIMARY_METRIC[data.splits.task]
    version = register_version(
        ctx.settings, name=name, model_uri=model_uri, run_id=run.run_id, job_id=job.id, primary_metric=primary,
        metrics={k: v for k, v in metrics.items() if isinstance(v, int | float)},
        tags={"trainyard.architecture": spec.architecture, "trainyard.dataset": data.dataset.name,
              "trainyard.dataset_fingerprint": data.dataset.fingerprint},
    )
    call_db(attempts.record_progress, ctx.db, job.id, job.attempt, model_name=name, model_version=version.version)
