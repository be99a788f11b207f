"""A training job: data, model, optimizer, the epoch loop, checkpoints, metrics and the logged model."""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from trainyard import jobs
from trainyard.datasets import DatasetView, get_dataset
from trainyard.jobs import JobView
from trainyard.ml.architectures import InputShape, build_architecture, load_pretrained_weights
from trainyard.ml.datasets import FORMATS, ImageSplits
from trainyard.ml.metrics import ClassificationMetrics, SegmentationMetrics, confusion_matrix_png, segmentation_overlay_png
from trainyard.ml.optim import build_optimizer, build_scheduler
from trainyard.ml.transforms import AUGMENTATIONS
from trainyard.ml.servable import METADATA_FILE, WEIGHTS_FILE
from trainyard.model_registry import register_version
from trainyard.specs import JobSpec, TrainParams
from trainyard.tracking import JobRun, MetricBuffer
from trainyard_workers.checkpoints import (
    ResumePoint,
    latest_usable_checkpoint,
    prune_checkpoints,
    remove_checkpoint,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from trainyard_workers.db_retry import call_db
from trainyard_workers.loop import BatchPipeline, StopRequested, evaluate, train_one_epoch

log = logging.getLogger(__name__)

PRIMARY_METRIC = {"classification": "accuracy", "segmentation": "mean_iou"}
OVERLAY_EVERY = 5  # epochs between segmentation sample images


@dataclass
class JobData:
    dataset: DatasetView
    splits: ImageSplits
    device: torch.device
    pipeline: BatchPipeline
    bf16: bool


def select_device() -> torch.device:
    """The worker's GPU when it has one (pinned by CUDA_VISIBLE_DEVICES), else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def use_bf16(device: torch.device, precision: str) -> bool:
    """bf16 autocast where the hardware runs it natively: a bf16-capable GPU, or a CPU with AVX512-BF16/AMX."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def load_job_data(ctx, spec: JobSpec, generator: torch.Generator, size: tuple[int, int] | None = None) -> JobData:
    """Decode the dataset into memory (at `size`, else params.image_size, else the dataset's own size)."""
    params = spec.params
    dataset = call_db(get_dataset, ctx.db, spec.dataset)
    if size is None and params.image_size:
        size = (params.image_size, params.image_size)
    splits = FORMATS.get(dataset.format).obj.load(dataset.path, size)
    device = select_device()
    pipeline = BatchPipeline(
        device=device,
        mean=torch.tensor(splits.mean, device=device),
        std=torch.tensor(splits.std, device=device).clamp_min(1e-6),
        augmentation=AUGMENTATIONS.get(params.augmentation).obj,
        channels_last=params.channels_last,
        generator=generator,
    )
    return JobData(dataset, splits, device, pipeline, use_bf16(device, params.precision))


def batches(split: TensorDataset, batch_size: int, *, shuffle: bool, generator: torch.Generator | None,
            device: torch.device) -> DataLoader:
    """Whole batches straight from in-memory tensors: one indexing op per batch, no per-sample collation."""
    sampler = RandomSampler(split, generator=generator) if shuffle else SequentialSampler(split)
    return DataLoader(split, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None,
                      pin_memory=device.type == "cuda")


def build_model(spec: JobSpec, splits: ImageSplits, device: torch.device) -> nn.Module:
    channels, height, width = splits.image_shape
    model = build_architecture(spec.architecture, InputShape(channels, height, width, len(splits.classes)),
                               spec.architecture_options)
    if spec.weights_path:
        load_pretrained_weights(model, spec.weights_path)
    model = model.to(device)
    if spec.params.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def new_metrics(task: str, classes: list[str]):
    cls = ClassificationMetrics if task == "classification" else SegmentationMetrics
    return cls(len(classes), class_names=classes)


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
    """Train the job's architecture on its dataset; returns (final metrics, final progress)."""
    spec = JobSpec.model_validate(job.spec)
    params: TrainParams = spec.params
    torch.manual_seed(params.seed)
    generator = torch.Generator().manual_seed(params.seed)
    data = load_job_data(ctx, spec, generator)
    splits, device = data.splits, data.device
    run.log_dataset(name=data.dataset.name, fingerprint=data.dataset.fingerprint, source=data.dataset.path or "builtin",
                    fmt=data.dataset.format, task=data.dataset.task)

    model = build_model(spec, splits, device)
    optimizer = build_optimizer(params.optimizer, model.parameters(), lr=params.lr, weight_decay=params.weight_decay,
                                momentum=params.momentum, nesterov=params.nesterov)
    train_batches = batches(splits.train, params.batch_size, shuffle=True, generator=generator, device=device)
    scheduler, per_batch = build_scheduler(params.scheduler, optimizer, epochs=params.epochs,
                                           steps_per_epoch=len(train_batches), lr=params.lr,
                                           step_size=params.step_size, gamma=params.gamma)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=params.label_smoothing)
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
    point = resume_state(ctx, job)
    logged_epochs: set[int] = run.logged_steps("train_loss") if point is not None else set()
    resumed = point.state if point is not None else None
    if resumed is not None:
        last_checkpoint = point.path
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(resumed["scheduler"])
        restore_rng(resumed["rng"], generator)
        best.update(value=resumed["best"]["value"], epoch=resumed["best"]["epoch"], state=resumed.get("best_model"))
        start_epoch, summary = resumed["epoch"] + 1, dict(resumed["summary"])
        if "stopped_early_at_epoch" in summary:
            start_epoch = params.epochs + 1  # the lost attempt had already decided to stop
        progress = {"epoch": resumed["epoch"], "epochs": params.epochs, "batch": 0, "batches": len(train_batches)}
        if resumed["epoch"] not in logged_epochs:
            # The lost attempt checkpointed this epoch but died before its metrics were written.
            for key, value in resumed["metrics"].items():
                step_metrics.add(key, value, resumed["epoch"])
            step_metrics.commit()
            logged_epochs.add(resumed["epoch"])
    try:
        for epoch in range(start_epoch, params.epochs + 1):
            started = time.perf_counter()
            step0 = (epoch - 1) * len(train_batches)

            def on_batch(i: int, loss: torch.Tensor, epoch: int = epoch, step0: int = step0) -> None:
                lease.progress = {"epoch": epoch - 1, "epochs": params.epochs, "batch": i,
                                  "batches": len(train_batches)}
                step_metrics.add("train_step_loss", loss, step0 + i)

            train_loss = train_one_epoch(
                model, train_batches, optimizer, data.pipeline, loss_fn, bf16=data.bf16,
                grad_clip_norm=params.grad_clip_norm, batch_scheduler=scheduler if per_batch else None,
                should_stop=lease.should_stop, on_batch=on_batch,
            )
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

            # Checkpoint first, metrics second: a resumed attempt never logs an epoch twice. A new file per
            # epoch: the one the job row names is never overwritten, even by an attempt fenced off meanwhile.
            checkpoint_path = checkpoint_dir / f"attempt-{job.attempt}-epoch-{epoch}.pt"
            sha = save_checkpoint({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else {},
                "epoch": epoch, "rng": rng_state(generator), "spec": job.spec, "metrics": epoch_metrics,
                "summary": summary, "image_shape": list(splits.image_shape), "mean": splits.mean, "std": splits.std,
                "best": {"value": best["value"], "epoch": best["epoch"]}, "best_model": best["state"],
            }, checkpoint_path)
            lease.progress = progress
            log.info("epoch %s/%s: %s", epoch, params.epochs,
                     " ".join(f"{k}={v:.4g}" for k, v in epoch_metrics.items() if isinstance(v, float)))
            # Retried through a database outage: training waits here rather than log an unrecorded epoch.
            if not call_db(jobs.record_progress, ctx.db, job.id, job.attempt, progress=progress, metrics=summary,
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

            if "stopped_early_at_epoch" in summary:
                break

        if lease.should_stop():  # fenced off or asked to stop after the last epoch: log and register nothing
            raise StopRequested
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
        call_db(jobs.note_event, ctx.db, job.id, job.attempt, f"checkpoint unusable ({unusable}); {where}"[:2000])
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
    call_db(jobs.record_progress, ctx.db, job.id, job.attempt, model_name=name, model_version=version.version)
