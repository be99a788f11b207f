"""`trainyard tokens …` and `trainyard admin-token`: API tokens from the command line."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from trainyard.api_client import request
from trainyard.config import Settings

tokens_app = typer.Typer(no_args_is_help=True, help="API tokens: create (admin), list, revoke.")
console = Console()


@tokens_app.command("create")
def tokens_create(
    user: str = typer.Argument(..., help="Who the token acts as; owns the jobs it submits."),
    role: str = typer.Option("member", help="viewer, member or admin."),
    name: str = typer.Option("", help="What the token is for."),
    expires_in_days: int = typer.Option(90, "--expires-in-days", min=1, max=3650),
) -> None:
    """Create a token (needs an admin token) and print its secret, which is shown only this once."""
    created = request("POST", "/tokens", json={"user": user, "role": role, "name": name,
                                               "expires_in_days": expires_in_days})
    token = created["token"]
    console.print(f"token {token['id']} for {token['user']} ({token['role']}), expires {token['expires_at'][:10]}:")
    print(created["secret"])  # plain, alone on its line, for scripts


@tokens_app.command("list")
def tokens_list() -> None:
    """Your tokens (every token, for an admin)."""
    table = Table("id", "user", "role", "name", "prefix", "expires", "last used", "state")
    for t in request("GET", "/tokens")["items"]:
        state = "revoked" if t["revoked_at"] else ("active" if t["active"] else "expired")
        table.add_row(str(t["id"]), t["user"], t["role"], t["name"], t["prefix"] + "…", t["expires_at"][:10],
                      (t["last_used_at"] or "never")[:19], state)
    console.print(table)


@tokens_app.command("revoke")
def tokens_revoke(token_id: int = typer.Argument(..., help="Token id (from `trainyard tokens list`).")) -> None:
    """Revoke a token at once."""
    token = request("DELETE", f"/tokens/{token_id}")
    console.print(f"token {token['id']} ({token['user']}, {token['prefix']}…) revoked")


def admin_token(rotate: bool = typer.Option(False, help="Issue a new admin token even if the file's still works.")) -> None:
    """Make sure <data dir>/admin-token holds a working admin token (talks to the database directly)."""
    from trainyard import auth
    from trainyard.db import Database, check_schema

    settings = Settings()
    db = Database(settings.database_url)
    try:
        check_schema(db)
        if rotate:
            settings.admin_token_path.unlink(missing_ok=True)
        secret = auth.bootstrap_admin_token(db, settings.admin_token_path)
    finally:
        db.dispose()
    if secret is None:
        console.print(f"{settings.admin_token_path} holds a working admin token")
    else:
        console.print(f"new admin token, written to {settings.admin_token_path} (mode 0600); shown this once:")
        print(secret)
