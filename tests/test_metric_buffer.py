"""The training loop's metric path: MetricBuffer and the metric writer process, against a real MLflow store."""

from __future__ import annotations

import math
import os
import signal
import time

import psutil
import pytest
import torch

from trainyard.metric_writer import MetricWriterProcess
from trainyard.tracking import JobRun, MetricBuffer, ensure_experiment, prepare_tracking_store, tracking_client

from conftest import make_settings, processes_running, wait_until

WRITER_MODULE = "trainyard.metric_writer"


def new_run(tmp_path) -> JobRun:
    settings = make_settings(tmp_path)
    settings.ensure_data_dir()
    prepare_tracking_store(settings)
    client = tracking_client(settings)
    return JobRun(settings, client.create_run(ensure_experiment(client, settings)).info.run_id)


def history(run: JobRun, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in run.client.get_metric_history(run.run_id, key))


def writer_children() -> list[psutil.Process]:
    return processes_running(WRITER_MODULE)


def test_committed_points_reach_mlflow_from_the_writer_process_and_uncommitted_ones_never(tmp_path):
    run = new_run(tmp_path)
    writer = MetricWriterProcess()
    try:
        buffer = MetricBuffer(run, writer=writer)
        for step in range(1, 4):
            buffer.add("train_step_loss", torch.tensor(1.0 / step), step)  # device tensors become floats
        buffer.add("val_loss", float("nan"), 1)
        buffer.commit()
        buffer.add("train_step_loss", 99.0, 4)  # never committed: an epoch cut short
        wait_until(lambda: history(run, "train_step_loss"), 30, "the committed points were written")
        children = writer_children()
        assert len(children) == 1 and children[0].is_running()  # written by a process of its own
        assert children[0].nice() == min(psutil.Process().nice() + 10, 19)  # that yields the cores to training
        buffer.close()
        assert history(run, "train_step_loss") == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
        assert math.isnan(history(run, "val_loss")[0][1])
    finally:
        writer.close()
    assert writer_children() == []  # closing the writer ends its process


def test_commits_faster_than_the_interval_share_writes_and_lose_nothing(tmp_path):
    run = new_run(tmp_path)
    writer = MetricWriterProcess()
    try:
        buffer = MetricBuffer(run, writer=writer, min_interval=0.5)
        t0 = time.monotonic()
        for epoch in range(40):  # 40 short "epochs" of 10 steps over ~2 s
            for i in range(10):
                buffer.add("train_step_loss", float(epoch * 10 + i), epoch * 10 + i)
            buffer.commit()
            time.sleep(0.05)
        elapsed = time.monotonic() - t0
        buffer.close()
        assert [step for step, _ in history(run, "train_step_loss")] == list(range(400))
        # One write right away, then at most one per interval, then the one close() forces.
        assert 2 <= buffer.writes <= elapsed / 0.5 + 2, (buffer.writes, elapsed)
    finally:
        writer.close()


def test_the_first_commit_is_written_at_once_and_close_does_not_wait_out_the_interval(tmp_path):
    run = new_run(tmp_path)
    writer = MetricWriterProcess()
    try:
        buffer = MetricBuffer(run, writer=writer, min_interval=60)
        buffer.add("train_loss", 1.0, 1)
        buffer.commit()
        wait_until(lambda: history(run, "train_loss"), 30, "the first commit was written without waiting")
        buffer.add("train_loss", 0.5, 2)
        buffer.commit()
        t0 = time.monotonic()
        buffer.close()  # the second commit is due in 60 s; closing writes it now
        assert time.monotonic() - t0 < 30
        assert history(run, "train_loss") == [(1, 1.0), (2, 0.5)]
    finally:
        writer.close()


def test_a_killed_writer_process_loses_no_points(tmp_path):
    run = new_run(tmp_path)
    writer = MetricWriterProcess()
    try:
        buffer = MetricBuffer(run, writer=writer, min_interval=0)
        buffer.add("train_loss", 1.0, 1)
        buffer.commit()
        wait_until(lambda: history(run, "train_loss"), 30, "the first point was written")
        (child,) = writer_children()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        for step in (2, 3):
            buffer.add("train_loss", float(step), step)
            buffer.commit()
            time.sleep(0.2)
        buffer.close()
        assert [step for step, _ in history(run, "train_loss")] == [1, 2, 3]
    finally:
        writer.close()


def test_without_a_writer_process_the_buffer_writes_the_points_itself(tmp_path, caplog):
    run = new_run(tmp_path)
    writer = MetricWriterProcess(command=[str(tmp_path / "no-such-program")])
    buffer = MetricBuffer(run, writer=writer)
    buffer.add("train_loss", 1.0, 1)
    buffer.commit()
    buffer.close()
    assert history(run, "train_loss") == [(1, 1.0)]
    assert "could not start the metric writer process" in caplog.text
    assert writer_children() == []


def test_a_store_refusal_is_logged_and_later_writes_still_go_through(tmp_path, caplog):
    run = new_run(tmp_path)
    writer = MetricWriterProcess()
    try:
        gone = JobRun(run.settings, "0" * 32)  # no such run: the store refuses
        refused = MetricBuffer(gone, writer=writer)
        refused.add("train_loss", 1.0, 1)
        refused.commit()
        refused.close()
        assert "could not write 1 metrics to run " + "0" * 32 in caplog.text
        buffer = MetricBuffer(run, writer=writer)
        buffer.add("train_loss", 2.0, 1)
        buffer.commit()
        buffer.close()
        assert history(run, "train_loss") == [(1, 2.0)]
        assert len(writer_children()) == 1  # the same process served both
    finally:
        writer.close()
