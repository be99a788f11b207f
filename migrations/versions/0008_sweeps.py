"""Sweeps: the sweep, its trials (what Optuna chose, how each ended) and their per-epoch objective reports; a
job's sweep and trial number; PRUNED, a trial stopped early by its sweep, counts as a finished job in the
duration histogram.

Revision ID: 0008_sweeps
Revises: 0007_control_plane_at_scale
Create Date: 2026-12-03
"""

import importlib.util
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision = "0008_sweeps"
down_revision = "0007_control_plane_at_scale"
branch_labels = None
depends_on = None

TERMINAL = "('SUCCEEDED', 'FAILED', 'CANCELLED', 'PRUNED')"


def _migration_0007():
    """0007's frozen trigger text: this revision re-creates its triggers with PRUNED among the final states."""
    path = Path(__file__).with_name("0007_control_plane_at_scale.py")
    spec = importlib.util.spec_from_file_location("trainyard_migration_0007", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _history_triggers(terminal: str) -> None:
    m0007 = _migration_0007()
    if op.get_bind().dialect.name == "postgresql":
        op.execute(m0007.POSTGRES_FUNCTION.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION")
                   .replace(m0007.TERMINAL, terminal))
    else:
        op.execute("DROP TRIGGER job_history_status")
        status_trigger = next(t for t in m0007.SQLITE_TRIGGERS if "job_history_status" in t)
        op.execute(status_trigger.replace(m0007.TERMINAL, terminal))


def upgrade() -> None:
    op.create_table(
        "sweep",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("max_trials", sa.Integer(), nullable=False),
        sa.Column("max_parallel", sa.Integer(), nullable=False),
        sa.Column("trials_started", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(100), nullable=True),
        sa.Column("status_reason", sa.Text(), nullable=True),
        sa.Column("mlflow_run_id", sa.String(64), nullable=True),
        sa.Column("best_trial", sa.Integer(), nullable=True),
        sa.Column("best_value", sa.Float(), nullable=True),
        sa.Column("model_name", sa.String(100), nullable=True),
        sa.Column("model_version", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sweep")),
    )
    op.create_index("ix_sweep_status_id", "sweep", ["status", "id"])
    op.create_table(
        "sweep_trial",
        sa.Column("sweep_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("distributions", sa.JSON(), nullable=False),
        sa.Column("system_attrs", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["sweep_id"], ["sweep.id"], name=op.f("fk_sweep_trial_sweep_id_sweep"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["job_id"], ["job.id"], name=op.f("fk_sweep_trial_job_id_job"), ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("sweep_id", "number", name=op.f("pk_sweep_trial")),
    )
    op.create_table(
        "sweep_report",
        sa.Column("sweep_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["sweep_id"], ["sweep.id"], name=op.f("fk_sweep_report_sweep_id_sweep"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("sweep_id", "number", "step", name=op.f("pk_sweep_report")),
    )
    # Plain ADD COLUMN on both databases: SQLite's batch mode would copy the job table and lose its triggers.
    op.add_column("job", sa.Column("sweep_id", sa.Integer(), nullable=True))
    op.add_column("job", sa.Column("trial", sa.Integer(), nullable=True))
    op.create_index("ix_job_sweep_id_trial", "job", ["sweep_id", "trial"],
                    postgresql_where=sa.text("sweep_id IS NOT NULL"), sqlite_where=sa.text("sweep_id IS NOT NULL"))
    _history_triggers(TERMINAL)


def downgrade() -> None:
    _history_triggers(_migration_0007().TERMINAL)
    op.drop_index("ix_job_sweep_id_trial", table_name="job")
    if op.get_bind().dialect.name == "postgresql":
        op.drop_column("job", "trial")
        op.drop_column("job", "sweep_id")
    else:  # SQLite 3.35+ drops a column in place (no copy: the job table's triggers stay)
        op.execute("ALTER TABLE job DROP COLUMN trial")
        op.execute("ALTER TABLE job DROP COLUMN sweep_id")
    op.drop_table("sweep_report")
    op.drop_table("sweep_trial")
    op.drop_index("ix_sweep_status_id", table_name="sweep")
    op.drop_table("sweep")
