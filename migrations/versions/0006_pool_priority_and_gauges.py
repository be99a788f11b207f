"""Priority levels (low/normal/high) instead of 0–9, and each worker's GPU utilisation and memory in use.

Revision ID: 0006_pool_priority_and_gauges
Revises: 0005_workers_and_job_logs
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_pool_priority_and_gauges"
down_revision = "0005_workers_and_job_logs"
branch_labels = None
depends_on = None

LEVELS = {"low": 0, "normal": 1, "high": 2}
job = sa.table("job", sa.column("id", sa.Integer), sa.column("priority", sa.Integer), sa.column("spec", sa.JSON))


def _rewrite_specs(to_spec, to_gpus) -> None:
    """Rewrite every job's stored spec (a queued job is re-validated against the current schema when it runs)."""
    conn = op.get_bind()
    last = 0
    while rows := conn.execute(sa.select(job.c.id, job.c.spec).where(job.c.id > last).order_by(job.c.id)
                               .limit(1000)).all():
        for job_id, spec in rows:
            spec = dict(spec or {})
            spec["priority"] = to_spec(spec.get("priority"))
            resources = dict(spec.get("resources") or {})
            resources["gpus"] = to_gpus(int(resources.get("gpus") or 0))
            spec["resources"] = resources
            conn.execute(sa.update(job).where(job.c.id == job_id).values(spec=spec))
        last = rows[-1][0]


def upgrade() -> None:
    with op.batch_alter_table("worker") as batch:
        batch.add_column(sa.Column("gpu_utilization", sa.Float(), nullable=True))
        batch.add_column(sa.Column("gpu_memory_used_mb", sa.Integer(), nullable=True))
    # 0–9 with 0 the default: the default becomes "normal", anything asked above it "high".
    op.execute(job.update().values(priority=sa.case((job.c.priority > 0, LEVELS["high"]), else_=LEVELS["normal"])))
    _rewrite_specs(lambda old: "high" if isinstance(old, int) and old > 0 else
                   old if old in LEVELS else "normal",
                   lambda gpus: max(1, gpus))  # 0 meant "whatever the worker has": one device
    op.create_index("ix_job_queue_status_priority", "job", ["queue", "status", "priority", "id"])


def downgrade() -> None:
    op.drop_index("ix_job_queue_status_priority", table_name="job")
    _rewrite_specs(lambda level: 9 if level == "high" else 0, lambda gpus: min(1, gpus))
    op.execute(job.update().values(priority=sa.case((job.c.priority == LEVELS["high"], 9), else_=0)))
    with op.batch_alter_table("worker") as batch:
        batch.drop_column("gpu_memory_used_mb")
        batch.drop_column("gpu_utilization")
