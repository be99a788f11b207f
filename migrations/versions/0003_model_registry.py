"""Model registry: each job's registered model version, and the audit trail of alias moves.

Revision ID: 0003_model_registry
Revises: 0002_job_checkpoint
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_model_registry"
down_revision = "0002_job_checkpoint"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job") as batch:
        batch.add_column(sa.Column("model_name", sa.String(100), nullable=True))
        batch.add_column(sa.Column("model_version", sa.Integer(), nullable=True))
    op.create_table(
        "model_alias_event",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model_name", sa.String(100), nullable=False),
        sa.Column("alias", sa.String(63), nullable=False),
        sa.Column("from_version", sa.Integer(), nullable=True),
        sa.Column("to_version", sa.Integer(), nullable=True),
        sa.Column("forced", sa.Boolean(), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_alias_event")),
    )
    op.create_index("ix_model_alias_event_model_name_id", "model_alias_event", ["model_name", "id"])


def downgrade() -> None:
    op.drop_index("ix_model_alias_event_model_name_id", table_name="model_alias_event")
    op.drop_table("model_alias_event")
    with op.batch_alter_table("job") as batch:
        batch.drop_column("model_version")
        batch.drop_column("model_name")
