"""Dead letters: messages taken off the queue that no inspection can account for.

The worker records one here when a message is malformed and no usable ``inspection_id`` can be
recovered from it (with one, it becomes that inspection's ``error`` row instead): bytes that
are not a message, a message that is not the audit task's, a body of the wrong shape, a payload
without an id, or a message RabbitMQ dead-lettered. The table is created by migration ``0004``
(:class:`db.models.DeadLetter`); :func:`db.repository.dead_letter_count` counts them for the
metrics. Functions here never commit: the caller owns the transaction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.orm import Session

from db.models import DEAD_LETTER_STAGES, DeadLetter
from db.rows import storable_text

#: At most this many bytes of a dead letter's raw message are kept (``raw_size`` has the size).
RAW_LIMIT = 16_384
#: At most this many characters of its headers (as JSON text) and of its reason.
TEXT_LIMIT = 8_192


@dataclass(frozen=True)
class DeadLetterRow:
    """One dead letter as the worker hands it over (``raw`` is cut to :data:`RAW_LIMIT`)."""

    stage: str
    reason: str
    raw: bytes = b""
    queue: str | None = None
    task_id: str | None = None
    headers: Any = None
    worker_host: str | None = None
    raw_size: int | None = None


def headers_text(headers: Any) -> str | None:
    """``headers`` as JSON text that can be stored (unknown types as strings), or None."""
    if headers is None:
        return None
    try:
        text = json.dumps(headers, default=repr, ensure_ascii=True, sort_keys=True)
    except (TypeError, ValueError) as exc:  # e.g. keys that are not strings
        text = json.dumps({"unserialisable headers": repr(headers), "error": str(exc)})
    return _clip(text)


def _clip(text: str) -> str:
    text = storable_text(text)
    return text if len(text) <= TEXT_LIMIT else text[: TEXT_LIMIT - 1] + "…"


def record_dead_letter(session: Session, row: DeadLetterRow) -> int:
    """Insert one dead letter; return its id.

    Text is made storable (NUL characters and unpaired surrogates escaped) and cut to
    :data:`TEXT_LIMIT`; ``raw`` is cut to :data:`RAW_LIMIT` bytes.

    Raises:
        ValueError: a ``stage`` outside :data:`db.models.DEAD_LETTER_STAGES`.
    """
    if row.stage not in DEAD_LETTER_STAGES:
        raise ValueError(f"stage must be one of {DEAD_LETTER_STAGES}, got {row.stage!r}")
    raw = bytes(row.raw or b"")
    table = cast(sa.Table, DeadLetter.__table__)
    stmt = (
        sa.insert(table)
        .values(
            queue=_clip(row.queue)[:255] if row.queue else None,
            task_id=_clip(row.task_id)[:255] if row.task_id else None,
            stage=row.stage,
            reason=_clip(row.reason),
            headers=headers_text(row.headers),
            raw=raw[:RAW_LIMIT],
            raw_size=row.raw_size if row.raw_size is not None else len(raw),
            worker_host=row.worker_host,
        )
        .returning(table.c.id)
    )
    return int(session.execute(stmt).scalar_one())


def dead_letters(session: Session, limit: int | None = 100) -> list[dict[str, Any]]:
    """The newest dead letters first, as dicts of their columns (at most ``limit``)."""
    t = DeadLetter.__table__
    stmt = sa.select(t).order_by(t.c.received_at.desc(), t.c.id.desc())
    if limit is not None:
        stmt = stmt.limit(limit)
    return [dict(r) for r in session.execute(stmt).mappings()]
