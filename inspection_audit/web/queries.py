"""The review station's reads: the queue (filtered, keyset-paged), one inspection with its
history, the overview, and the counts behind ``/metrics``.

The queue is the ``review_queue`` view's predicate (status ``done``, flagged, no verdict yet)
written on the base tables, so the planner can use ``ix_audits_suspected_false_negative_status``
and a ``LIMIT``: a page costs one bounded scan however long the queue is. It is ordered most
suspicious first, ``decision_score`` descending, then ``audit_id`` descending, and paged by
keyset (a cursor ``(score, audit_id)``), never by offset.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from db.models import Audit, DeliveryAttempt, Inspection, Review

A = Audit.__table__.c
I = Inspection.__table__.c  # noqa: E741 - the usual alias of the inspections table
R = Review.__table__.c


#: Largest row id (a 64-bit integer column); anything larger cannot name a row.
MAX_ID = 2**63 - 1


def stored_id(inspection_id: str) -> bool:
    """Whether ``inspection_id`` could be stored at all (the producer's pattern, at most 128
    characters): anything else names no inspection (and must not reach the database)."""
    import re

    from producer.schema import INSPECTION_ID_PATTERN

    return len(inspection_id) <= 128 and re.match(INSPECTION_ID_PATTERN, inspection_id) is not None


class BadFilter(ValueError):
    """A queue filter that cannot be read (e.g. a malformed time); the message says which."""


def parse_time(value: str | None, name: str) -> datetime | None:
    """An ISO date or date-time (naive = UTC) from a form field, or None when empty.

    Raises:
        BadFilter: not an ISO date or date-time.
    """
    if value is None or not value.strip():
        return None
    try:
        t = datetime.fromisoformat(value.strip())
    except ValueError:
        raise BadFilter(f"{name}: not a date or time (YYYY-MM-DD or YYYY-MM-DDTHH:MM)") from None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


@dataclass(frozen=True)
class QueueFilter:
    """What the reviewer narrowed the queue to (every field optional)."""

    line: str | None = None
    station: str | None = None
    model_version: str | None = None
    method: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> QueueFilter:
        """From query or form parameters (empty values ignored).

        Raises:
            BadFilter: a malformed ``since``/``until``.
        """

        def text(key: str) -> str | None:
            from db.rows import text_problem

            v = params.get(key)
            if v and text_problem(v) is not None:
                raise BadFilter(f"{key}: {text_problem(v)}")
            return v.strip()[:128] if v and v.strip() else None

        return cls(
            line=text("line"),
            station=text("station"),
            model_version=text("model_version"),
            method=text("method"),
            since=parse_time(params.get("since"), "since"),
            until=parse_time(params.get("until"), "until"),
        )

    def params(self) -> dict[str, str]:
        """The non-empty fields as query parameters."""
        out: dict[str, str] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, datetime):
                out[f.name] = v.strftime("%Y-%m-%dT%H:%M")
            elif v:
                out[f.name] = str(v)
        return out

    def conditions(self) -> list[Any]:
        out: list[Any] = []
        if self.line:
            out.append(I.line == self.line)
        if self.station:
            out.append(I.station == self.station)
        if self.model_version:
            out.append(A.model_version == self.model_version)
        if self.method:
            out.append(A.method == self.method)
        if self.since:
            out.append(I.captured_at >= self.since)
        if self.until:
            out.append(I.captured_at < self.until)
        return out


@dataclass(frozen=True)
class Cursor:
    """A position in the queue: ``(decision_score, audit_id)`` of a row."""

    score: float
    audit_id: int

    def encode(self) -> str:
        return f"{self.score!r}_{self.audit_id}"

    @classmethod
    def decode(cls, text: str | None) -> Cursor | None:
        """A cursor from its text, or None when empty or malformed."""
        if not text:
            return None
        score, _, aid = text.rpartition("_")
        try:
            c = cls(float(score), int(aid))
        except ValueError:
            return None
        if not 0 <= c.audit_id <= MAX_ID:
            return None
        return c if c.score == c.score and abs(c.score) != float("inf") else None


#: Queue order: most suspicious first. A flagged row always has a decision score (it was
#: flagged because score >= τ), so the order is the partial index ``ix_audits_review_queue``
#: (migration 0005) walked backwards.
ORDER_DESC = (A.decision_score.desc(), A.id.desc())
ORDER_ASC = (A.decision_score.asc(), A.id.asc())

QUEUE_COLUMNS = (
    A.id.label("audit_id"),
    I.inspection_id,
    I.image_ref,
    I.line,
    I.station,
    I.captured_at,
    I.prediction,
    I.score,
    A.model_version,
    A.method,
    A.decision_score,
    A.tau,
    A.p_defect,
    A.overlay_path,
    A.created_at.label("audited_at"),
)


def _queue_from() -> Any:
    return Audit.__table__.join(Inspection.__table__, I.inspection_id == A.inspection_id)


def queue_conditions(f: QueueFilter) -> list[Any]:
    """The ``review_queue`` view's predicate plus the filter's."""
    no_verdict = ~sa.exists().where(R.inspection_id == A.inspection_id)
    # `suspected_false_negative` alone (not `IS true`): the partial index's own predicate
    return [A.status == "done", A.suspected_false_negative, no_verdict, *f.conditions()]


def _after(c: Cursor) -> Any:
    return sa.tuple_(A.decision_score, A.id) < sa.tuple_(c.score, c.audit_id)


def _before(c: Cursor) -> Any:
    return sa.tuple_(A.decision_score, A.id) > sa.tuple_(c.score, c.audit_id)


@dataclass
class QueuePage:
    """One page of the queue: rows, the total under the filter, cursors of the neighbours."""

    rows: list[dict[str, Any]]
    total: int
    next: Cursor | None = None
    prev: Cursor | None = None
    first: bool = True


def cursor_of(row: Mapping[str, Any]) -> Cursor:
    """The cursor of a queue row."""
    score = row["decision_score"]
    return Cursor(-1e300 if score is None else float(score), int(row["audit_id"]))


def queue_page(
    session: Session,
    f: QueueFilter,
    *,
    after: Cursor | None = None,
    before: Cursor | None = None,
    limit: int = 50,
    count: bool = True,
) -> QueuePage:
    """The queue page after ``after`` (or before ``before``; else the first page).

    Raises:
        ValueError: a limit below 1.
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    where = queue_conditions(f)
    stmt = sa.select(*QUEUE_COLUMNS).select_from(_queue_from())
    if before is not None:
        stmt = stmt.where(*where, _before(before)).order_by(*ORDER_ASC)
    else:
        if after is not None:
            where = [*where, _after(after)]
        stmt = stmt.where(*where).order_by(*ORDER_DESC)
    got = [dict(r) for r in session.execute(stmt.limit(limit + 1)).mappings()]
    more = len(got) > limit
    rows = got[:limit]
    if before is not None:
        rows.reverse()
    total = queue_count(session, f) if count else len(rows)
    page = QueuePage(rows, total)
    if rows:
        has_next = more if before is None else True
        has_prev = (before is not None and more) or (before is None and after is not None)
        page.next = cursor_of(rows[-1]) if has_next else None
        page.prev = cursor_of(rows[0]) if has_prev else None
        page.first = not has_prev
    return page


