"""The producer's side of the outbox: record before sending, and reconcile what was lost.

With ``Settings.outbox`` on (or ``enqueue_many(..., outbox=True)``; the HTTP ingest always), a
batch of messages is recorded in the database (:func:`record_queued`, one transaction,
committed) *before* the first is sent; each one the broker accepted is then marked sent
(:func:`mark_sent`). A broker that loses its queue cannot lose an inspection unseen any more:
:func:`reconcile` (``inspection-audit reconcile``) lists the entries still without an audit row
a while after their last send and sends them again. A resend of a message that was only slow is
harmless: the worker keeps one row and counts the duplicate.

Database faults are retried for at most ``Settings.enqueue_timeout_s`` seconds (the producer's
budget for a broker that is down), with :func:`worker.retry.is_transient_db_error` deciding
what is transient. No torch here.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from inspection_audit.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

    from db.outbox import Overdue
    from producer.schema import InspectionMessage

log = logging.getLogger("inspection_audit.producer")

T = TypeVar("T")


class OutboxError(RuntimeError):
    """The outbox could not be written (the database stayed unreachable); nothing was sent."""


def _with_retries(fn: Callable[[], T], what: str, settings: Settings) -> T:
    """Run one transaction, retrying transient database faults for ~``enqueue_timeout_s``.

    Raises:
        OutboxError: still failing when the time is up (or a non-transient fault).
    """
    from worker.retry import is_transient_db_error, one_line

    deadline = time.monotonic() + float(settings.enqueue_timeout_s)
    wait = 0.1
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_transient_db_error(exc) or time.monotonic() + wait > deadline:
                raise OutboxError(
                    f"{what}: database {_safe_url(settings)} failed: "
                    f"{type(exc).__name__}: {one_line(exc)}"
                ) from exc
            time.sleep(wait)
            wait = min(2.0, wait * 2)


def _safe_url(settings: Settings) -> str:
    from sqlalchemy.engine import make_url

    return make_url(settings.resolved_database_url).render_as_string(hide_password=True)


def record_queued(messages: Sequence[InspectionMessage], settings: Settings) -> None:
    """Record ``messages`` as queued on ``settings.queue``, in one committed transaction.

    Raises:
        OutboxError: the database stayed unreachable (nothing is recorded, send nothing).
    """
    from db.outbox import record_queued as insert
    from db.session import session_scope

    entries = [(m.inspection_id, m.to_json_dict()) for m in messages]

    def tx() -> None:
        with session_scope(settings.resolved_database_url) as session:
            insert(session, entries, settings.queue)

    _with_retries(tx, f"recording {len(entries)} message(s) in the outbox", settings)


def mark_sent(inspection_ids: Sequence[str], settings: Settings) -> None:
    """Count one accepted send of each id. A failure is logged, not raised: the messages were
    sent, and at worst reconcile sends one again (harmless)."""
    from db.outbox import mark_sent as update
    from db.session import session_scope

    if not inspection_ids:
        return

    def tx() -> None:
        with session_scope(settings.resolved_database_url) as session:
            update(session, inspection_ids)

    try:
        _with_retries(tx, f"marking {len(inspection_ids)} message(s) sent", settings)
    except OutboxError as exc:
        log.warning("%s (the messages were sent)", exc)


@dataclass
class Reconciled:
    """What :func:`reconcile` found and did.

    Attributes:
        audited: pending entries found audited (and marked so) on this run.
        overdue: the entries without an audit row past the age, oldest first.
        resent: ids sent again (empty on a dry run).
        unsendable: ids whose stored message is no longer valid, with the reason.
    """

    audited: int = 0
    overdue: list[Overdue] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)
    unsendable: dict[str, str] = field(default_factory=dict)


def reconcile(
    settings: Settings,
    older_than: timedelta | None = None,
    *,
    limit: int | None = None,
    dry_run: bool = False,
    app: Celery | None = None,
) -> Reconciled:
    """Find outbox entries still without an audit row and send them again.

    Marks the pending entries that have an audit row by now, lists the others whose last send
    is at least ``older_than`` old (default ``settings.reconcile_after_s``), at most ``limit``,
    and, unless ``dry_run``, sends each to the queue it went to first and counts the send.

    Raises:
        OutboxError: the database stayed unreachable.
        producer.api.EnqueueError: the broker failed (the sends before it are counted).
    """
    from db.outbox import mark_audited, overdue
    from db.session import session_scope
    from producer.api import EnqueueError, send_messages
    from producer.schema import InspectionMessage, MessageError

    age = older_than if older_than is not None else timedelta(seconds=settings.reconcile_after_s)

    def tx() -> tuple[int, list[Overdue]]:
        with session_scope(settings.resolved_database_url) as session:
            audited = mark_audited(session)
        with session_scope(settings.resolved_database_url) as session:
            return audited, overdue(session, age, limit)

    audited, rows = _with_retries(tx, "reading the outbox", settings)
    out = Reconciled(audited=audited, overdue=rows)
    if dry_run or not rows:
        return out
    by_queue: dict[str, list[InspectionMessage]] = defaultdict(list)
    for row in rows:
        try:
            by_queue[row.queue].append(InspectionMessage.model_validate(row.message))
        except Exception as exc:  # a message stored by an older schema
            err = exc if isinstance(exc, MessageError) else MessageError([("", str(exc))])
            out.unsendable[row.inspection_id] = str(err)
            log.error("outbox entry %s cannot be resent: %s", row.inspection_id, err)
    for queue, messages in by_queue.items():
        s = settings.model_copy(update={"queue": queue})
        try:
            sent = send_messages(messages, settings=s, app=app)
        except EnqueueError as exc:
            out.resent += exc.sent_ids
            mark_sent(exc.sent_ids, settings)
            raise
        out.resent += sent
        mark_sent(sent, settings)
    if out.resent:
        log.warning(
            "reconcile: sent %d inspection(s) again (no audit row %s after their last send)",
            len(out.resent),
            age,
        )
    return out


def describe(row: Overdue) -> dict[str, Any]:
    """An overdue entry as a JSON-friendly dict (for the CLI)."""
    return {
        "inspection_id": row.inspection_id,
        "queue": row.queue,
        "queued_at": row.queued_at.isoformat(),
        "last_sent_at": row.last_sent_at.isoformat() if row.last_sent_at else None,
        "sends": row.sends,
    }
