"""How the CLI calls the REST API: base URL and token from the settings, problems printed for a person."""

from __future__ import annotations

from typing import Any

import httpx
import typer
from rich.console import Console

from trainyard.config import Settings

err = Console(stderr=True)


def cli_token(settings: Settings) -> str | None:
    """TRAINYARD_TOKEN, else the admin token `trainyard up` wrote, when this user can read it."""
    if settings.token is not None:
        return settings.token.get_secret_value()
    try:
        return settings.admin_token_path.read_text().strip() or None
    except OSError:
        return None


def request(method: str, path: str, **kwargs: Any) -> Any:
    """Call /api/v1`path`; print the problem and exit non-zero on any error."""
    settings = Settings()
    token = cli_token(settings)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with httpx.Client(base_url=settings.api_url.rstrip("/") + "/api/v1", timeout=30) as client:
            response = client.request(method, path, headers=headers, **kwargs)
    except httpx.HTTPError as exc:
        err.print(f"[red]cannot reach Trainyard at {settings.api_url}[/]: {exc} (is `trainyard up` running? "
                  "TRAINYARD_API_URL points elsewhere)")
        raise typer.Exit(2) from None
    if response.is_error:
        try:
            problem = response.json()
            err.print(f"[red]{problem.get('title', 'error')}[/] ({response.status_code}): {problem.get('detail', '')}")
        except ValueError:
            err.print(f"[red]HTTP {response.status_code}[/]: {response.text[:500]}")
        if response.status_code == 401:
            err.print("Set TRAINYARD_TOKEN to a token (an admin makes one with `trainyard tokens create`).")
        raise typer.Exit(1)
    return response.json()
