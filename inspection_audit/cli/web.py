"""``inspection-audit serve`` (the review station) and ``web`` (its accounts).

* ``serve [--host H] [--port P] [--workers N]``: uvicorn on :func:`inspection_audit.web.create_app`
  with the configured settings (the same database and broker as the workers).
* ``web hash-password``: a password hash for ``INSPECTION_AUDIT_WEB_USERS``.
* ``web add-user NAME``: add a reviewer to the accounts file (``<home>/web-users``).
* ``web add-token NAME``: a new API token for line software or Prometheus; its hash goes to
  the tokens file (``<home>/api-tokens``), the token itself is printed once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from inspection_audit.cli.common import console, wide_console


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--workers", default=1, show_default=True, type=click.IntRange(min=1), help="Server processes."
)
@click.option("--log-level", default="info", show_default=True)
def serve(host: str, port: int, workers: int, log_level: str) -> None:
    """Serve the review station: queue, inspection pages, overview, HTTP ingest, /metrics."""
    import uvicorn

    from inspection_audit.settings import get_settings
    from inspection_audit.web.auth import AccountsError, load_accounts, session_secret, users_file

    settings = get_settings()
    try:
        accounts = load_accounts(settings)
    except AccountsError as exc:
        raise click.ClickException(str(exc)) from exc
    if not accounts.users and not accounts.tokens:
        raise click.ClickException(
            "no reviewer account and no API token: nothing could log in. Add one with "
            f"`inspection-audit web add-user NAME` (stored hashed in {users_file(settings)}) "
            "or set INSPECTION_AUDIT_WEB_USERS"
        )
    from inspection_audit.cli.worker import check_database

    problem = check_database(settings.resolved_database_url)
    if problem:
        raise click.ClickException(problem.replace("this worker", "the review station"))
    try:
        session_secret(settings)  # made once, before several processes race for it
    except AccountsError as exc:
        raise click.ClickException(str(exc)) from exc
    console.print(
        f"[bold]review station[/] http://{host}:{port}/  ({len(accounts.users)} reviewer(s), "
        f"{len(accounts.tokens)} API token(s); database "
        f"{settings.resolved_database_url.split('@')[-1]})"
    )
    uvicorn.run(
        "inspection_audit.web.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        proxy_headers=True,
    )


@click.group("web")
def web_group() -> None:
    """Accounts of the review station: reviewer passwords and API tokens."""


@web_group.command("hash-password")
@click.password_option("--password", prompt="Password", help="Read from the terminal if omitted.")
def hash_password_cmd(password: str) -> None:
    """Print an scrypt hash of a password (for `INSPECTION_AUDIT_WEB_USERS=name:HASH`)."""
    from inspection_audit.web.auth import hash_password

    click.echo(hash_password(password))


@web_group.command("add-user")
@click.argument("name")
@click.password_option("--password", prompt="Password", help="Read from the terminal if omitted.")
def add_user(name: str, password: str) -> None:
    """Add a reviewer to the accounts file (INSPECTION_AUDIT_WEB_USERS_FILE, default
    <home>/web-users), password hashed."""
    from inspection_audit.settings import get_settings
    from inspection_audit.web.auth import AccountsError, append_entry, hash_password, users_file

    path = users_file(get_settings())
    try:
        append_entry(path, name, hash_password(password))
    except (AccountsError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"added reviewer {name} to {path}")


@web_group.command("add-token")
@click.argument("name")
def add_token(name: str) -> None:
    """Make an API token for client NAME; its hash goes to the tokens file
    (INSPECTION_AUDIT_API_TOKENS_FILE, default <home>/api-tokens). The token is shown once."""
    from inspection_audit.settings import get_settings
    from inspection_audit.web.auth import (
        AccountsError,
        append_entry,
        hash_token,
        new_token,
        tokens_file,
    )

    path = tokens_file(get_settings())
    token = new_token()
    try:
        append_entry(path, name, hash_token(token))
    except AccountsError as exc:
        raise click.ClickException(str(exc)) from exc
    console.print(f"added API client {name} to {path}; its token (shown once):")
    click.echo(token)


def how_to_review(settings: Any, image_root: Path) -> None:
    """Tell the user how to open the review page on the results just written (the demo's
    last words)."""
    import shlex
    import sys

    from inspection_audit.web.auth import AccountsError, load_accounts, users_file

    exe = Path(sys.argv[0])
    cmd = os.path.relpath(exe) if exe.name == "inspection-audit" else "inspection-audit"
    if len(cmd) > len(str(exe)):
        cmd = str(exe)
    try:
        has_users = bool(load_accounts(settings).users)
    except AccountsError:
        has_users = False
    out = wide_console()
    out.print("[bold]Review these results in a browser:[/]")
    if not has_users:
        out.print(
            f"  {cmd} web add-user reviewer        # once: asks for a password, kept hashed in "
            f"{users_file(settings)}"
        )
    root = shlex.quote(str(image_root))
    out.print(f"  INSPECTION_AUDIT_IMAGE_ROOTS={root} {cmd} serve")
    out.print("  then open http://127.0.0.1:8000/queue?line=demo and log in")
