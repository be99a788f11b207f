"""Record each job's latest checkpoint: path, sha256 and epoch.

Revision ID: 0002_job_checkpoint
Revises: 0001_initial
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_job_checkpoint"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job") as batch:
        batch.add_column(sa.Column("checkpoint_path", sa.Text(), nullable=True))
        batch.add_column(sa.Column("checkpoint_sha256", sa.String(64), nullable=True))
        batch.add_column(sa.Column("checkpoint_epoch", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job") as batch:
        batch.drop_column("checkpoint_epoch")
        batch.drop_column("checkpoint_sha256")
        batch.drop_column("checkpoint_path")
