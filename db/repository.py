"""The queries of inspection-audit: idempotent writes for the worker, reads for the CLI.

Writes use ``INSERT … ON CONFLICT`` of the session's dialect (PostgreSQL or SQLite), so that
at-least-once delivery yields exactly one row per key even with concurrent writers (docs/design.md §6).
Functions take a :class:`~sqlalchemy.orm.Session` and never commit: the caller owns the
transaction (see :func:`db.session.session_scope`). The worker hands over typed rows
(:mod:`db.rows`).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import (
    AUDIT_KEY_COLUMNS,
    AUDIT_RESULT_COLUMNS,
    AUDIT_STATUSES,
    PREDICTIONS,
    VERDICTS,
    Audit,
    DeadLetter,
    Inspection,
    OutboxEntry,
    Review,
    review_queue_view,
)
from db.rows import AuditRow, InspectionRow, storable_text

_AUDIT_WRITABLE = (*AUDIT_KEY_COLUMNS, *AUDIT_RESULT_COLUMNS, "delivery_count")


class UnsupportedDialectError(ValueError):
    """The database is neither PostgreSQL nor SQLite (the upserts need their ON CONFLICT)."""


def insert_for(session: Session) -> Callable[[Any], Any]:
    """``insert()`` of the session's dialect (the one that knows ``on_conflict_*``).

    Raises:
        UnsupportedDialectError: a dialect other than PostgreSQL/SQLite.
    """
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert
    if name == "sqlite":
        return sqlite.insert
    raise UnsupportedDialectError(f"inspection-audit supports PostgreSQL and SQLite, not {name!r}")


def upsert_inspection(session: Session, row: InspectionRow) -> None:
    """Store the line's record of one inspection, once: a second call for the same id is a no-op.

    ``INSERT … ON CONFLICT (inspection_id) DO NOTHING``: the first delivery's values win.
    ``row.captured_at`` should be timezone-aware (a naive value is taken as UTC);
    ``row.received_at`` defaults to the database's clock.

    Raises:
        ValueError: a ``prediction`` other than ``ok``/``defect`` or a ``score`` outside [0, 1].
        UnsupportedDialectError: a dialect other than PostgreSQL/SQLite.
    """
    if row.prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {row.prediction!r}")
    if not 0.0 <= float(row.score) <= 1.0:
        raise ValueError(f"score must be a probability in [0, 1], got {row.score!r}")
    values: dict[str, Any] = {
        "inspection_id": row.inspection_id,
        "image_ref": row.image_ref,
        "line": row.line,
        "station": row.station,
        "captured_at": row.captured_at,
        "prediction": row.prediction,
        "score": float(row.score),
        "expected_model_version": row.expected_model_version,
    }
    if row.received_at is not None:
        values["received_at"] = row.received_at
    stmt = insert_for(session)(Inspection.__table__).values(values)
    session.execute(stmt.on_conflict_do_nothing(index_elements=["inspection_id"]))


def upsert_audit(session: Session, row: AuditRow) -> bool:
    """Write one audit result idempotently; return True if it was new, False if it existed.

    A matching :func:`upsert_inspection` must have run first (foreign key).

    On a conflict on (``inspection_id``, ``model_version``, ``method``) the existing row gets
    ``duplicate_count + 1``, ``updated_at = now`` and the larger ``delivery_count``; its
    result columns are replaced only when it has status ``error`` and ``row`` has status
    ``done`` (a late success beats an error; a success is never overwritten). One statement,
    ``INSERT … ON CONFLICT DO UPDATE … RETURNING duplicate_count``, decides, so concurrent
    writers of one key end with one row.

    Raises:
        ValueError: an empty key field, a bad status or a ``delivery_count`` below 1.
        sqlalchemy.exc.IntegrityError: the inspection row is missing.
    """
    missing = [k for k, v in zip(AUDIT_KEY_COLUMNS, row.key, strict=True) if not v]
    if missing:
        raise ValueError(f"audit row lacks {missing}")
    if row.status not in AUDIT_STATUSES:
        raise ValueError(f"status must be one of {AUDIT_STATUSES}, got {row.status!r}")
    if row.delivery_count < 1:
        raise ValueError(f"delivery_count must be >= 1, got {row.delivery_count}")
    values = {name: getattr(row, name) for name in _AUDIT_WRITABLE}
    values["suspected_false_negative"] = bool(row.suspected_false_negative)

    table = Audit.__table__
    stmt = insert_for(session)(table).values(values)
    new = stmt.excluded
    replace = sa.and_(table.c.status == "error", new.status == "done")
    set_: dict[str, Any] = {
        name: sa.case((replace, new[name]), else_=table.c[name]) for name in AUDIT_RESULT_COLUMNS
    }
    set_["duplicate_count"] = table.c.duplicate_count + 1
    set_["delivery_count"] = sa.case(
        (new.delivery_count > table.c.delivery_count, new.delivery_count),
        else_=table.c.delivery_count,
    )
    set_["updated_at"] = sa.func.now()
    stmt = stmt.on_conflict_do_update(index_elements=list(AUDIT_KEY_COLUMNS), set_=set_)
    duplicate_count = session.execute(stmt.returning(table.c.duplicate_count)).scalar_one()
    return bool(duplicate_count == 0)


def get_audit(
    session: Session, inspection_id: str, model_version: str, method: str
) -> dict[str, Any] | None:
    """Return the audit row for one key as a dict of its columns, or None when there is none."""
    table = Audit.__table__
    result = session.execute(
        sa.select(table).where(
            table.c.inspection_id == inspection_id,
            table.c.model_version == model_version,
            table.c.method == method,
        )
    )
    found = result.mappings().one_or_none()
    return dict(found) if found is not None else None


def review_queue(session: Session, limit: int | None = 50) -> list[dict[str, Any]]:
    """Return the suspected false negatives awaiting review, most suspicious first.

    Rows of the ``review_queue`` view (status ``done``, flagged, no verdict yet for the
    inspection) as dicts, ordered by ``decision_score`` descending, then ``captured_at``,
    ``inspection_id``, ``model_version`` and ``method``; at most ``limit`` (None: all).
    Raises ``ValueError`` for a negative limit and ``sqlalchemy.exc`` errors when the database
    is not migrated.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    v = review_queue_view.c
    stmt = sa.select(review_queue_view).order_by(
        v.decision_score.desc().nulls_last(),
        v.captured_at,
        v.inspection_id,
        v.model_version,
        v.method,
    )
    if limit is not None:
        stmt = stmt.limit(limit)
    return [dict(r) for r in session.execute(stmt).mappings()]


