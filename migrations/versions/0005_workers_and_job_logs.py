"""The worker pool's registry (heartbeats, current job) and each job's own log lines.

Revision ID: 0005_workers_and_job_logs
Revises: 0004_api_tokens
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_workers_and_job_logs"
down_revision = "0004_api_tokens"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "worker",
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("device", sa.String(255), nullable=False),
        sa.Column("device_memory_mb", sa.Integer(), nullable=True),
        sa.Column("queues", sa.JSON(), nullable=False),
        sa.Column("current_job", sa.Integer(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_worker")),
    )
    op.create_table(
        "job_log",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("line", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["job.id"], name=op.f("fk_job_log_job_id_job"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_log")),
    )
    op.create_index("ix_job_log_job_id_id", "job_log", ["job_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_job_log_job_id_id", table_name="job_log")
    op.drop_table("job_log")
    op.drop_table("worker")
