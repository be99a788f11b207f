"""Measure 3 — recipe vs record (GPU only): time to 94 % test accuracy on CIFAR-10 with Trainyard's training
vs airbench94 on the same GPU. Target: ≤ 1.5×.

It needs a CUDA GPU and CIFAR-10, and skips (recording a "skipped" row) when either is missing:

    BENCH_CIFAR10_DIR=/data/cifar10         # holds cifar-10-batches-bin/ (the binary version, what the
                                            # platform's `cifar10` format reads; the pickled python version
                                            # is never read)
    BENCH_AIRBENCH_DIR=/src/cifar10-airbench # a checkout of github.com/KellerJordan/cifar10-airbench
                                            # (airbench94.py at its top level)
    .venv/bin/python bench/bench_03_recipe.py [--quick] [--repeats N] [--max-epochs 40]

Platform side, one repetition: the engine's own parts (`training_setup.decode_splits` of the `cifar10`
format, `make_pipeline`, `build_training_parts`, `loop.train_one_epoch`, `loop.evaluate`) with the fastest
recipe the platform offers today (see RECIPE: ResNet-18 CIFAR stem, SGD Nesterov, one-cycle, batch 512,
label smoothing 0.2, `light` augmentation, bf16, channels-last), training epoch after epoch and evaluating the
test split after each; the value is the cumulative training time (CUDA-synchronised; evaluation excluded)
until the first epoch whose test accuracy is ≥ 94 %, or infinity if `--max-epochs` pass without reaching it.
The platform has no dedicated fast recipe yet (nothing like airbench's whitening layer, lookahead EMA or TTA),
so this measure is expected to fail by a wide margin until it has one.

Baseline, one repetition: airbench94's own `main(run)` in a subprocess (its warm-up run first, untimed), its
own timing (`total_time_seconds`, CUDA events, which includes its TTA evaluation) read from its final table
row, and its `tta_val_acc`. airbench94 reads `cifar10/train.pt` and `cifar10/test.pt` from its working
directory; this script writes them from the binary files (uint8 NHWC images, labels, class names), so
airbench never downloads anything. Both sides run one after the other on the same GPU, interleaved.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _src in ("platform", "workers", "web"):
    if str(ROOT / _src) not in sys.path:
        sys.path.insert(0, str(ROOT / _src))

import harness
import torch
from harness import compare, report, report_skipped

MEASURE = "03 recipe vs record"
LABEL = "CIFAR-10 time to 94%"
TARGET = "≤ 1.5×"
GOAL = 0.94
# The fastest recipe the platform's job spec can express today.
RECIPE = {"batch_size": 512, "optimizer": "sgd", "lr": 0.4, "momentum": 0.9, "nesterov": True,
          "weight_decay": 5e-4, "scheduler": "onecycle", "label_smoothing": 0.2, "augmentation": "light",
          "precision": "auto", "channels_last": True, "seed": 0}


def missing_requirements(cifar_dir: str | None, airbench_dir: str | None) -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    if not cifar_dir or not Path(cifar_dir).is_dir():
        return f"needs CIFAR-10 (binary version): set BENCH_CIFAR10_DIR (now {cifar_dir!r})"
    if not airbench_dir or not (Path(airbench_dir) / "airbench94.py").is_file():
        return f"needs an airbench checkout with airbench94.py: set BENCH_AIRBENCH_DIR (now {airbench_dir!r})"
    return None


def platform_run(cifar_dir: str, max_epochs: int):
    """One repetition of the platform's training: seconds of training until test accuracy ≥ GOAL."""
    from trainyard.specs import JobSpec
    from trainyard_workers.loop import evaluate, train_one_epoch
    from trainyard_workers.training_setup import (
        SingleDevice,
        batches,
        build_training_parts,
        decode_splits,
        make_pipeline,
        new_metrics,
        use_bf16,
    )

    spec = JobSpec.model_validate({"kind": "train", "dataset": "cifar10", "architecture": "resnet18",
                                   "params": {**RECIPE, "epochs": max_epochs}})
    splits = decode_splits("cifar10", cifar_dir, spec.params)  # decoded once, outside the clock, as airbench's

    def run() -> float:
        devices = SingleDevice(spec.params.seed)
        device = devices.device
        torch.manual_seed(spec.params.seed)
        pipeline = make_pipeline(splits, device, spec.params, devices.augmentation_generator)
        bf16 = use_bf16(device, spec.params.precision)
        parts = build_training_parts(spec, splits, device, devices.train_batches(splits.train, spec.params.batch_size))
        test_batches = batches(splits.test, 2000, shuffle=False, generator=None, device=device)
        metrics = new_metrics(splits.task, splits.classes)
        trained = 0.0
        for epoch in range(1, max_epochs + 1):
            torch.cuda.synchronize()
            started = time.perf_counter()
            train_one_epoch(parts.model, parts.train_batches, parts.optimizer, pipeline, parts.loss_fn, bf16=bf16,
                            batch_scheduler=parts.scheduler if parts.per_batch else None)
            if parts.scheduler is not None and not parts.per_batch:
                parts.scheduler.step()
            torch.cuda.synchronize()
            trained += time.perf_counter() - started
            accuracy = evaluate(parts.model, test_batches, pipeline, parts.loss_fn, metrics, bf16=bf16).scalars["accuracy"]
            print(f"    platform epoch {epoch}: test accuracy {accuracy:.4f}, {trained:.1f} s of training", flush=True)
            if accuracy >= GOAL:
                return trained
        return math.inf

    return run


