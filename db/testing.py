"""Throwaway PostgreSQL databases for tests and benchmarks (one copy of the helper).

:func:`create_database` makes ``<prefix><random hex>`` on the server of ``admin_url`` and
returns its URL; :func:`drop_database` drops it ``WITH (FORCE)``. Nothing here is used by the
service.
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def create_database(
    admin_url: str = DEFAULT_ADMIN_URL, prefix: str = "inspection_audit_test_"
) -> str:
    """Create an empty database and return its URL (password kept).

    Raises:
        sqlalchemy.exc.OperationalError: the server is not reachable.
    """
    name = f"{prefix}{uuid.uuid4().hex[:16]}"
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    finally:
        engine.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_database(url: str, admin_url: str = DEFAULT_ADMIN_URL) -> None:
    """Dispose this process's engine for ``url`` and drop its database (connections forced off)."""
    from db.session import dispose_engines

    dispose_engines(url)
    name = make_url(url).database
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        engine.dispose()
