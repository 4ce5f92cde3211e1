"""Alembic environment, configured from code by :mod:`db.migrate` (no alembic.ini).

``db.migrate`` passes an open connection in ``config.attributes["connection"]``; when run any
other way, the URL comes from the ``sqlalchemy.url`` option. Migrations import no application
code beyond ``db`` itself (``db.models`` is the autogenerate target).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from db.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    """Emit SQL to stdout instead of running it (``alembic upgrade --sql``)."""
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on the connection ``db.migrate`` handed over, or on a new one."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from db.session import make_engine

    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError(
            "no database URL: run migrations with `inspection-audit db upgrade` (db.migrate), "
            "or set sqlalchemy.url"
        )
    with make_engine(url).connect() as conn:
        _run(conn)
        conn.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
