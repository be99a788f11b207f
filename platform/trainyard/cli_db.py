"""`trainyard db …`: the platform database's schema (upgrade, current, revision) and its job tallies."""

from __future__ import annotations

import typer
from rich.console import Console

from trainyard.config import Settings

db_app = typer.Typer(no_args_is_help=True, help="Platform database schema.")
console = Console()


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Migrate the platform database to the latest schema (creates it if missing)."""
    from trainyard.datasets import ensure_builtin_datasets
    from trainyard.db import Database, upgrade_schema

    settings = Settings()
    if settings.database_url.startswith("sqlite"):
        settings.ensure_data_dir()
    upgrade_schema(settings.database_url, revision)
    db = Database(settings.database_url)
    try:
        ensure_builtin_datasets(db)
    finally:
        db.dispose()
    console.print(f"database at {_redact(settings.database_url)} is at revision {revision}")
    if not settings.mlflow_tracking_uri.startswith(("http://", "https://")):
        from trainyard.tracking import prepare_tracking_store

        prepare_tracking_store(settings)  # a local MLflow store is created here, not raced by the workers
        console.print(f"MLflow store at {_redact(settings.mlflow_tracking_uri)} is ready")


@db_app.command("current")
def db_current() -> None:
    """Print the database's revision and the code's head revision."""
    from trainyard.db import create_db_engine, schema_revisions

    engine = create_db_engine(Settings().database_url)
    try:
        current, head = schema_revisions(engine)
    finally:
        engine.dispose()
    console.print(f"database: {current or 'empty'}; code head: {head}")
    if current != head:
        raise typer.Exit(1)


@db_app.command("tallies")
def db_tallies(recount: bool = typer.Option(False, "--recount", help="Rebuild the tallies from the job rows.")) -> None:
    """Check the job tallies (queue depths, jobs per status, durations) against the job rows; --recount
    rebuilds them (after a bulk import with triggers off). Reads every job: an operator's tool."""
    from trainyard import job_tallies
    from trainyard.db import Database

    db = Database(Settings().database_url)
    try:
        result = job_tallies.recount(db) if recount else job_tallies.check(db)
    finally:
        db.dispose()
    for (queue, status), n in sorted(result.counted.items()):
        kept = result.kept.get((queue, status), 0)
        console.print(f"{queue:<20} {status:<10} {n:>10,}" + ("" if kept == n else f"  (tally says {kept:,})"))
    if not result.consistent:
        console.print("[red]the tallies disagree with the job rows[/red]; run `trainyard db tallies --recount`")
        raise typer.Exit(1)
    console.print("tallies " + ("rebuilt" if recount else "agree with the job rows"))


@db_app.command("revision")
def db_revision(message: str = typer.Option(..., "-m", "--message", help="Why the schema changes.")) -> None:
    """(Developers) Write a new migration from the difference between the models and the database."""
    from alembic import command

    from trainyard.db import alembic_config

    command.revision(alembic_config(Settings().database_url), message=message, autogenerate=True)


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url
