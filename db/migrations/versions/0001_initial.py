"""Initial schema: inspections, audits, reviews and the review_queue view.

Revision ID: 0001
Revises:
Create Date: 2026-11-29

The schema is written out here (not derived from ``db.models``) so that this revision stays
what it was when later models change; ``tests/test_db_migrations.py`` checks that the two agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigIntPK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSONType = sa.JSON().with_variant(JSONB(), "postgresql")


def _created(name: str) -> sa.Column[datetime]:
    """A NOT NULL timestamp column defaulting to the server's clock."""
    return sa.Column(name, sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)


REVIEW_QUEUE_SQL = """
CREATE VIEW review_queue AS
SELECT
    a.id AS audit_id,
    i.inspection_id AS inspection_id,
    i.image_ref AS image_ref,
    i.line AS line,
    i.station AS station,
    i.captured_at AS captured_at,
    i.prediction AS prediction,
    i.score AS score,
    a.model_version AS model_version,
    a.method AS method,
    a.decision_score AS decision_score,
    a.tau AS tau,
    a.p_defect AS p_defect,
    a.p_defect_adv AS p_defect_adv,
    a.iou_gap AS iou_gap,
    a.iou_gap_adv AS iou_gap_adv,
    a.flipped AS flipped,
    a.overlay_path AS overlay_path,
    a.created_at AS audited_at
FROM audits AS a
JOIN inspections AS i ON i.inspection_id = a.inspection_id
WHERE a.status = 'done'
  AND a.suspected_false_negative
  AND NOT EXISTS (SELECT 1 FROM reviews AS r WHERE r.inspection_id = a.inspection_id)
ORDER BY a.decision_score DESC NULLS LAST, i.captured_at, a.inspection_id, a.model_version, a.method
"""


def upgrade() -> None:
    """Create the three tables, their constraints and indexes, and the review_queue view."""
    op.create_table(
        "inspections",
        sa.Column("inspection_id", sa.String(), nullable=False),
        sa.Column("image_ref", sa.Text(), nullable=False),
        sa.Column("line", sa.String(), nullable=True),
        sa.Column("station", sa.String(), nullable=True),
        sa.Column("captured_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("prediction", sa.String(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("expected_model_version", sa.String(), nullable=True),
        _created("received_at"),
        _created("created_at"),
        sa.CheckConstraint(
            "prediction IN ('ok', 'defect')", name=op.f("ck_inspections_prediction")
        ),
        sa.CheckConstraint("score >= 0 AND score <= 1", name=op.f("ck_inspections_score_range")),
        sa.PrimaryKeyConstraint("inspection_id", name=op.f("pk_inspections")),
    )
    op.create_table(
        "audits",
        sa.Column("id", BigIntPK, autoincrement=True, nullable=False),
        sa.Column("inspection_id", sa.String(), nullable=False),
        sa.Column("model_version", sa.String(), nullable=False),
        sa.Column("method", sa.String(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("p_defect", sa.Float(), nullable=True),
        sa.Column("energy", sa.Float(), nullable=True),
        sa.Column("iou_defect", sa.Float(), nullable=True),
        sa.Column("iou_ok", sa.Float(), nullable=True),
        sa.Column("iou_gap", sa.Float(), nullable=True),
        sa.Column("p_defect_adv", sa.Float(), nullable=True),
        sa.Column("iou_defect_adv", sa.Float(), nullable=True),
        sa.Column("iou_ok_adv", sa.Float(), nullable=True),
        sa.Column("iou_gap_adv", sa.Float(), nullable=True),
        sa.Column("flipped", sa.Boolean(), nullable=True),
        sa.Column("fusion_score", sa.Float(), nullable=True),
        sa.Column("decision_score", sa.Float(), nullable=True),
        sa.Column("tau", sa.Float(), nullable=True),
        sa.Column(
            "suspected_false_negative", sa.Boolean(), server_default=sa.false(), nullable=False
        ),
        sa.Column("params", JSONType, nullable=True),
        sa.Column("overlay_path", sa.Text(), nullable=True),
        sa.Column("worker_host", sa.String(), nullable=True),
        sa.Column("delivery_count", sa.Integer(), server_default="1", nullable=False),
        sa.Column("duplicate_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("decode_ms", sa.Float(), nullable=True),
        sa.Column("score_ms", sa.Float(), nullable=True),
        sa.Column("total_ms", sa.Float(), nullable=True),
        _created("created_at"),
        _created("updated_at"),
        sa.CheckConstraint("status IN ('done', 'error')", name=op.f("ck_audits_status")),
        sa.ForeignKeyConstraint(
            ["inspection_id"],
            ["inspections.inspection_id"],
            name=op.f("fk_audits_inspection_id_inspections"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audits")),
        sa.UniqueConstraint(
            "inspection_id",
            "model_version",
            "method",
            name=op.f("uq_audits_inspection_id_model_version_method"),
        ),
    )
    op.create_index(
        "ix_audits_suspected_false_negative_status",
        "audits",
        ["suspected_false_negative", "status"],
        unique=False,
    )
    op.create_table(
        "reviews",
        sa.Column("id", BigIntPK, autoincrement=True, nullable=False),
        sa.Column("inspection_id", sa.String(), nullable=False),
        sa.Column("verdict", sa.String(), nullable=False),
        sa.Column("reviewer", sa.String(), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        _created("created_at"),
        sa.CheckConstraint(
            "verdict IN ('confirmed_defect', 'cleared')", name=op.f("ck_reviews_verdict")
        ),
        sa.ForeignKeyConstraint(
            ["inspection_id"],
            ["inspections.inspection_id"],
            name=op.f("fk_reviews_inspection_id_inspections"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reviews")),
    )
    op.create_index(op.f("ix_reviews_inspection_id"), "reviews", ["inspection_id"], unique=False)
    op.execute(REVIEW_QUEUE_SQL)


def downgrade() -> None:
    """Drop the view, then the tables (children first)."""
    op.execute("DROP VIEW IF EXISTS review_queue")
    op.drop_index(op.f("ix_reviews_inspection_id"), table_name="reviews")
    op.drop_table("reviews")
    op.drop_index("ix_audits_suspected_false_negative_status", table_name="audits")
    op.drop_table("audits")
    op.drop_table("inspections")
