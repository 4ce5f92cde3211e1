"""Attempts: the worker's cap on redeliveries (docs/design.md §6, §7).

Celery's ``task_reject_on_worker_lost`` puts a message back on the queue every time the process
scoring it dies, without limit: an image that crashes the worker (out of memory, a native
library fault) would be redelivered forever. So the worker records, per key (``inspection_id``,
``model_version``, ``method``, like the audit row), every *attempt*: the risky part of the
work, decoding and scoring. An attempt is started in its own committed transaction before the
risk (:func:`start_attempt`) and finished in another right after it (:func:`finish_attempts`).
An attempt a later one finds still open never finished: its process died. Only those count
(``lost``); when ``lost`` passes ``Settings.max_redeliveries`` the worker writes an ``error``
row instead of scoring again.

A delivery whose previous attempt finished is not charged, whatever brought it back: the
worker's own requeue after a database outage, a broker connection drop, a warm shutdown, a
visibility timeout that passed while the first worker was writing. When the database is down
at the moment an attempt should be finished, the worker says so in the message it puts back
(its ``finished`` attempt number, see :mod:`worker.acks`) and the next attempt is not charged
either.

The table is created by migration ``0002`` (``open_attempt`` and ``lost`` by ``0004``);
:class:`db.models.DeliveryAttempt` describes it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

import sqlalchemy as sa
from sqlalchemy.orm import Session

from db.models import Audit, DeliveryAttempt
from db.repository import insert_for

Key = tuple[str, str, str]


@dataclass(frozen=True)
class AttemptState:
    """What is recorded for a key: attempts started, the open one (or None), attempts lost."""

    attempts: int = 0
    open_attempt: int | None = None
    lost: int = 0

    def unfinished(self, finished: int | None = None) -> bool:
        """True when an attempt is open and it is not ``finished`` (an attempt number a message
        says ended without its process dying)."""
        return self.open_attempt is not None and self.open_attempt != finished


@dataclass(frozen=True)
class Attempt:
    """An attempt just started: its number (1 for the first) and the attempts lost so far."""

    number: int
    lost: int


def _where(key: Key) -> sa.ColumnElement[bool]:
    t = DeliveryAttempt.__table__.c
    iid, version, method = key
    return sa.and_(t.inspection_id == iid, t.model_version == version, t.method == method)


def attempt_state(session: Session, key: Key) -> AttemptState:
    """The attempts recorded for ``key`` (all zero when none)."""
    t = DeliveryAttempt.__table__.c
    row = session.execute(
        sa.select(t.attempts, t.open_attempt, t.lost).where(_where(key))
    ).one_or_none()
    if row is None:
        return AttemptState()
    return AttemptState(int(row[0] or 0), None if row[1] is None else int(row[1]), int(row[2] or 0))


def start_attempt(
    session: Session, key: Key, worker: str | None = None, finished: int | None = None
) -> Attempt:
    """Start an attempt on ``key``; return its number and the attempts lost so far.

    One statement decides (``INSERT … ON CONFLICT DO UPDATE … RETURNING``), atomic under
    concurrent workers on PostgreSQL and SQLite: when an attempt is open and it is not
    ``finished``, it never finished and ``lost`` grows by one; the new attempt becomes the
    open one. The caller commits *before* the risk, so that a process killed during it leaves
    its attempt open.

    Raises:
        UnsupportedDialectError: a dialect other than PostgreSQL/SQLite.
    """
    table = DeliveryAttempt.__table__
    iid, version, method = key
    stmt = insert_for(session)(table).values(
        inspection_id=iid,
        model_version=version,
        method=method,
        attempts=1,
        open_attempt=1,
        lost=0,
        last_worker=worker,
    )
    never_finished = sa.and_(
        table.c.open_attempt.is_not(None), table.c.open_attempt != (finished or 0)
    )
    upsert = stmt.on_conflict_do_update(
        index_elements=["inspection_id", "model_version", "method"],
        set_={
            "lost": table.c.lost + sa.case((never_finished, 1), else_=0),
            "attempts": table.c.attempts + 1,
            "open_attempt": table.c.attempts + 1,
            "last_at": sa.func.now(),
            "last_worker": stmt.excluded.last_worker,
        },
    ).returning(table.c.attempts, table.c.lost)
    number, lost = session.execute(upsert).one()
    return Attempt(int(number), int(lost))


def finish_attempts(session: Session, attempts: Iterable[tuple[Key, int]]) -> None:
    """Mark each ``(key, number)`` attempt finished (its process came through the risky part).

    An attempt that is no longer the open one (a later attempt started meanwhile) is left
    alone. The caller commits.
    """
    table = cast(sa.Table, DeliveryAttempt.__table__)
    for key, number in attempts:
        session.execute(
            sa.update(table)
            .where(_where(key), table.c.open_attempt == number)
            .values(open_attempt=None)
        )


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