def queue_count(session: Session, f: QueueFilter) -> int:
    """How many rows the queue holds under ``f`` (without a line, station or time filter, from
    the partial index alone)."""
    joined = f.line or f.station or f.since or f.until
    source = _queue_from() if joined else Audit.__table__
    stmt = sa.select(sa.func.count()).select_from(source).where(*queue_conditions(f))
    return int(session.execute(stmt).scalar_one())


def neighbours(session: Session, f: QueueFilter, at: Cursor) -> tuple[Any, Any]:
    """``(previous, next)`` queue rows around position ``at`` (either may be None). ``at``
    need not be in the queue any more (after a verdict, "next" is the item that followed it)."""
    base = sa.select(*QUEUE_COLUMNS).select_from(_queue_from()).where(*queue_conditions(f))
    nxt = session.execute(base.where(_after(at)).order_by(*ORDER_DESC).limit(1)).mappings().first()
    prv = session.execute(base.where(_before(at)).order_by(*ORDER_ASC).limit(1)).mappings().first()
    return (dict(prv) if prv else None, dict(nxt) if nxt else None)


def filter_choices(session: Session) -> dict[str, list[str]]:
    """Distinct lines, stations, model versions and methods (for the filter's drop-downs)."""

    def distinct(col: Any) -> list[str]:
        rows = session.execute(sa.select(col).where(col.is_not(None)).distinct().order_by(col))
        return [str(v) for (v,) in rows]

    return {
        "line": distinct(I.line),
        "station": distinct(I.station),
        "model_version": distinct(A.model_version),
        "method": distinct(A.method),
    }


