"""Delivery counter for the worker's redelivery cap.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29

One row per (inspection_id, model_version, method), incremented by a worker each time it
receives the inspection, before scoring (see :mod:`db.deliveries`). No foreign key to
``inspections``: a delivery is counted before the inspection row is written.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``delivery_attempts``."""
    op.create_table(
        "delivery_attempts",
        sa.Column("inspection_id", sa.String(), nullable=False),
        sa.Column("model_version", sa.String(), nullable=False),
        sa.Column("method", sa.String(), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "first_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "last_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("last_worker", sa.String(), nullable=True),
        sa.PrimaryKeyConstraint(
            "inspection_id", "model_version", "method", name=op.f("pk_delivery_attempts")
        ),
    )


def downgrade() -> None:
    """Drop ``delivery_attempts``."""
    op.drop_table("delivery_attempts")
