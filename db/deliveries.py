"""Delivery counting: the worker's cap on redeliveries (docs/design.md §7).

Celery's ``task_reject_on_worker_lost`` puts a message back on the queue every time the process
scoring it dies, without limit: an image that crashes the worker (out of memory, a native
library fault) would be redelivered forever. So a worker counts every delivery of an inspection
in ``delivery_attempts`` (keyed like the audit row: ``inspection_id``, ``model_version``,
``method``) *before* it scores, in its own committed transaction. When the count passes
``Settings.max_redeliveries`` the worker writes an ``error`` row instead of scoring again.

The table is created by migration ``0002``; :class:`db.models.DeliveryAttempt` describes it.
"""

from __future__ import annotations

from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.orm import Session

from db.models import Audit, DeliveryAttempt
from db.repository import insert_for

Key = tuple[str, str, str]


def record_deliveries(
    session: Session, keys: Iterable[Key], worker: str | None = None
) -> dict[Key, int]:
    """Count one delivery for each key; return the new count per key (1 on a first delivery).

    ``INSERT … ON CONFLICT DO UPDATE SET attempts = attempts + 1 … RETURNING``: atomic under
    concurrent workers on PostgreSQL and SQLite. A key given twice counts twice. The caller
    commits (commit *before* scoring, so that a worker killed while scoring leaves its count).

    Raises:
        UnsupportedDialectError: a dialect other than PostgreSQL/SQLite.
    """
    insert = insert_for(session)
    table = DeliveryAttempt.__table__
    out: dict[Key, int] = {}
    for key in keys:
        iid, version, method = key
        stmt = insert(table).values(
            inspection_id=iid, model_version=version, method=method, attempts=1, last_worker=worker
        )
        upsert = stmt.on_conflict_do_update(
            index_elements=["inspection_id", "model_version", "method"],
            set_={
                "attempts": table.c.attempts + 1,
                "last_at": sa.func.now(),
                "last_worker": stmt.excluded.last_worker,
            },
        ).returning(table.c.attempts)
        out[key] = int(session.execute(upsert).scalar_one())
    return out


def delivery_attempts(session: Session, key: Key) -> int:
    """How many deliveries of ``key`` were counted (0 when none)."""
    table = DeliveryAttempt.__table__
    iid, version, method = key
    found = session.execute(
        sa.select(table.c.attempts).where(
            table.c.inspection_id == iid,
            table.c.model_version == version,
            table.c.method == method,
        )
    ).scalar_one_or_none()
    return int(found or 0)


def done_keys(session: Session, keys: Iterable[Key]) -> set[Key]:
    """The keys among ``keys`` whose audit row already exists with status ``done``."""
    keys = list(keys)
    if not keys:
        return set()
    a = Audit.__table__.c
    ids = sorted({k[0] for k in keys})
    rows = session.execute(
        sa.select(a.inspection_id, a.model_version, a.method).where(
            a.inspection_id.in_(ids), a.status == "done"
        )
    ).all()
    wanted = set(keys)
    return {(r[0], r[1], r[2]) for r in rows} & wanted
