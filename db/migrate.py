"""Schema migrations (Alembic, ``db/migrations``), configured from code: no alembic.ini.

:func:`upgrade`, :func:`downgrade` and :func:`current` run on the URL they are given; each
migration command runs in one transaction (PostgreSQL and SQLite both have transactional DDL),
so a failed upgrade leaves the schema as it was.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from db.session import make_engine

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def alembic_config(url: str | None = None) -> Config:
    """Return an Alembic :class:`~alembic.config.Config` for ``db/migrations``.

    ``url`` (optional) is stored as ``sqlalchemy.url`` for tools that open their own
    connection; :func:`upgrade` and :func:`downgrade` hand over a connection instead.
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _run(url: str, fn: str, rev: str) -> None:
    cfg = alembic_config()
    with make_engine(url).begin() as conn:
        cfg.attributes["connection"] = conn
        getattr(command, fn)(cfg, rev)


def upgrade(url: str, rev: str = "head") -> None:
    """Migrate the database at ``url`` up to revision ``rev`` (default: the newest).

    Creates the SQLite file (and its folder) when it does not exist yet. Raises
    ``alembic.util.exc.CommandError`` for an unknown revision and ``sqlalchemy.exc`` errors
    when the database cannot be reached.
    """
    _run(url, "upgrade", rev)


def downgrade(url: str, rev: str = "base") -> None:
    """Migrate the database at ``url`` down to revision ``rev`` (default: ``base``, empty).

    Downgrading to ``base`` drops every table and the ``review_queue`` view, with their rows.
    Raises ``alembic.util.exc.CommandError`` for an unknown revision and ``sqlalchemy.exc``
    errors when the database cannot be reached.
    """
    _run(url, "downgrade", rev)


def current(url: str) -> str | None:
    """Return the revision the database at ``url`` is at, or None when it was never migrated.

    Raises ``sqlalchemy.exc`` errors when the database cannot be reached.
    """
    with make_engine(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head() -> str | None:
    """Return the newest revision of ``db/migrations`` (what ``upgrade`` migrates to)."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()
