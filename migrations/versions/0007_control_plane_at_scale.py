"""The control plane at scale: a claim index over waiting jobs only, in the claim's order; tallies of jobs per
(queue, status) (spread over 16 rows each) and of finished attempts' durations, kept by triggers; the job's history written by a trigger
from `job.status_reason`, so a transition is one statement; no index on a column a heartbeat writes.

Revision ID: 0007_control_plane_at_scale
Revises: 0006_pool_priority_and_gauges
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_control_plane_at_scale"
down_revision = "0006_pool_priority_and_gauges"
branch_labels = None
depends_on = None

# Frozen here (a released migration never changes): the histogram's upper bounds in seconds, and +Inf's stand-in.
BUCKETS = (10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 10800.0, 21600.0, 43200.0, 86400.0, 259200.0, 1e300)
TERMINAL = "('SUCCEEDED', 'FAILED', 'CANCELLED')"
BOUNDS = " UNION ALL ".join(f"SELECT {b!r} AS le" for b in BUCKETS)
SECONDS = {
    "postgresql": "EXTRACT(EPOCH FROM {r}.finished_at - {r}.started_at)::float8",
    "sqlite": "(julianday({r}.finished_at) - julianday({r}.started_at)) * 86400.0",
}
# Each (queue, status) count is spread over SHARDS rows, the job's id picking one: concurrent claims in one queue
# would otherwise all wait for the same two rows' locks until they commit. Readers add the shards up.
SHARDS = 16
TALLY_UP = (f"INSERT INTO job_tally (queue, status, shard, n) VALUES (NEW.queue, NEW.status, NEW.id % {SHARDS}, 1) "
            "ON CONFLICT (queue, status, shard) DO UPDATE SET n = job_tally.n + 1")
TALLY_DOWN = (f"UPDATE job_tally SET n = n - 1 WHERE queue = OLD.queue AND status = OLD.status "
              f"AND shard = OLD.id % {SHARDS}")
EVENT = ("INSERT INTO job_event (job_id, at, from_status, to_status, attempt, message) "
         "VALUES (NEW.id, {at}, {from_status}, NEW.status, NEW.attempt, COALESCE(NEW.status_reason, ''))")


def _duration(dialect: str) -> str:
    seconds = SECONDS[dialect].format(r="NEW")
    return (f"INSERT INTO job_duration_tally (kind, status, le, n, sum_seconds) "
            f"SELECT NEW.kind, NEW.status, b.le, 1, {seconds} FROM ({BOUNDS}) AS b "
            f"WHERE NEW.status IN {TERMINAL} AND NEW.started_at IS NOT NULL AND NEW.finished_at IS NOT NULL "
            f"AND b.le >= {seconds} "
            "ON CONFLICT (kind, status, le) DO UPDATE SET n = job_duration_tally.n + 1, "
            "sum_seconds = job_duration_tally.sum_seconds + excluded.sum_seconds")


POSTGRES_FUNCTION = f"""
CREATE FUNCTION trainyard_job_history() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    {TALLY_UP};
    {EVENT.format(at="NEW.created_at", from_status="NULL")};
    RETURN NULL;
  ELSIF TG_OP = 'DELETE' THEN
    {TALLY_DOWN};
    RETURN NULL;
  END IF;
  IF NEW.status IS NOT DISTINCT FROM OLD.status AND NEW.queue IS NOT DISTINCT FROM OLD.queue THEN
    RETURN NULL;
  END IF;
  -- The two tally rows (same shard: the job's) in one global order, so two transitions never wait on each
  -- other in a cycle.
  IF (OLD.queue, OLD.status) < (NEW.queue, NEW.status) THEN
    {TALLY_DOWN};
    {TALLY_UP};
  ELSE
    {TALLY_UP};
    {TALLY_DOWN};
  END IF;
  IF NEW.status IS DISTINCT FROM OLD.status THEN
    {EVENT.format(at="NEW.updated_at", from_status="OLD.status")};
    IF NEW.status IN {TERMINAL} THEN
      {_duration("postgresql")};
    END IF;
  END IF;
  RETURN NULL;
END $$
"""

SQLITE_TRIGGERS = [
    f"CREATE TRIGGER job_history_insert AFTER INSERT ON job BEGIN {TALLY_UP}; "
    f"{EVENT.format(at='NEW.created_at', from_status='NULL')}; END",
    f"CREATE TRIGGER job_history_delete AFTER DELETE ON job BEGIN {TALLY_DOWN}; END",
    "CREATE TRIGGER job_history_move AFTER UPDATE OF status, queue ON job "
    f"WHEN NEW.status IS NOT OLD.status OR NEW.queue IS NOT OLD.queue BEGIN {TALLY_DOWN}; {TALLY_UP}; END",
    "CREATE TRIGGER job_history_status AFTER UPDATE OF status ON job WHEN NEW.status IS NOT OLD.status BEGIN "
    f"{EVENT.format(at='NEW.updated_at', from_status='OLD.status')}; {_duration('sqlite')}; END",
]
SQLITE_TRIGGER_NAMES = ("job_history_insert", "job_history_delete", "job_history_move", "job_history_status")


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.create_table(
        "job_tally",
        sa.Column("queue", sa.String(100), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("queue", "status", "shard", name=op.f("pk_job_tally")),
    )
    op.create_table(
        "job_duration_tally",
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("le", sa.Float(), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("sum_seconds", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("kind", "status", "le", name=op.f("pk_job_duration_tally")),
    )
    with op.batch_alter_table("job") as batch:
        batch.add_column(sa.Column("status_reason", sa.Text(), nullable=True))
    op.drop_index("ix_job_queue_status_priority", table_name="job")
    op.drop_index("ix_job_lease_expires_at", table_name="job")
    op.create_index("ix_job_dataset_id", "job", ["dataset", "id"])
    op.create_index("ix_job_architecture_id", "job", ["architecture", "id"])
    op.create_index("ix_job_claim", "job", ["queue", sa.text("priority DESC"), "id"],
                    postgresql_where=sa.text("status = 'QUEUED'"), sqlite_where=sa.text("status = 'QUEUED'"))
    op.execute(f"INSERT INTO job_tally (queue, status, shard, n) SELECT queue, status, id % {SHARDS}, count(*) "
               f"FROM job GROUP BY queue, status, id % {SHARDS}")
    seconds = SECONDS[dialect].format(r="j")
    op.execute(f"INSERT INTO job_duration_tally (kind, status, le, n, sum_seconds) "
               f"SELECT j.kind, j.status, b.le, count(*), sum({seconds}) FROM job AS j, ({BOUNDS}) AS b "
               f"WHERE j.status IN {TERMINAL} AND j.started_at IS NOT NULL AND j.finished_at IS NOT NULL "
               f"AND b.le >= {seconds} GROUP BY j.kind, j.status, b.le")
    if dialect == "postgresql":
        # Room on each page for a heartbeat's new row version beside the old one: the update stays HOT.
        op.execute("ALTER TABLE job SET (fillfactor = 80)")
        op.execute(POSTGRES_FUNCTION)
        op.execute("CREATE TRIGGER job_history AFTER INSERT OR DELETE OR UPDATE OF status, queue ON job "
                   "FOR EACH ROW EXECUTE FUNCTION trainyard_job_history()")
    else:
        for statement in SQLITE_TRIGGERS:
            op.execute(statement)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute("DROP TRIGGER job_history ON job")
        op.execute("DROP FUNCTION trainyard_job_history()")
        op.execute("ALTER TABLE job RESET (fillfactor)")
    else:
        for name in SQLITE_TRIGGER_NAMES:
            op.execute(f"DROP TRIGGER {name}")
    op.drop_index("ix_job_claim", table_name="job")
    op.drop_index("ix_job_architecture_id", table_name="job")
    op.drop_index("ix_job_dataset_id", table_name="job")
    op.create_index("ix_job_lease_expires_at", "job", ["lease_expires_at"])
    op.create_index("ix_job_queue_status_priority", "job", ["queue", "status", "priority", "id"])
    with op.batch_alter_table("job") as batch:
        batch.drop_column("status_reason")
    op.drop_table("job_duration_tally")
    op.drop_table("job_tally")
