"""Row builders: what the batch pipeline hands to the repository (typed :mod:`db.rows`).

* :func:`inspection_of` / :func:`placeholder_inspection`: the ``inspections`` row of a valid
  message, or of an invalid one (what is valid, placeholders for the rest);
* :func:`error_row`, :func:`cheap_row`, :func:`scored_row`, :func:`duplicate_row`: the
  ``audits`` row of an image that failed, that the line called ``defect`` (P(defect) only),
  that was scored in full, or whose row already exists (only the delivery is counted).

No torch and no Celery here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from db.rows import AuditRow, InspectionRow, storable_text, text_problem

if TYPE_CHECKING:
    from producer.schema import InspectionMessage

Key = tuple[str, str, str]


def finite(v: Any) -> Any:
    """``v``, or ``None`` for a non-finite float (NaN/±inf cannot be stored as JSON numbers)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def inspection_of(msg: InspectionMessage) -> InspectionRow:
    """The ``inspections`` row of a valid message."""
    return InspectionRow(
        inspection_id=msg.inspection_id,
        image_ref=msg.image_path if msg.image_path is not None else "<inline>",
        line=msg.line,
        station=msg.station,
        captured_at=msg.captured_at,
        prediction=msg.prediction,
        score=msg.score,
        expected_model_version=msg.model_version,
    )


def placeholder_inspection(payload: Any, inspection_id: str) -> InspectionRow:
    """The ``inspections`` row of an invalid message: its valid fields, placeholders for the rest
    (prediction ``ok``, score 0, capture time now, ``<inline>`` image)."""
    p = payload if isinstance(payload, Mapping) else {}
    pred = p.get("prediction") if p.get("prediction") in ("ok", "defect") else "ok"
    score = p.get("score")
    ok_score = (
        isinstance(score, (int, float))
        and not isinstance(score, bool)
        and math.isfinite(score)
        and 0 <= score <= 1
    )
    captured = datetime.now(UTC)
    if isinstance(p.get("captured_at"), str):
        try:
            parsed = datetime.fromisoformat(p["captured_at"])
            if parsed.tzinfo is not None:
                captured = parsed
        except ValueError:
            pass
    path = p.get("image_path")
    ref = path if isinstance(path, str) else "<inline>"
    if text_problem(ref) is not None:
        ref = "<not storable>"

    def short(v: Any) -> str | None:
        ok = isinstance(v, str) and v.strip() and text_problem(v) is None
        return v[:64] if ok else None

    return InspectionRow(
        inspection_id=inspection_id,
        image_ref=str(ref)[:4096],
        line=short(p.get("line")),
        station=short(p.get("station")),
        captured_at=captured,
        prediction=str(pred),
        score=float(score) if ok_score and score is not None else 0.0,
        expected_model_version=short(p.get("model_version")),
    )


def error_row(
    key: Key,
    message: str,
    *,
    host: str,
    delivery_count: int,
    params: Mapping[str, Any],
    decode_ms: float | None = None,
) -> AuditRow:
    """An ``error`` row saying why the image could not be scored (text made storable)."""
    return AuditRow(
        *key,
        status="error",
        error=storable_text(message),
        worker_host=host,
        delivery_count=delivery_count,
        decode_ms=decode_ms,
        params=dict(params),
    )


def cheap_row(
    key: Key,
    p_defect: float,
    *,
    host: str,
    delivery_count: int,
    params: Mapping[str, Any],
    decode_ms: float | None,
    score_ms: float,
) -> AuditRow:
    """The row of an image the line called ``defect``: P(defect) only, never flagged."""
    return AuditRow(
        *key,
        status="done",
        p_defect=finite(float(p_defect)),
        suspected_false_negative=False,
        worker_host=host,
        delivery_count=delivery_count,
        params={**params, "cheap": True},
        decode_ms=decode_ms,
        score_ms=score_ms,
    )


def scored_row(
    key: Key,
    measurements: Mapping[str, Any],
    scores: Mapping[str, float | None],
    *,
    decision_score: float | None,
    tau: float | None,
    flagged: bool,
    host: str,
    delivery_count: int,
    params: Mapping[str, Any],
    decode_ms: float | None,
    score_ms: float,
) -> AuditRow:
    """The row of a fully scored image.

    ``scores`` holds every registered method's value; ``details`` gets the measurements that
    are neither ``p_defect`` (a column) nor a method's own name (already in ``scores``).
    """
    details = {k: finite(v) for k, v in measurements.items() if k != "p_defect" and k not in scores}
    return AuditRow(
        *key,
        status="done",
        p_defect=finite(measurements.get("p_defect")),
        scores={k: finite(v) for k, v in scores.items()},
        details=details,
        decision_score=finite(decision_score),
        tau=tau,
        suspected_false_negative=bool(flagged),
        worker_host=host,
        delivery_count=delivery_count,
        params=dict(params),
        decode_ms=decode_ms,
        score_ms=score_ms,
    )


def duplicate_row(key: Key, delivery_count: int) -> AuditRow:
    """A delivery whose ``done`` row already exists: the upsert only counts the duplicate."""
    return AuditRow(*key, status="done", delivery_count=delivery_count)
