"""Indexes for the review station and ``/metrics`` with 100,000+ rows.

Revision ID: 0005
Revises: 0003
Create Date: 2026-12-02

* ``ix_audits_review_queue``: partial index on ``audits (decision_score, id, inspection_id)``
  where ``status = 'done' AND suspected_false_negative`` (the ``review_queue`` predicate). A
  queue page walks it backwards, most suspicious first, and stops after its ``LIMIT``; the
  queue's count reads only it (with ``inspection_id`` for the verdict anti-join).
* ``ix_audits_created_at``: rows written in the last minute, and the capture-to-score
  histogram's recent rows.
* ``ix_audits_updated_at``: the newest write (``health``, ``/metrics``).

(Numbered 0005: 0004 is taken by the reliability work's dead-letter table and outbox; when both
land, this revision's ``down_revision`` becomes ``0004``.) No application imports.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

QUEUE_PREDICATE = "status = 'done' AND suspected_false_negative"


def upgrade() -> None:
    """Create the three indexes."""
    op.create_index(
        "ix_audits_review_queue",
        "audits",
        ["decision_score", "id", "inspection_id"],
        postgresql_where=sa.text(QUEUE_PREDICATE),
        sqlite_where=sa.text(QUEUE_PREDICATE),
    )
    op.create_index("ix_audits_created_at", "audits", ["created_at"])
    op.create_index("ix_audits_updated_at", "audits", ["updated_at"])


def downgrade() -> None:
    """Drop them."""
    op.drop_index("ix_audits_updated_at", table_name="audits")
    op.drop_index("ix_audits_created_at", table_name="audits")
    op.drop_index("ix_audits_review_queue", table_name="audits")