# --- one inspection ---------------------------------------------------------------------------
@dataclass
class InspectionView:
    """An inspection, every audit of it, its verdicts (newest first) and deliveries."""

    inspection: dict[str, Any]
    audits: list[dict[str, Any]] = field(default_factory=list)
    reviews: list[dict[str, Any]] = field(default_factory=list)
    deliveries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def verdict(self) -> dict[str, Any] | None:
        return self.reviews[0] if self.reviews else None


def inspection_view(session: Session, inspection_id: str) -> InspectionView | None:
    """Everything the inspection page shows, or None for an unknown id."""
    found = (
        session.execute(sa.select(Inspection.__table__).where(I.inspection_id == inspection_id))
        .mappings()
        .first()
    )
    if found is None:
        return None
    audits = session.execute(
        sa.select(Audit.__table__).where(A.inspection_id == inspection_id).order_by(A.id)
    ).mappings()
    reviews = session.execute(
        sa.select(Review.__table__)
        .where(R.inspection_id == inspection_id)
        .order_by(R.created_at.desc(), R.id.desc())
    ).mappings()
    d = DeliveryAttempt.__table__.c
    deliveries = session.execute(
        sa.select(DeliveryAttempt.__table__).where(d.inspection_id == inspection_id)
    ).mappings()
    return InspectionView(
        dict(found),
        [dict(r) for r in audits],
        [dict(r) for r in reviews],
        [dict(r) for r in deliveries],
    )


def audit_by_id(session: Session, audit_id: int) -> dict[str, Any] | None:
    """One audit row by its id (the media routes), or None."""
    row = session.execute(sa.select(Audit.__table__).where(A.id == audit_id)).mappings().first()
    return dict(row) if row else None


# --- the overview ---------------------------------------------------------------------------
def _latest_reviews() -> Any:
    """Each reviewed inspection's newest verdict (a subquery: inspection_id, verdict)."""
    ranked = sa.select(
        R.inspection_id,
        R.verdict,
        sa.func.row_number()
        .over(partition_by=R.inspection_id, order_by=(R.created_at.desc(), R.id.desc()))
        .label("n"),
    ).subquery()
    return sa.select(ranked.c.inspection_id, ranked.c.verdict).where(ranked.c.n == 1).subquery()


def day_of(session: Session, column: Any) -> Any:
    """The UTC calendar day of a timestamp column, as text ``YYYY-MM-DD``, on either dialect."""
    if session.get_bind().dialect.name == "postgresql":
        return sa.func.to_char(sa.func.timezone("UTC", column), "YYYY-MM-DD")
    return sa.func.strftime("%Y-%m-%d", column)


