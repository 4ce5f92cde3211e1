"""The producer's outbox: each inspection recorded as queued before it is sent.

A broker that loses its queue (a Redis without persistence that restarts, a queue emptied by
hand) leaves no trace on its own. With the outbox on (``Settings.outbox``, always for the HTTP
ingest), the producer writes one row per inspection, with the message as it will be sent, and
commits *before* sending (:func:`record_queued`); after the broker accepted it,
:func:`mark_sent`. ``inspection-audit reconcile`` (:mod:`producer.outbox`) marks the entries
that have an audit row (:func:`mark_audited`), lists those still without one a given time
after their last send (:func:`overdue`) and sends them again.

Times come from the database's clock (``now()``), so producers and reconcile on machines with
different clocks agree. Functions here never commit: the caller owns the transaction. The table
is created by migration ``0004`` (:class:`db.models.OutboxEntry`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.orm import Session

from db.models import Audit, OutboxEntry, UTCDateTime
from db.repository import insert_for

_OUTBOX = cast(sa.Table, OutboxEntry.__table__)


@dataclass(frozen=True)
class Overdue:
    """An outbox entry with no audit row, last sent (or queued, if never sent) before a cutoff."""

    inspection_id: str
    queue: str
    message: dict[str, Any]
    queued_at: datetime
    last_sent_at: datetime | None
    sends: int


def db_now(session: Session) -> datetime:
    """The database's clock, as an aware UTC datetime."""
    return session.execute(sa.select(sa.func.now(type_=UTCDateTime()))).scalar_one()


def record_queued(
    session: Session, messages: Iterable[tuple[str, Mapping[str, Any]]], queue: str
) -> int:
    """Record each ``(inspection_id, wire message)`` as queued on ``queue``; return how many.

    An inspection already in the outbox gets the new message and queue (it is being enqueued
    again) and becomes pending again; its sends and first ``queued_at`` are kept.

    Raises:
        UnsupportedDialectError: a dialect other than PostgreSQL/SQLite.
    """
    table = OutboxEntry.__table__
    n = 0
    for iid, message in messages:
        stmt = insert_for(session)(table).values(
            inspection_id=iid, queue=queue, message=dict(message)
        )
        session.execute(
            stmt.on_conflict_do_update(
                index_elements=["inspection_id"],
                set_={
                    "message": stmt.excluded.message,
                    "queue": stmt.excluded.queue,
                    "audited_at": None,
                },
            )
        )
        n += 1
    return n


def mark_sent(session: Session, inspection_ids: Iterable[str]) -> int:
    """Count one accepted send for each id (``sends + 1``; ``sent_at`` set on the first,
    ``last_sent_at`` on every send); return the rows updated."""
    ids = list(dict.fromkeys(inspection_ids))
    if not ids:
        return 0
    t = OutboxEntry.__table__.c
    now = sa.func.now()
    result = session.execute(
        sa.update(_OUTBOX)
        .where(t.inspection_id.in_(ids))
        .values(
            sends=t.sends + 1,
            sent_at=sa.func.coalesce(t.sent_at, now),
            last_sent_at=now,
        )
    )
    return int(getattr(result, "rowcount", 0) or 0)


def _has_audit() -> sa.Exists:
    a = Audit.__table__.c
    return sa.exists().where(a.inspection_id == OutboxEntry.__table__.c.inspection_id)


def mark_audited(session: Session) -> int:
    """Set ``audited_at`` on pending entries whose inspection has an audit row; return how many.

    Only pending entries are looked at, so the work stays proportional to what was sent since
    the last call, however long the outbox grows.
    """
    t = _OUTBOX
    result = session.execute(
        sa.update(t).where(t.c.audited_at.is_(None), _has_audit()).values(audited_at=sa.func.now())
    )
    return int(getattr(result, "rowcount", 0) or 0)


def _overdue_filter(cutoff: datetime) -> sa.ColumnElement[bool]:
    t = OutboxEntry.__table__.c
    last = sa.func.coalesce(t.last_sent_at, t.queued_at)
    return sa.and_(t.audited_at.is_(None), ~_has_audit(), last <= cutoff)


def overdue(session: Session, older_than: timedelta, limit: int | None = None) -> list[Overdue]:
    """Entries with no audit row whose last send (or queueing, if never sent) is at least
    ``older_than`` ago by the database's clock, oldest first (at most ``limit``).

    Raises:
        ValueError: a negative ``older_than`` or ``limit``.
    """
    if older_than < timedelta(0):
        raise ValueError(f"older_than must be >= 0, got {older_than}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    t = OutboxEntry.__table__.c
    cutoff = db_now(session) - older_than
    stmt = (
        sa.select(t.inspection_id, t.queue, t.message, t.queued_at, t.last_sent_at, t.sends)
        .where(_overdue_filter(cutoff))
        .order_by(t.queued_at, t.inspection_id)
    )
    if limit is not None:
        stmt = stmt.limit(limit)
    return [
        Overdue(r[0], r[1], dict(r[2] or {}), r[3], r[4], int(r[5] or 0))
        for r in session.execute(stmt).all()
    ]


def count_overdue(session: Session, older_than: timedelta) -> int:
    """How many entries :func:`overdue` would list (no limit)."""
    cutoff = db_now(session) - max(older_than, timedelta(0))
    stmt = sa.select(sa.func.count()).select_from(OutboxEntry.__table__)
    return int(session.execute(stmt.where(_overdue_filter(cutoff))).scalar_one())
