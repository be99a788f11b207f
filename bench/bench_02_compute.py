"""Measure 2 — compute utilisation: analytic training FLOPs × images/s of the platform's training step, vs the
machine's peak measured by a large matmul of the same dtype, for a CIFAR-style ResNet-18 at 32×32,
channels-last.

- FLOPs per image: `torch.utils.flop_counter.FlopCounterMode` over one forward + backward of the registered
  `resnet18` built for 3×32×32 inputs (the platform's CIFAR stem), divided by the batch size. The optimizer
  step is not counted (it is O(parameters), small next to the convolutions).
- Platform side: the engine's training step as the platform builds it — a `JobSpec` (batch 32, Adam,
  channels-last, precision fp32 or bf16) through `training_setup.build_training_parts`, `make_pipeline` and
  the in-memory batches, run by `loop.train_one_epoch`; achieved FLOP/s = FLOPs per image × images/s.
- Baseline: the peak FLOP/s of a square matmul (`torch.mm`, n = 2048) of the same dtype, same threads, in
  the same process, interleaved with the platform side: per repetition, the fastest of ~1 s of matmuls.

The ratio is the utilisation (target ≥ 0.6 fp32, ≥ 0.5 bf16). bf16 runs only where the CPU has it natively
(AVX512-BF16 or AMX; on a GPU, `torch.cuda.is_bf16_supported()`); otherwise that row is reported skipped.

    .venv/bin/python bench/bench_02_compute.py [--quick] [--repeats N]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _src in ("platform", "workers", "web"):
    if str(ROOT / _src) not in sys.path:
        sys.path.insert(0, str(ROOT / _src))

import torch
from harness import compare, parse_args, report, report_skipped
from torch.utils.data import TensorDataset
from torch.utils.flop_counter import FlopCounterMode

MEASURE = "02 compute utilisation"
TARGETS = {"fp32": 0.6, "bf16": 0.5}
SIDE, CLASSES = 32, 10


def splits_for(n: int):
    from trainyard.ml.datasets import ImageSplits

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, SIDE, SIDE), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    x = images.float() / 255
    small = TensorDataset(images[:8], labels[:8])
    return ImageSplits(task="classification", train=TensorDataset(images, labels), val=small, test=small,
                       classes=[str(i) for i in range(CLASSES)], image_shape=(3, SIDE, SIDE),
                       mean=x.mean(dim=(0, 2, 3)).tolist(), std=x.std(dim=(0, 2, 3)).tolist())


def training_flops_per_image(batch: int) -> float:
    from trainyard.ml.architectures import InputShape, build_architecture

    model = build_architecture("resnet18", InputShape(3, SIDE, SIDE, CLASSES)).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, SIDE, SIDE).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, CLASSES, (batch,))
    counter = FlopCounterMode(display=False)
    with counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / batch


def bf16_native(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def matmul_peak(dtype: torch.dtype, n: int, device: torch.device, reps: int):
    """One repetition: `reps` timed matmuls; the fastest one's FLOP/s (a peak is a best case, and on a shared
    machine a single slow matmul says more about the neighbours than about the hardware)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)

    def run() -> float:
        best = 0.0
        for _ in range(reps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            torch.mm(a, b, out=out)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = max(best, 2 * n**3 / (time.perf_counter() - started))
        return best

    return run


def platform_step(precision: str, batch_size: int, batches_per_rep: int, flops_per_image: float):
    from trainyard.specs import JobSpec
    from trainyard_workers.loop import train_one_epoch
    from trainyard_workers.training_setup import (
        SingleDevice,
        build_training_parts,
        make_pipeline,
        use_bf16,
    )

    spec = JobSpec.model_validate({"kind": "train", "dataset": "bench", "architecture": "resnet18",
                                   "params": {"batch_size": batch_size, "precision": precision,
                                              "channels_last": True}})
    splits = splits_for(batch_size * batches_per_rep)
    devices = SingleDevice(spec.params.seed)
    pipeline = make_pipeline(splits, devices.device, spec.params, devices.augmentation_generator)
    bf16 = use_bf16(devices.device, spec.params.precision)
    parts = build_training_parts(spec, splits, devices.device,
                                 devices.train_batches(splits.train, spec.params.batch_size))
    n_images = len(splits.train)

    def run() -> float:
        started = time.perf_counter()
        train_one_epoch(parts.model, parts.train_batches, parts.optimizer, pipeline, parts.loss_fn, bf16=bf16)
        if devices.device.type == "cuda":
            torch.cuda.synchronize()
        return flops_per_image * n_images / (time.perf_counter() - started)

    return run, devices.device


def main() -> int:
    args = parse_args(__doc__.splitlines()[0])
    batch_size = 32
    batches_per_rep = 2 if args.quick else 6
    n = 2048
    flops = training_flops_per_image(8)
    print(f"{MEASURE}: CIFAR-style ResNet-18 3x32x32 channels-last, {flops / 1e9:.3f} GFLOP per training image "
          f"(forward+backward, FlopCounterMode); batch {batch_size}, {batches_per_rep} batches per repetition; "
          f"peak = {n}x{n} matmul; threads={torch.get_num_threads()}", flush=True)
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        target = f"≥ {TARGETS[precision]} ({precision})"
        platform, device = platform_step(precision, batch_size, batches_per_rep, flops)
        if precision == "bf16" and not bf16_native(device):
            report_skipped(MEASURE, f"resnet18 {precision}", target,
                           "no native bf16 here (needs AVX512-BF16 or AMX on a CPU, or a bf16 GPU)")
            continue
        # Enough matmuls per repetition to last ~1 s.
        probe = matmul_peak(dtype, n, device, 1)
        probe()
        reps = max(3, int(probe() / (2 * n**3)))
        peak = matmul_peak(dtype, n, device, reps)
        result = compare(MEASURE, f"resnet18 {precision}", platform, peak, repeats=args.repeats, unit="FLOP/s",
                         higher_is_better=True, warmup=1)
        result.extra.update(gflop_per_image=round(flops / 1e9, 4),
                            platform_images_per_s=round(result.platform_median / flops, 2),
                            peak_gflops=round(result.baseline_median / 1e9, 1),
                            achieved_gflops=round(result.platform_median / 1e9, 1), matmul_n=n)
        report(result, target, result.ratio >= TARGETS[precision],
               f"utilisation = achieved/peak; batch {batch_size}{'; --quick' if args.quick else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
