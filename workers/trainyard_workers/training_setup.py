"""What every rank of a training job builds alike from its spec and decoded data: device, batch pipeline,
batches, model, optimizer and scheduler; and `SingleDevice`, the one-process way ranks cooperate
(distributed.py holds the DDP one)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler, SequentialSampler, TensorDataset

from trainyard.ml.architectures import InputShape, build_architecture, load_pretrained_weights
from trainyard.ml.datasets import FORMATS, ImageSplits
from trainyard.ml.metrics import ClassificationMetrics, SegmentationMetrics
from trainyard.ml.optim import build_optimizer, build_scheduler
from trainyard.ml.transforms import AUGMENTATIONS
from trainyard.specs import JobSpec, TrainParams
from trainyard_workers.checkpoints import restore_rng
from trainyard_workers.loop import BatchPipeline


def select_device(local_rank: int | None = None) -> torch.device:
    """The worker's GPU when it has one (pinned by CUDA_VISIBLE_DEVICES; rank r of a DDP job uses cuda:r),
    else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda") if local_rank is None else torch.device("cuda", local_rank)


def use_bf16(device: torch.device, precision: str) -> bool:
    """bf16 autocast where the hardware runs it natively: a bf16-capable GPU, or a CPU with AVX512-BF16/AMX."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def decode_splits(fmt: str, path: str | None, params: TrainParams,
                  size: tuple[int, int] | None = None) -> ImageSplits:
    """Decode a dataset into memory (at `size`, else params.image_size, else the dataset's own size)."""
    if size is None and params.image_size:
        size = (params.image_size, params.image_size)
    return FORMATS.get(fmt).obj.load(path, size)


def make_pipeline(splits: ImageSplits, device: torch.device, params: TrainParams,
                  generator: torch.Generator | None) -> BatchPipeline:
    return BatchPipeline(
        device=device,
        mean=torch.tensor(splits.mean, device=device),
        std=torch.tensor(splits.std, device=device).clamp_min(1e-6),
        augmentation=AUGMENTATIONS.get(params.augmentation).obj,
        channels_last=params.channels_last,
        generator=generator,
    )


def batches(split: TensorDataset, batch_size: int, *, shuffle: bool, generator: torch.Generator | None,
            device: torch.device) -> DataLoader:
    """Whole batches straight from in-memory tensors: one indexing op per batch, no per-sample collation."""
    sampler = RandomSampler(split, generator=generator) if shuffle else SequentialSampler(split)
    return DataLoader(split, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None,
                      pin_memory=device.type == "cuda")


class RankBatchSampler(Sampler[list[int]]):
    """Rank `rank`'s slice of every global batch of a shuffled epoch.

    Every rank draws the same permutation (a generator seeded and restored alike on all ranks), cuts it
    into global batches of `batch_size` and keeps its contiguous slice, so N ranks take as many optimizer
    steps per epoch as one process would. A last global batch smaller than N is skipped by all ranks:
    a rank with no sample would have no gradient to contribute.
    """

    def __init__(self, size: int, batch_size: int, rank: int, world_size: int, generator: torch.Generator) -> None:
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size
        self.generator = generator

    def _global_sizes(self) -> list[int]:
        full, rest = divmod(self.size, self.batch_size)
        return [self.batch_size] * full + ([rest] if rest >= self.world_size else [])

    def _bounds(self, global_size: int) -> tuple[int, int]:
        share, extra = divmod(global_size, self.world_size)
        start = self.rank * share + min(self.rank, extra)
        return start, start + share + (1 if self.rank < extra else 0)

    def __iter__(self):
        order = torch.randperm(self.size, generator=self.generator).tolist()
        for i, global_size in enumerate(self._global_sizes()):
            batch = order[i * self.batch_size:i * self.batch_size + global_size]
            start, end = self._bounds(global_size)
            yield batch[start:end]

    def __len__(self) -> int:
        return len(self._global_sizes())

    @property
    def samples_per_epoch(self) -> int:
        return sum(end - start for start, end in map(self._bounds, self._global_sizes()))


def rank_batches(split: TensorDataset, batch_size: int, rank: int, world_size: int, generator: torch.Generator,
                 device: torch.device) -> DataLoader:
    sampler = RankBatchSampler(len(split), batch_size, rank, world_size, generator)
    return DataLoader(split, sampler=sampler, batch_size=None, pin_memory=device.type == "cuda")


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


def training_module(wrapped: nn.Module, params: TrainParams) -> nn.Module:
    """What the training step calls: the (DDP-)wrapped model, compiled when the spec opts in. Checkpoints,
    validation and the logged model keep using the plain module, whose state_dict has no compile prefix."""
    return torch.compile(wrapped) if params.compile else wrapped


def new_metrics(task: str, classes: list[str]):
    cls = ClassificationMetrics if task == "classification" else SegmentationMetrics
    return cls(len(classes), class_names=classes)


@dataclass
class TrainingParts:
    """The model (unwrapped: what is checkpointed, evaluated and logged), its optimizer and schedule."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    per_batch: bool  # the scheduler steps every batch, not every epoch
    loss_fn: nn.Module
    train_batches: DataLoader


def build_training_parts(spec: JobSpec, splits: ImageSplits, device: torch.device,
                         train_batches: DataLoader) -> TrainingParts:
    params = spec.params
    model = build_model(spec, splits, device)
    optimizer = build_optimizer(params.optimizer, model.parameters(), lr=params.lr, weight_decay=params.weight_decay,
                                momentum=params.momentum, nesterov=params.nesterov)
    scheduler, per_batch = build_scheduler(params.scheduler, optimizer, epochs=params.epochs,
                                           steps_per_epoch=len(train_batches), lr=params.lr,
                                           step_size=params.step_size, gamma=params.gamma)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=params.label_smoothing)
    return TrainingParts(model, optimizer, scheduler, per_batch, loss_fn, train_batches)


def restore_training_state(parts: TrainingParts, state: dict[str, Any], data_generator: torch.Generator) -> None:
    """Continue from a checkpoint: weights, optimizer, schedule and the random streams (data order included)."""
    parts.model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    if parts.scheduler is not None:
        parts.scheduler.load_state_dict(state["scheduler"])
    restore_rng(state["rng"], data_generator)


class SingleDevice:
    """One process trains alone: every cooperation hook is the identity. One generator serves both data order
    and augmentation, as it always has, so single-device runs and their checkpoints are unchanged."""

    world_size = 1
    rank = 0

    def __init__(self, seed: int) -> None:
        self.device = select_device()
        self.data_generator = torch.Generator().manual_seed(seed)
        self.augmentation_generator = self.data_generator

    def __enter__(self) -> SingleDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def start(self) -> None:
        pass

    def train_batches(self, split: TensorDataset, batch_size: int) -> DataLoader:
        return batches(split, batch_size, shuffle=True, generator=self.data_generator, device=self.device)

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def stop_check(self, should_stop: Callable[[], bool]) -> Callable[[], bool]:
        return should_stop

    def announce_epoch(self, epoch: int) -> int:
        return epoch

    def epoch_loss(self, loss: float) -> float:
        return loss

    def describe_failure(self, exc: BaseException) -> BaseException:
        return exc
