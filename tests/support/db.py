"""Fixtures: db.

* ``pg_url``: a fresh PostgreSQL database ``inspection_audit_test_<hex>`` on the shared server
  (docs/design.md §8), dropped afterwards. The admin URL (a database to run CREATE/DROP DATABASE in)
  defaults to ``postgresql+psycopg://postgres@127.0.0.1:5432/postgres`` and may be overridden
  with ``INSPECTION_AUDIT_TEST_PG_ADMIN_URL``.
* ``sqlite_url``: a SQLite file under ``tmp_path``.
* ``migrated_pg_url`` / ``migrated_sqlite_url``: the same, migrated to the newest revision.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from db.testing import DEFAULT_ADMIN_URL as DEFAULT_PG_ADMIN_URL


def pg_admin_url() -> str:
    """The URL of the PostgreSQL database the fixtures create and drop test databases from."""
    return os.environ.get("INSPECTION_AUDIT_TEST_PG_ADMIN_URL", DEFAULT_PG_ADMIN_URL)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """URL of a new, empty PostgreSQL database, dropped (WITH (FORCE)) after the test."""
    from db.testing import create_database, drop_database

    admin = pg_admin_url()
    try:
        url = create_database(admin)
    except sa.exc.OperationalError as exc:  # pragma: no cover - environment problem
        pytest.fail(
            f"PostgreSQL is not reachable at {admin} (check `pg_isready -h 127.0.0.1`; "
            f"set INSPECTION_AUDIT_TEST_PG_ADMIN_URL to use another server): {exc}"
        )
    try:
        yield url
    finally:
        drop_database(url, admin)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    """URL of a SQLite file (not created yet) in the test's temporary folder."""
    from db.session import dispose_engines

    url = f"sqlite:///{(tmp_path / 'audit.sqlite3').as_posix()}"
    try:
        yield url
    finally:
        dispose_engines(url)


@pytest.fixture
def migrated_pg_url(pg_url: str) -> str:
    """``pg_url`` migrated to the newest revision."""
    from db.migrate import upgrade

    upgrade(pg_url)
    return pg_url


@pytest.fixture
def migrated_sqlite_url(sqlite_url: str) -> str:
    """``sqlite_url`` migrated to the newest revision."""
    from db.migrate import upgrade

    upgrade(sqlite_url)
    return sqlite_url


@pytest.fixture(params=["sqlite", "postgresql"])
def migrated_url(request: pytest.FixtureRequest) -> str:
    """A migrated database, once per dialect (SQLite and PostgreSQL)."""
    fixture = "migrated_sqlite_url" if request.param == "sqlite" else "migrated_pg_url"
    return str(request.getfixturevalue(fixture))