def record_verdict(
    session: Session,
    inspection_id: str,
    verdict: str,
    reviewer: str | None = None,
    note: str | None = None,
) -> int:
    """Record a reviewer's verdict on an inspection; return the new review's id.

    ``verdict`` is ``confirmed_defect`` or ``cleared``. Earlier verdicts stay as history; the
    latest one is the inspection's verdict (:func:`latest_verdict`). Any verdict removes the
    inspection from the review queue. Raises ``ValueError`` for another verdict and
    ``LookupError`` when no inspection has that id.
    """
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
    exists = session.execute(
        sa.select(Inspection.inspection_id).where(Inspection.inspection_id == inspection_id)
    ).first()
    if exists is None:
        raise LookupError(f"no inspection with inspection_id {inspection_id!r}")
    if note is not None:
        note = storable_text(note)  # a NUL in a reviewer's note must not refuse the verdict
    review = Review(inspection_id=inspection_id, verdict=verdict, reviewer=reviewer, note=note)
    session.add(review)
    session.flush()
    return review.id


def latest_verdict(session: Session, inspection_id: str) -> dict[str, Any] | None:
    """Return the inspection's current verdict (the newest review) as a dict, or None."""
    table = Review.__table__
    found = (
        session.execute(
            sa.select(table)
            .where(table.c.inspection_id == inspection_id)
            .order_by(table.c.created_at.desc(), table.c.id.desc())
            .limit(1)
        )
        .mappings()
        .first()
    )
    return dict(found) if found is not None else None


