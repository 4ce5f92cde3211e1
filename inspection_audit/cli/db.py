"""``inspection-audit db upgrade | downgrade | current``: migrations, as their own step.

Every command takes ``--url``; the default is the configured database
(``INSPECTION_AUDIT_DATABASE_URL``, else the SQLite file under ``INSPECTION_AUDIT_HOME``).
"""

from __future__ import annotations

import click

from inspection_audit.cli.common import resolve_url, safe_url, url_option


@click.group("db")
def db_group() -> None:
    """Create, migrate and inspect the audit database schema."""


@db_group.command("upgrade")
@click.option("--to", "rev", default="head", show_default=True, help="Target revision.")
@url_option
def db_upgrade(rev: str, url: str | None) -> None:
    """Migrate the database up to the newest (or the given) revision."""
    from db.migrate import current, upgrade

    url = resolve_url(url)
    upgrade(url, rev)
    click.echo(f"{safe_url(url)}: at revision {current(url)}")


@db_group.command("downgrade")
@click.option("--to", "rev", default="base", show_default=True, help="Target revision.")
@url_option
def db_downgrade(rev: str, url: str | None) -> None:
    """Migrate the database down (default: to base, which drops every table)."""
    from db.migrate import current, downgrade

    url = resolve_url(url)
    downgrade(url, rev)
    click.echo(f"{safe_url(url)}: at revision {current(url) or 'base'}")


@db_group.command("current")
@url_option
def db_current(url: str | None) -> None:
    """Print the revision the database is at (`none` when never migrated)."""
    from db.migrate import current, head

    url = resolve_url(url)
    rev = current(url)
    suffix = " (head)" if rev is not None and rev == head() else ""
    click.echo(f"{rev or 'none'}{suffix}")
