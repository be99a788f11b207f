"""A real `python -m trainyard_workers worker`, except that a `train` job's body is a no-op — for measure 6.

The engine has no no-op job kind (and the benchmarks must not add one), so this process replaces
`engine.JOB_KINDS["train"]` in its own memory before starting the worker. Everything else is the real
engine: the atomic claim, the worker registry, the job-log capture, the lease keeper thread, the MLflow run
(created, then closed), `record_progress`, `finish_job` and every `job_event` row. Only model building and
training are skipped. The source of the platform is not touched.

Run as: python bench/noop_engine_worker.py worker --queues=cpu (with the TRAINYARD_* environment).
"""

from __future__ import annotations

from trainyard_workers import engine
from trainyard_workers.__main__ import cli


def noop_job(ctx, job, lease, run):
    return {}, {"epoch": 0, "epochs": 0}


engine.JOB_KINDS["train"] = noop_job

if __name__ == "__main__":
    cli()