def write_airbench_data(cifar_dir: str, workdir: Path) -> None:
    """airbench94's cifar10/{train,test}.pt from the binary files (no download, nothing unpickled)."""
    from trainyard.ml.datasets import FORMATS

    splits = FORMATS.get("cifar10").obj.load(Path(cifar_dir), None)
    target = workdir / "cifar10"
    target.mkdir(parents=True, exist_ok=True)
    # The platform holds out the last 10 % of train as val; airbench trains on all 50,000.
    train_images = torch.cat([splits.train.tensors[0], splits.val.tensors[0]])
    train_labels = torch.cat([splits.train.tensors[1], splits.val.tensors[1]])
    for name, images, labels in (("train", train_images, train_labels),
                                 ("test", splits.test.tensors[0], splits.test.tensors[1])):
        torch.save({"images": images.permute(0, 2, 3, 1).contiguous(), "labels": labels,
                    "classes": list(splits.classes)}, target / f"{name}.pt")


AIRBENCH_DRIVER = """
import sys
sys.path.insert(0, sys.argv[1])
import airbench94 as a
a.print_columns(a.logging_columns_list, is_head=True)
if sys.argv[2] == "warmup":
    a.main("warmup")
else:
    a.main(0)
"""


def airbench_run(airbench_dir: str, workdir: Path, accuracies: list[float]):
    def run_once(kind: str) -> float:
        out = subprocess.run([sys.executable, "-c", AIRBENCH_DRIVER, airbench_dir, kind], cwd=workdir,
                             capture_output=True, text=True, check=True, timeout=1800).stdout
        # The final row: |  run  |  eval  | train_loss | val_loss | train_acc | val_acc | tta_val_acc | seconds |
        row = next(line for line in reversed(out.splitlines()) if re.search(r"\|\s*eval\s*\|", line))
        cells = [c.strip() for c in row.strip("|").split("|")]
        accuracies.append(float(cells[6]))
        return float(cells[7])

    def run() -> float:
        # A fresh process per run: each pays its own CUDA/cuDNN warm-up in the untimed warm-up run.
        run_once("warmup")  # airbench's own warm-up: random labels, untimed
        return run_once("run")

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=40, help="platform epochs before giving up on 94 %%")
    args = harness.parse_args(parser=parser)
    cifar_dir, airbench_dir = os.environ.get("BENCH_CIFAR10_DIR"), os.environ.get("BENCH_AIRBENCH_DIR")
    missing = missing_requirements(cifar_dir, airbench_dir)
    if missing:
        print(f"{MEASURE}: skipped — {missing}", flush=True)
        report_skipped(MEASURE, LABEL, TARGET, missing)
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="bench03-"))
    try:
        write_airbench_data(cifar_dir, workdir)
        accuracies: list[float] = []
        result = compare(MEASURE, LABEL, platform_run(cifar_dir, args.max_epochs),
                         airbench_run(airbench_dir, workdir, accuracies), repeats=args.repeats, unit="s",
                         higher_is_better=False, warmup=0 if args.quick else 1)
        result.extra.update(gpu=torch.cuda.get_device_name(0), airbench_tta_acc_median=sorted(accuracies)[len(accuracies) // 2],
                            recipe=RECIPE)
        report(result, TARGET, result.ratio <= 1.5,
               "platform: engine parts with its fastest spec-expressible recipe, evaluation excluded; "
               "airbench94: its own CUDA-event timing (TTA eval included)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
