"""Score storage that takes a new scoring method without a migration.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

Every scoring method's value moves from its own column into ``audits.scores`` (method name →
number or null; JSONB on PostgreSQL, JSON on SQLite), and the engine's other measurements
(``iou_ok``, ``iou_ok_adv``, ``p_defect_adv``, ``flipped``) into ``audits.details``. The columns
queried every time stay columns: ``status``, ``p_defect``, ``decision_score``, ``tau``,
``suspected_false_negative``, the decision ``method``, timings. A new view ``audit_scores``
(``audit_id, inspection_id, model_version, decision_method, status, method, value,
audited_at``) exposes the scores by name on both databases; ``review_queue`` keeps its columns
(``iou_gap``, ``iou_gap_adv``, ``p_defect_adv``, ``flipped`` now read from the JSON).

Existing rows are moved in SQL, without loss, in both directions. This file imports no
application code: the SQL is written out per dialect.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")

#: scores key -> old column (the ``msp`` method is the ``p_defect`` column itself)
SCORE_COLUMNS = {
    "msp": "p_defect",
    "energy": "energy",
    "iou_gap": "iou_gap",
    "iou_gap_adv": "iou_gap_adv",
    "iou_defect": "iou_defect",
    "iou_defect_adv": "iou_defect_adv",
    "fusion": "fusion_score",
}
DETAIL_FLOAT_COLUMNS = ("iou_ok", "iou_ok_adv", "p_defect_adv")
DROPPED_FLOAT_COLUMNS = (
    "energy",
    "iou_defect",
    "iou_ok",
    "iou_gap",
    "p_defect_adv",
    "iou_defect_adv",
    "iou_ok_adv",
    "iou_gap_adv",
    "fusion_score",
)

_QUEUE_HEAD = """
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
"""
_QUEUE_TAIL = """
    a.overlay_path AS overlay_path,
    a.created_at AS audited_at
FROM audits AS a
JOIN inspections AS i ON i.inspection_id = a.inspection_id
WHERE a.status = 'done'
  AND a.suspected_false_negative
  AND NOT EXISTS (SELECT 1 FROM reviews AS r WHERE r.inspection_id = a.inspection_id)
ORDER BY a.decision_score DESC NULLS LAST, i.captured_at, a.inspection_id, a.model_version, a.method
"""

QUEUE_FROM_JSON = {
    "postgresql": _QUEUE_HEAD
    + """    (a.details ->> 'p_defect_adv')::float8 AS p_defect_adv,
    (a.scores ->> 'iou_gap')::float8 AS iou_gap,
    (a.scores ->> 'iou_gap_adv')::float8 AS iou_gap_adv,
    (a.details ->> 'flipped')::boolean AS flipped,"""
    + _QUEUE_TAIL,
    "sqlite": _QUEUE_HEAD
    + """    json_extract(a.details, '$.p_defect_adv') AS p_defect_adv,
    json_extract(a.scores, '$.iou_gap') AS iou_gap,
    json_extract(a.scores, '$.iou_gap_adv') AS iou_gap_adv,
    json_extract(a.details, '$.flipped') AS flipped,"""
    + _QUEUE_TAIL,
}

QUEUE_FROM_COLUMNS = (
    _QUEUE_HEAD
    + """    a.p_defect_adv AS p_defect_adv,
    a.iou_gap AS iou_gap,
    a.iou_gap_adv AS iou_gap_adv,
    a.flipped AS flipped,"""
    + _QUEUE_TAIL
)

AUDIT_SCORES = {
    "postgresql": """