def audit_summary(session: Session) -> dict[str, int]:
    """Count what the audit produced.

    Keys: ``inspections`` (rows in inspections), ``audited`` (audit rows), ``done``,
    ``error``, ``flagged`` (done and suspected false negative), ``duplicates`` (sum of
    ``duplicate_count``: deliveries that found their row already written), ``reviewed``
    (inspections with a verdict) and ``pending_review`` (rows in the review queue).
    """
    a = Audit.__table__.c
    audited, done, error, flagged, duplicates = session.execute(
        sa.select(
            sa.func.count(),
            sa.func.count().filter(a.status == "done"),
            sa.func.count().filter(a.status == "error"),
            sa.func.count().filter(sa.and_(a.status == "done", a.suspected_false_negative)),
            sa.func.coalesce(sa.func.sum(a.duplicate_count), 0),
        ).select_from(Audit.__table__)
    ).one()
    inspections = session.execute(sa.select(sa.func.count()).select_from(Inspection)).scalar_one()
    reviewed = session.execute(
        sa.select(sa.func.count(sa.distinct(Review.inspection_id)))
    ).scalar_one()
    pending = session.execute(
        sa.select(sa.func.count()).select_from(review_queue_view)
    ).scalar_one()
    return {
        "inspections": int(inspections),
        "audited": int(audited),
        "done": int(done),
        "error": int(error),
        "flagged": int(flagged),
        "duplicates": int(duplicates),
        "reviewed": int(reviewed),
        "pending_review": int(pending),
    }


# --- for the metrics (GET /metrics) and the CLI -------------------------------------------------
def dead_letter_count(session: Session, since: datetime | None = None) -> int:
    """Dead letters recorded (``dead_letters`` rows), all or those received at or after ``since``.

    Messages the workers took off the queue and could not record under any inspection.
    """
    t = DeadLetter.__table__
    stmt = sa.select(sa.func.count()).select_from(t)
    if since is not None:
        stmt = stmt.where(t.c.received_at >= since)
    return int(session.execute(stmt).scalar_one())


def dead_letter_counts_by_stage(session: Session) -> dict[str, int]:
    """Dead letters per ``stage`` (``transport``, ``envelope``, ``message``, ``broker``,
    ``worker``); stages with none are absent."""
    t = DeadLetter.__table__.c
    rows = session.execute(sa.select(t.stage, sa.func.count()).group_by(t.stage)).all()
    return {str(stage): int(n) for stage, n in rows}


def queued_without_audit(session: Session, older_than: timedelta) -> int:
    """Inspections the producer recorded in the outbox and that still have no audit row at
    least ``older_than`` after their last send (by the database's clock): the ones
    ``inspection-audit reconcile`` would send again. Read-only."""
    from db.outbox import count_overdue

    return count_overdue(session, older_than)


def outbox_counts(session: Session) -> dict[str, int]:
    """Counts of the producer's outbox.

    Keys: ``queued`` (entries), ``pending`` (not yet seen audited by reconcile: waiting, in
    flight, or lost), ``never_sent`` (recorded, but the broker never accepted them), ``resent``
    (entries sent more than once, i.e. resent by reconcile) and ``resends`` (the extra sends
    in all).
    """
    t = OutboxEntry.__table__.c
    queued, pending, never_sent, resent, resends = session.execute(
        sa.select(
            sa.func.count(),
            sa.func.count().filter(t.audited_at.is_(None)),
            sa.func.count().filter(t.sends == 0),
            sa.func.count().filter(t.sends > 1),
            sa.func.coalesce(sa.func.sum(sa.case((t.sends > 1, t.sends - 1), else_=0)), 0),
        ).select_from(OutboxEntry.__table__)
    ).one()
    return {
        "queued": int(queued),
        "pending": int(pending),
        "never_sent": int(never_sent),
        "resent": int(resent),
        "resends": int(resends),
    }
