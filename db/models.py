"""SQLAlchemy 2 typed models: :class:`Inspection`, :class:`Audit`, :class:`Review`,
:class:`DeliveryAttempt`, :class:`DeadLetter`, :class:`OutboxEntry`.

The schema itself is created by the Alembic migrations in ``db/migrations`` (never by
``create_all`` in production); a test checks that the migrated schema equals this metadata on
PostgreSQL and SQLite. Every timestamp is stored and returned as a timezone-aware UTC datetime
on both dialects (see :class:`UTCDateTime`).

The ``review_queue`` and ``audit_scores`` SQL views are created by the migrations;
:data:`review_queue_view` and :data:`audit_scores_view` are lightweight, typed descriptions of
them for queries (in their own ``MetaData``, so that ``Base.metadata`` describes tables only).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

#: Constraint and index names, identical on every dialect (Alembic needs stable names).
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(column_0_N_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

PREDICTIONS = ("ok", "defect")
AUDIT_STATUSES = ("done", "error")
VERDICTS = ("confirmed_defect", "cleared")

#: ``params`` column type: JSON everywhere, JSONB on PostgreSQL.
JSONType = sa.JSON().with_variant(JSONB(), "postgresql")
#: ``scores``/``details`` column type: as :data:`JSONType`, but Python ``None`` is SQL NULL
#: (not a JSON ``null``), so an error row has no scores at all.
JSONObject = sa.JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
#: Surrogate keys: BIGINT on PostgreSQL, INTEGER (the rowid alias) on SQLite.
BigIntPK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """``TIMESTAMP WITH TIME ZONE`` that always hands back aware UTC datetimes.

    PostgreSQL keeps the offset itself; SQLite has no timestamp type and SQLAlchemy stores a
    naive string there. This type converts every aware value to UTC before storing and marks
    every value read back as UTC, so both dialects behave the same. A naive value is taken to
    be UTC already.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base; its metadata carries :data:`NAMING_CONVENTION`."""

    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Inspection(Base):
    """One inspected part as the line saw it: one row per ``inspection_id``."""

    __tablename__ = "inspections"
    __table_args__ = (
        sa.CheckConstraint(_in("prediction", PREDICTIONS), name="prediction"),
        sa.CheckConstraint("score >= 0 AND score <= 1", name="score_range"),
    )

    inspection_id: Mapped[str] = mapped_column(sa.String(), primary_key=True)
    image_ref: Mapped[str] = mapped_column(sa.Text())
    line: Mapped[str | None] = mapped_column(sa.String())
    station: Mapped[str | None] = mapped_column(sa.String())
    captured_at: Mapped[datetime] = mapped_column(UTCDateTime())
    prediction: Mapped[str] = mapped_column(sa.String())
    score: Mapped[float] = mapped_column(sa.Float())
    expected_model_version: Mapped[str | None] = mapped_column(sa.String())
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=sa.func.now())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=sa.func.now())


class Audit(Base):
    """One audit result, keyed by (``inspection_id``, ``model_version``, ``method``).

    ``method`` is the *decision* method (a name of :data:`worker.engine.methods.REGISTRY`).
    ``status`` is ``done`` (scored) or ``error`` (``error`` says why; the scores are NULL).
    What is queried every time is a column (``status``, ``p_defect``, ``decision_score``,
    ``tau``, ``suspected_false_negative``, timings); every scoring method's value is in
    ``scores`` (method name → number or null; JSONB on PostgreSQL, JSON on SQLite, read by name
    through the ``audit_scores`` view), and the engine's other measurements (``iou_ok``,
    ``p_defect_adv``, ``flipped``, second-opinion details …) in ``details``. A new method
    therefore needs no schema migration. ``duplicate_count`` counts deliveries that found the
    row already there.
    """

    __tablename__ = "audits"
    __table_args__ = (
        sa.UniqueConstraint("inspection_id", "model_version", "method"),
        sa.CheckConstraint(_in("status", AUDIT_STATUSES), name="status"),
        sa.Index("ix_audits_suspected_false_negative_status", "suspected_false_negative", "status"),
        # migration 0005: the review queue (most suspicious first), recent and newest writes
        sa.Index(
            "ix_audits_review_queue",
            "decision_score",
            "id",
            "inspection_id",
            postgresql_where=sa.text("status = 'done' AND suspected_false_negative"),
            sqlite_where=sa.text("status = 'done' AND suspected_false_negative"),
        ),
        sa.Index("ix_audits_created_at", "created_at"),
        sa.Index("ix_audits_updated_at", "updated_at"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    inspection_id: Mapped[str] = mapped_column(
        sa.String(), sa.ForeignKey("inspections.inspection_id", ondelete="CASCADE")
    )
    model_version: Mapped[str] = mapped_column(sa.String())
    method: Mapped[str] = mapped_column(sa.String())
    status: Mapped[str] = mapped_column(sa.String())
    error: Mapped[str | None] = mapped_column(sa.Text())
    p_defect: Mapped[float | None] = mapped_column(sa.Float())
    scores: Mapped[dict[str, Any] | None] = mapped_column(JSONObject)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSONObject)
    decision_score: Mapped[float | None] = mapped_column(sa.Float())
    tau: Mapped[float | None] = mapped_column(sa.Float())
    suspected_false_negative: Mapped[bool] = mapped_column(
        sa.Boolean(), default=False, server_default=sa.false()
    )
    params: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    overlay_path: Mapped[str | None] = mapped_column(sa.Text())
    worker_host: Mapped[str | None] = mapped_column(sa.String())
    delivery_count: Mapped[int] = mapped_column(sa.Integer(), default=1, server_default="1")
    duplicate_count: Mapped[int] = mapped_column(sa.Integer(), default=0, server_default="0")
    decode_ms: Mapped[float | None] = mapped_column(sa.Float())
    score_ms: Mapped[float | None] = mapped_column(sa.Float())
    total_ms: Mapped[float | None] = mapped_column(sa.Float())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=sa.func.now())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=sa.func.now())


class Review(Base):
    """A reviewer's verdict on a flagged inspection.

    Rows are history: a later verdict for the same ``inspection_id`` supersedes earlier ones
    (the latest by ``created_at``, then ``id``), and none is ever deleted.
    """

    __tablename__ = "reviews"
    __table_args__ = (sa.CheckConstraint(_in("verdict", VERDICTS), name="verdict"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    inspection_id: Mapped[str] = mapped_column(
        sa.String(),
        sa.ForeignKey("inspections.inspection_id", ondelete="CASCADE"),
        index=True,
    )
    verdict: Mapped[str] = mapped_column(sa.String())
    reviewer: Mapped[str | None] = mapped_column(sa.String())
    note: Mapped[str | None] = mapped_column(sa.Text())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=sa.func.now())


class DeliveryAttempt(Base):
    """The attempts to score one inspection for one (model_version, method).

    The worker's redelivery cap (:mod:`db.deliveries`); created by migration 0002, with
    ``open_attempt`` and ``lost`` from 0004. ``attempts`` counts the attempts started (an
    attempt is the risky part: decoding and scoring); ``open_attempt`` is the number of the
    attempt started and not finished yet (NULL when none); ``lost`` counts the attempts a later
    attempt found never finished (their process died). No foreign key to ``inspections``: an
    attempt is started before the inspection row is written.
    """

    __tablename__ = "delivery_attempts"

    inspection_id: Mapped[str] = mapped_column(sa.String(), primary_key=True)
    model_version: Mapped[str] = mapped_column(sa.String(), primary_key=True)
    method: Mapped[str] = mapped_column(sa.String(), primary_key=True)
    attempts: Mapped[int] = mapped_column(sa.Integer(), server_default="0")
    first_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=sa.func.now())
    last_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=sa.func.now())
    last_worker: Mapped[str | None] = mapped_column(sa.String())
    open_attempt: Mapped[int | None] = mapped_column(sa.Integer())
    lost: Mapped[int] = mapped_column(sa.Integer(), server_default="0")


#: Where a dead letter was taken off the queue (``dead_letters.stage``).
DEAD_LETTER_STAGES = ("transport", "envelope", "message", "broker", "worker")


class DeadLetter(Base):
    """A message taken off the queue that could not be recorded under any inspection.

    Created by migration 0004. ``stage`` says where it was caught: ``transport`` (the broker's
    entry is not a message envelope at all), ``envelope`` (a message, but not a Celery task
    message for the audit task), ``message`` (a task message whose payload has no usable
    ``inspection_id``), ``broker`` (dead-lettered by RabbitMQ, e.g. its delivery limit) or
    ``worker`` (the worker refused it for another reason). ``raw`` holds the first bytes of
    what was received (``raw_size`` is the whole size), ``headers`` the message headers as JSON
    text when there were any.
    """

    __tablename__ = "dead_letters"
    __table_args__ = (sa.CheckConstraint(_in("stage", DEAD_LETTER_STAGES), name="stage"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    received_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), server_default=sa.func.now(), index=True
    )
    queue: Mapped[str | None] = mapped_column(sa.String())
    task_id: Mapped[str | None] = mapped_column(sa.String())
    stage: Mapped[str] = mapped_column(sa.String())
    reason: Mapped[str] = mapped_column(sa.Text())
    headers: Mapped[str | None] = mapped_column(sa.Text())
    raw: Mapped[bytes | None] = mapped_column(sa.LargeBinary())
    raw_size: Mapped[int] = mapped_column(sa.Integer(), server_default="0")
    worker_host: Mapped[str | None] = mapped_column(sa.String())


class OutboxEntry(Base):
    """An inspection the producer recorded as queued before sending it (transactional outbox).

    Created by migration 0004. ``message`` is the message as sent (wire form) and ``queue``
    where it went; ``sends`` counts the sends the broker accepted (the first, then each resend
    by ``inspection-audit reconcile``), ``sent_at`` the first and ``last_sent_at`` the latest.
    ``audited_at`` is set by reconcile once an audit row exists for the inspection: until then
    the entry is pending.
    """

    __tablename__ = "outbox"

    inspection_id: Mapped[str] = mapped_column(sa.String(), primary_key=True)
    queue: Mapped[str] = mapped_column(sa.String())
    message: Mapped[dict[str, Any]] = mapped_column(JSONType)
    queued_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=sa.func.now())
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    sends: Mapped[int] = mapped_column(sa.Integer(), server_default="0")
    audited_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True)


#: Columns that hold an audit's *result* (replaced when a late success beats an error).
AUDIT_KEY_COLUMNS = ("inspection_id", "model_version", "method")
AUDIT_RESULT_COLUMNS = (
    "status",
    "error",
    "p_defect",
    "scores",
    "details",
    "decision_score",
    "tau",
    "suspected_false_negative",
    "params",
    "overlay_path",
    "worker_host",
    "decode_ms",
    "score_ms",
    "total_ms",
)

# --- views (created by the migrations) -------------------------------------------------------
_view_metadata = sa.MetaData()

#: Typed description of the ``review_queue`` view, for ``select()``.
review_queue_view = sa.Table(
    "review_queue",
    _view_metadata,
    sa.Column("audit_id", sa.BigInteger()),
    sa.Column("inspection_id", sa.String()),
    sa.Column("image_ref", sa.Text()),
    sa.Column("line", sa.String()),
    sa.Column("station", sa.String()),
    sa.Column("captured_at", UTCDateTime()),
    sa.Column("prediction", sa.String()),
    sa.Column("score", sa.Float()),
    sa.Column("model_version", sa.String()),
    sa.Column("method", sa.String()),
    sa.Column("decision_score", sa.Float()),
    sa.Column("tau", sa.Float()),
    sa.Column("p_defect", sa.Float()),
    sa.Column("p_defect_adv", sa.Float()),
    sa.Column("iou_gap", sa.Float()),
    sa.Column("iou_gap_adv", sa.Float()),
    sa.Column("flipped", sa.Boolean()),
    sa.Column("overlay_path", sa.Text()),
    sa.Column("audited_at", UTCDateTime()),
)

#: Typed description of the ``audit_scores`` view (migration 0003): one row per audit and
#: scoring method, ``SELECT … FROM audit_scores WHERE method = 'iou_gap_adv'`` on both dialects.
#: ``decision_method`` is the audit's own ``method`` (the one that decided the flag).
audit_scores_view = sa.Table(
    "audit_scores",
    _view_metadata,
    sa.Column("audit_id", sa.BigInteger()),
    sa.Column("inspection_id", sa.String()),
    sa.Column("model_version", sa.String()),
    sa.Column("decision_method", sa.String()),
    sa.Column("status", sa.String()),
    sa.Column("method", sa.String()),
    sa.Column("value", sa.Float()),
    sa.Column("audited_at", UTCDateTime()),
)

__all__ = [
    "AUDIT_KEY_COLUMNS",
    "AUDIT_RESULT_COLUMNS",
    "AUDIT_STATUSES",
    "DEAD_LETTER_STAGES",
    "NAMING_CONVENTION",
    "PREDICTIONS",
    "VERDICTS",
    "Audit",
    "Base",
    "DeadLetter",
    "DeliveryAttempt",
    "Inspection",
    "OutboxEntry",
    "Review",
    "UTCDateTime",
    "audit_scores_view",
    "review_queue_view",
]
