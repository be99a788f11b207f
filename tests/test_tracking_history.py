"""What the job page's charts and sample image read back from a real MLflow store."""

from __future__ import annotations

import io

from PIL import Image

from trainyard.tracking import JobRun, ensure_experiment, latest_step_image, metric_history, \
    prepare_tracking_store, tracking_client

from conftest import make_settings


def test_metric_history_and_the_newest_step_image(tmp_path):
    settings = make_settings(tmp_path)
    settings.ensure_data_dir()
    prepare_tracking_store(settings)
    client = tracking_client(settings)
    run_id = client.create_run(ensure_experiment(client, settings)).info.run_id
    run = JobRun(settings, run_id)
    assert latest_step_image(settings, run_id, "sample_predictions") is None
    for step in (1, 2, 3):
        run.log_metrics({"train_loss": 1.0 / step, "val_accuracy": 0.5 + step / 10, "train_step_loss": 9.0},
                        step=step, timestamp_ms=1000 * step)
        image = io.BytesIO()
        Image.new("RGB", (8, 8), (step * 60, 0, 0)).save(image, "PNG")
        run.log_image_step(image.getvalue(), "sample_predictions", step)
    history = metric_history(settings, run_id)
    assert set(history) == {"train_loss", "val_accuracy"}  # per-batch steps are not charted by epoch
    assert history["val_accuracy"] == [(1, 0.6), (2, 0.7), (3, 0.8)]
    step, png = latest_step_image(settings, run_id, "sample_predictions")
    assert step == 3 and Image.open(io.BytesIO(png)).getpixel((0, 0))[:3] == (180, 0, 0)


def test_runs_that_start_together_all_record_their_dataset(tmp_path):
    """Trials of a sweep start on several workers at once, each recording the same dataset as its run's input:
    MLflow checks for the dataset row and then inserts it, so all but one lose the race on its unique key."""
    import threading

    settings = make_settings(tmp_path)
    prepare_tracking_store(settings)
    runs = [JobRun.start(settings, job_id=i, name="race", spec={}) for i in range(6)]
    for round_ in range(3):
        barrier, errors = threading.Barrier(len(runs)), []

        def record(run: JobRun, digest: str = f"{round_}" * 64) -> None:
            barrier.wait()
            try:
                run.log_dataset(name="digits", fingerprint=digest, source="builtin", fmt="digits", task="classification")
            except Exception as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=record, args=(run,)) for run in runs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
    for run in runs:
        assert len(run.client.get_run(run.run_id).inputs.dataset_inputs) == 3