CREATE VIEW audit_scores AS
SELECT
    a.id AS audit_id,
    a.inspection_id AS inspection_id,
    a.model_version AS model_version,
    a.method AS decision_method,
    a.status AS status,
    s.key AS method,
    (s.value #>> '{}')::float8 AS value,
    a.created_at AS audited_at
FROM audits AS a
CROSS JOIN LATERAL jsonb_each(
    CASE WHEN jsonb_typeof(a.scores) = 'object' THEN a.scores END
) AS s
""",
    "sqlite": """
CREATE VIEW audit_scores AS
SELECT
    a.id AS audit_id,
    a.inspection_id AS inspection_id,
    a.model_version AS model_version,
    a.method AS decision_method,
    a.status AS status,
    s.key AS method,
    s.value AS value,
    a.created_at AS audited_at
FROM audits AS a, json_each(CASE WHEN json_type(a.scores) = 'object' THEN a.scores END) AS s
""",
}


def _dialect() -> str:
    name = op.get_bind().dialect.name
    if name not in ("postgresql", "sqlite"):
        raise RuntimeError(f"inspection-audit migrations support PostgreSQL and SQLite, not {name}")
    return name


def upgrade() -> None:
    """Add ``scores``/``details``, move the values, drop the per-score columns, new views."""
    dialect = _dialect()
    op.execute("DROP VIEW IF EXISTS review_queue")
    with op.batch_alter_table("audits") as batch:
        batch.add_column(sa.Column("scores", JSONType, nullable=True))
        batch.add_column(sa.Column("details", JSONType, nullable=True))
    if dialect == "postgresql":
        scores = ", ".join(f"'{k}', {c}" for k, c in SCORE_COLUMNS.items())
        details = ", ".join(f"'{c}', {c}" for c in DETAIL_FLOAT_COLUMNS)
        op.execute(
            f"UPDATE audits SET scores = jsonb_build_object({scores}), "
            f"details = jsonb_build_object({details}, 'flipped', flipped) "
            "WHERE status = 'done'"
        )
    else:
        scores = ", ".join(f"'{k}', {c}" for k, c in SCORE_COLUMNS.items())
        details = ", ".join(f"'{c}', {c}" for c in DETAIL_FLOAT_COLUMNS)
        flipped = (
            "CASE WHEN flipped IS NULL THEN NULL WHEN flipped THEN json('true') "
            "ELSE json('false') END"
        )
        op.execute(
            f"UPDATE audits SET scores = json_object({scores}), "
            f"details = json_object({details}, 'flipped', {flipped}) "
            "WHERE status = 'done'"
        )
    with op.batch_alter_table("audits") as batch:
        for column in (*DROPPED_FLOAT_COLUMNS, "flipped"):
            batch.drop_column(column)
    op.execute(QUEUE_FROM_JSON[dialect])
    op.execute(AUDIT_SCORES[dialect])


def downgrade() -> None:
    """Put the values back into their columns (methods added later are dropped), old view."""
    dialect = _dialect()
    op.execute("DROP VIEW IF EXISTS audit_scores")
    op.execute("DROP VIEW IF EXISTS review_queue")
    with op.batch_alter_table("audits") as batch:
        for column in DROPPED_FLOAT_COLUMNS:
            batch.add_column(sa.Column(column, sa.Float(), nullable=True))
        batch.add_column(sa.Column("flipped", sa.Boolean(), nullable=True))
    if dialect == "postgresql":
        sets = [f"{c} = (scores ->> '{k}')::float8" for k, c in SCORE_COLUMNS.items() if k != "msp"]
        sets += [f"{c} = (details ->> '{c}')::float8" for c in DETAIL_FLOAT_COLUMNS]
        sets.append("flipped = (details ->> 'flipped')::boolean")
    else:
        sets = [
            f"{c} = json_extract(scores, '$.{k}')" for k, c in SCORE_COLUMNS.items() if k != "msp"
        ]
        sets += [f"{c} = json_extract(details, '$.{c}')" for c in DETAIL_FLOAT_COLUMNS]
        sets.append("flipped = json_extract(details, '$.flipped')")
    op.execute(f"UPDATE audits SET {', '.join(sets)}")
    with op.batch_alter_table("audits") as batch:
        batch.drop_column("details")
        batch.drop_column("scores")
    op.execute(QUEUE_FROM_COLUMNS)
