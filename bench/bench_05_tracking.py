"""Measure 5, tracking overhead: training images/s with step metrics going to MLflow the platform's way vs with
MLflow logging off, same loop.

Both sides run trainyard_workers.loop.train_one_epoch on the same model (the `cnn` architecture), data
(the built-in `digits` dataset, decoded by the platform's own loader), batch size, dtype, device and torch
threads, with freshly built parts each repetition (build time not counted).

Platform: what training.train() does around the loop — a real MLflow run in a local SQLite store (the
embedded default), a MetricBuffer fed `train_step_loss` every batch (a device tensor, turned into a float
only by the buffer's thread), the lease's progress dict set and a should-stop check every batch, epoch
metrics added and `commit()` after each epoch, the system-metrics monitor running. Committed points go to
MLflow at most once a second through the process's metric writer process (`trainyard.metric_writer`,
started in the warm-up repetition and kept, as a worker's pool process keeps it from job to job);
writes_per_rep counts them. The timed region is the epochs (steady state: each write happens while later
epochs train); the final `close()`, which waits for the last write once per job, is reported apart
(median_final_flush_s). Every step metric is checked to have reached MLflow.

Baseline: the same loop with on_batch/should_stop left at their no-op defaults and no MLflow at all.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time

import harness
import stack

MEASURE = "05 tracking overhead"


def main() -> int:
    # Cheap (2 s a side), and the effect sought is ~1 %: one pair swings ±2 % on this machine, so the median
    # needs many pairs before it can tell 0.99 from 1.0 (5 pairs read 0.98-1.01 across runs of one build).
    args = harness.parse_args(__doc__, default_repeats=21, quick_repeats=15)
    epochs = 10 if args.quick else 20
    import torch

    # One intra-op thread, as the platform's CPU workers run under test and on shared machines
    # (TRAINYARD_TORCH_THREADS=1): on 2 busy cores, more threads make both sides spin rather than train.
    torch.set_num_threads(1)

    from trainyard.datasets import ensure_builtin_datasets, get_dataset
    from trainyard.db import Database, upgrade_schema
    from trainyard.specs import JobSpec
    from trainyard.tracking import JobRun, MetricBuffer, prepare_tracking_store
    from trainyard_workers.loop import train_one_epoch
    from trainyard_workers.training import job_data
    from trainyard_workers.training_setup import batches, build_training_parts

    with stack.temp_dir() as tmp:
        settings = stack.platform_settings(tmp / "data")
        settings.ensure_data_dir()
        upgrade_schema(settings.database_url)
        db = Database(settings.database_url)
        ensure_builtin_datasets(db)
        dataset = get_dataset(db, "digits")
        db.dispose()
        prepare_tracking_store(settings)

        spec = JobSpec.model_validate({"kind": "train", "dataset": "digits", "architecture": "cnn",
                                       "params": {"epochs": epochs, "batch_size": 32}})
        device = torch.device("cpu")
        data = job_data(dataset, spec, torch.Generator().manual_seed(0), None, device)
        train_split = data.splits.train
        images_per_rep = epochs * len(train_split)
        job_counter = iter(range(1, 10_000))
        close_seconds: list[float] = []
        writes: list[int] = []

        def parts():
            torch.manual_seed(0)
            loader = batches(train_split, spec.params.batch_size, shuffle=True,
                             generator=torch.Generator().manual_seed(0), device=device)
            return build_training_parts(spec, data.splits, device, loader)

        def baseline_once() -> float:
            p = parts()
            t0 = time.perf_counter()
            for _ in range(epochs):
                train_one_epoch(p.model, p.train_batches, p.optimizer, data.pipeline, p.loss_fn, bf16=data.bf16)
            return images_per_rep / (time.perf_counter() - t0)

        def platform_once() -> float:
            p = parts()
            run = JobRun.start(settings, job_id=next(job_counter), name="bench", spec=spec.model_dump(mode="json"))
            n_batches = len(p.train_batches)
            cancel, lost = threading.Event(), threading.Event()
            lease_progress: dict = {}
            buffer = MetricBuffer(run)
            monitor = run.start_system_metrics()
            t0 = time.perf_counter()
            try:
                for epoch in range(1, epochs + 1):
                    started = time.perf_counter()
                    step0 = (epoch - 1) * n_batches

                    def on_batch(i, loss, epoch=epoch, step0=step0):
                        lease_progress.update(progress={"epoch": epoch - 1, "epochs": epochs, "batch": i,
                                                        "batches": n_batches})
                        buffer.add("train_step_loss", loss, step0 + i)

                    loss = train_one_epoch(p.model, p.train_batches, p.optimizer, data.pipeline, p.loss_fn,
                                           bf16=data.bf16, should_stop=lambda: cancel.is_set() or lost.is_set(),
                                           on_batch=on_batch)
                    for key, value in {"train_loss": loss, "lr": p.optimizer.param_groups[0]["lr"],
                                       "epoch_seconds": time.perf_counter() - started}.items():
                        buffer.add(key, value, epoch)
                    buffer.commit()
                elapsed = time.perf_counter() - t0
            finally:
                # The last epoch's write, once per job: timed apart (steady state is what the target is about).
                t_close = time.perf_counter()
                buffer.close()
                monitor.finish()
                close_seconds.append(time.perf_counter() - t_close)
                writes.append(buffer.writes)
            run.end("FINISHED")
            logged = len(run.client.get_metric_history(run.run_id, "train_step_loss"))
            if logged != epochs * n_batches:
                raise RuntimeError(f"expected {epochs * n_batches} step metrics in MLflow, found {logged}")
            return images_per_rep / elapsed

        result = harness.compare(MEASURE, "cnn on digits, batch 32, step metrics via MetricBuffer",
                                 platform_once, baseline_once, repeats=args.repeats, unit="images/s",
                                 higher_is_better=True, warmup=1)
        result.extra.update(epochs_per_rep=epochs, torch_threads=torch.get_num_threads(), batches_per_rep=epochs * len(parts().train_batches),
                            median_final_flush_s=round(statistics.median(close_seconds), 3),
                            writes_per_rep=statistics.median(writes))
        met = result.ratio >= 0.99
        overlap = result.platform_max >= result.baseline_min and result.baseline_max >= result.platform_min
        note = "" if met else (f"{100 * (1 - result.ratio):.1f}% fewer images/s"
                               + ("; the two sides' ranges overlap: within this run's noise" if overlap else ""))
        harness.report(result, "≥ 0.99", met, note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
