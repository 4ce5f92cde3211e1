"""Dead letters, the producer's outbox, and open/lost attempts for the redelivery cap.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03

* ``dead_letters``: messages taken off the queue that could not be recorded under any
  inspection (not a message at all, not the audit task's, no usable ``inspection_id``, or
  dead-lettered by RabbitMQ): when, where from, why, and the first bytes of what was received.
* ``outbox``: each inspection a producer recorded as queued before sending it (the message
  as sent, sends, when an audit row was seen), for ``inspection-audit reconcile``.
* ``delivery_attempts.open_attempt`` / ``.lost``: the cap counts only attempts that never
  finished. Existing rows keep the decision the old counter would have made next: ``lost`` is
  ``attempts - 1`` and, where no audit row exists yet, the latest attempt is left open.

This file imports no application code: the schema is written out here.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigIntPK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSONType = sa.JSON().with_variant(JSONB(), "postgresql")

_OLD_ATTEMPTS = """
UPDATE delivery_attempts
SET lost = CASE WHEN attempts > 1 THEN attempts - 1 ELSE 0 END,
    open_attempt = CASE
        WHEN attempts > 0 AND NOT EXISTS (
            SELECT 1 FROM audits AS a
            WHERE a.inspection_id = delivery_attempts.inspection_id
              AND a.model_version = delivery_attempts.model_version
              AND a.method = delivery_attempts.method
        ) THEN attempts
    END
"""


def upgrade() -> None:
    """Create ``dead_letters`` and ``outbox``; add ``open_attempt`` and ``lost``."""
    op.create_table(
        "dead_letters",
        sa.Column("id", BigIntPK, autoincrement=True, nullable=False),
        sa.Column(
            "received_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("queue", sa.String(), nullable=True),
        sa.Column("task_id", sa.String(), nullable=True),
        sa.Column("stage", sa.String(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("headers", sa.Text(), nullable=True),
        sa.Column("raw", sa.LargeBinary(), nullable=True),
        sa.Column("raw_size", sa.Integer(), server_default="0", nullable=False),
        sa.Column("worker_host", sa.String(), nullable=True),
        sa.CheckConstraint(
            "stage IN ('transport', 'envelope', 'message', 'broker', 'worker')",
            name=op.f("ck_dead_letters_stage"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letters")),
    )
    op.create_index("ix_dead_letters_received_at", "dead_letters", ["received_at"], unique=False)
    op.create_table(
        "outbox",
        sa.Column("inspection_id", sa.String(), nullable=False),
        sa.Column("queue", sa.String(), nullable=False),
        sa.Column("message", JSONType, nullable=False),
        sa.Column(
            "queued_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sends", sa.Integer(), server_default="0", nullable=False),
        sa.Column("audited_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("inspection_id", name=op.f("pk_outbox")),
    )
    op.create_index("ix_outbox_audited_at", "outbox", ["audited_at"], unique=False)
    with op.batch_alter_table("delivery_attempts") as batch:
        batch.add_column(sa.Column("open_attempt", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("lost", sa.Integer(), server_default="0", nullable=False))
    op.execute(_OLD_ATTEMPTS)


def downgrade() -> None:
    """Drop ``outbox``, ``dead_letters``, ``open_attempt`` and ``lost`` (their rows are lost)."""
    with op.batch_alter_table("delivery_attempts") as batch:
        batch.drop_column("lost")
        batch.drop_column("open_attempt")
    op.drop_index("ix_outbox_audited_at", table_name="outbox")
    op.drop_table("outbox")
    op.drop_index("ix_dead_letters_received_at", table_name="dead_letters")
    op.drop_table("dead_letters")