def overview(session: Session, *, days: int = 30, errors: int = 50) -> dict[str, Any]:
    """Counts per line, per model version and per day (the last ``days`` days by audit time),
    totals, the share of reviewed flags confirmed as misses, recent error rows and the most
    frequent error reasons."""
    latest = _latest_reviews()
    flagged = sa.and_(A.status == "done", A.suspected_false_negative.is_(True))
    confirmed = sa.and_(flagged, latest.c.verdict == "confirmed_defect")
    cleared = sa.and_(flagged, latest.c.verdict == "cleared")
    measures = (
        sa.func.count().label("audited"),
        sa.func.count().filter(flagged).label("flagged"),
        sa.func.count().filter(A.status == "error").label("errors"),
        sa.func.count().filter(confirmed).label("confirmed"),
        sa.func.count().filter(cleared).label("cleared"),
    )
    base = _queue_from().outerjoin(latest, latest.c.inspection_id == A.inspection_id)
    line = sa.func.coalesce(I.line, "(none)")
    day = day_of(session, A.created_at)
    # one pass over the table, grouped by (line, version, day); the rest is summed here
    cells = [
        dict(r)
        for r in session.execute(
            sa.select(
                line.label("line"), A.model_version.label("version"), day.label("day"), *measures
            )
            .select_from(base)
            .group_by(line, A.model_version, day)
        ).mappings()
    ]
    since = (datetime.now(UTC) - timedelta(days=days)).strftime("%Y-%m-%d")

    def grouped(key: str, keep: Any = None) -> list[dict[str, Any]]:
        sums: dict[str, dict[str, Any]] = {}
        for c in cells:
            if keep is not None and not keep(c):
                continue
            row = sums.setdefault(str(c[key]), {"key": str(c[key])})
            for m in ("audited", "flagged", "errors", "confirmed", "cleared"):
                row[m] = row.get(m, 0) + int(c[m] or 0)
        return [_with_share(sums[k]) for k in sorted(sums)]

    totals = {
        m: sum(int(c[m] or 0) for c in cells)
        for m in ("audited", "flagged", "errors", "confirmed", "cleared")
    }
    reasons = session.execute(
        sa.select(A.error, sa.func.count().label("n"))
        .where(A.status == "error")
        .group_by(A.error)
        .order_by(sa.func.count().desc())
        .limit(20)
    ).mappings()
    recent = session.execute(
        sa.select(A.id.label("audit_id"), A.inspection_id, I.line, I.station, A.error, A.created_at)
        .select_from(_queue_from())
        .where(A.status == "error")
        .order_by(A.created_at.desc(), A.id.desc())
        .limit(errors)
    ).mappings()
    return {
        "totals": _with_share(totals),
        "per_line": grouped("line"),
        "per_version": grouped("version"),
        "per_day": grouped("day", lambda c: str(c["day"]) >= since),
        "reasons": [dict(r) for r in reasons],
        "errors": [dict(r) for r in recent],
        "days": days,
    }


def _with_share(row: dict[str, Any]) -> dict[str, Any]:
    for k in ("audited", "flagged", "errors", "confirmed", "cleared"):
        row[k] = int(row.get(k) or 0)
    reviewed = row["confirmed"] + row["cleared"]
    row["reviewed"] = reviewed
    row["confirmed_share"] = row["confirmed"] / reviewed if reviewed else None
    row["confirmed_of_flagged"] = row["confirmed"] / row["flagged"] if row["flagged"] else None
    return row


def verdict_rows(session: Session, verdicts: list[str]) -> list[dict[str, Any]]:
    """Inspections whose newest verdict is one of ``verdicts``, with their newest audit's
    maps (export)."""
    latest = _latest_reviews()
    newest_audit = (
        sa.select(A.inspection_id, sa.func.max(A.id).label("audit_id"))
        .group_by(A.inspection_id)
        .subquery()
    )
    stmt = (
        sa.select(
            I.inspection_id,
            I.image_ref,
            I.line,
            I.station,
            I.captured_at,
            latest.c.verdict,
            A.details,
            A.overlay_path,
        )
        .select_from(
            Inspection.__table__.join(latest, latest.c.inspection_id == I.inspection_id)
            .outerjoin(newest_audit, newest_audit.c.inspection_id == I.inspection_id)
            .outerjoin(Audit.__table__, A.id == newest_audit.c.audit_id)
        )
        .where(latest.c.verdict.in_(verdicts))
        .order_by(I.inspection_id)
    )
    return [dict(r) for r in session.execute(stmt).mappings()]


def since_day(days: int) -> date:
    """The first day of the overview's window."""
    return (datetime.now(UTC) - timedelta(days=days)).date()
