"""Small helpers shared by the command modules (database URL, progress bars, consoles)."""

from __future__ import annotations

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

#: Progress bars and notes go to stderr, so stdout stays clean for tables and JSON.
console = Console(stderr=True)

url_option = click.option(
    "--url",
    default=None,
    metavar="URL",
    help="SQLAlchemy database URL (default: the configured INSPECTION_AUDIT_DATABASE_URL).",
)


def resolve_url(url: str | None) -> str:
    """``url``, or the configured database (``INSPECTION_AUDIT_DATABASE_URL``, else SQLite)."""
    if url:
        return url
    from inspection_audit.settings import get_settings

    return get_settings().resolved_database_url


def safe_url(url: str) -> str:
    """The URL with its password masked, for messages."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def progress() -> Progress:
    """A rich progress bar (description, bar, n/N, elapsed) on stderr."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def wide_console() -> Console:
    """A console for tables on stdout: off a terminal (pipes, logs) rich would cut columns to
    80 characters, so ids and paths are kept whole there."""
    probe = Console()
    return Console(width=None if probe.is_terminal else max(probe.width, 200))
