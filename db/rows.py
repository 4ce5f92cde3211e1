"""Typed rows from the worker's batch pipeline to the repository (no ORM, no session).

:class:`InspectionRow` is the line's record of one inspection; :class:`AuditRow` one audit
result. :func:`db.repository.upsert_inspection` and :func:`db.repository.upsert_audit` take them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

AuditStatus = Literal["done", "error"]

#: Characters no text column can hold: NUL (PostgreSQL refuses it) and unpaired surrogates
#: (not encodable as UTF-8; JSON can carry them as ``"\ud800"``).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored in a text column, or None when it can.

    E.g. ``"contains a NUL character at position 3"``, ``"contains an unpaired surrogate
    U+D800 at position 0"``.
    """
    found = _UNSTORABLE.search(text)
    if found is None:
        return None
    ch, at = found.group(), found.start()
    if ch == "\x00":
        return f"contains a NUL character at position {at}"
    return f"contains an unpaired surrogate U+{ord(ch):04X} at position {at}"


def storable_text(text: str) -> str:
    """``text`` with NUL characters and unpaired surrogates written as ``\\uXXXX`` escapes."""
    return _UNSTORABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


@dataclass
class InspectionRow:
    """One inspected part as the line saw it (table ``inspections``).

    ``captured_at`` is timezone-aware (a naive value is taken as UTC); ``score`` is the line's
    P(defect) in [0, 1]; ``image_ref`` the message's path or ``"<inline>"``.
    """

    inspection_id: str
    image_ref: str
    line: str | None
    station: str | None
    captured_at: datetime
    prediction: str
    score: float
    expected_model_version: str | None = None
    received_at: datetime | None = None


@dataclass
class AuditRow:
    """One audit result (table ``audits``), keyed by (inspection_id, model_version, method).

    Attributes:
        method: the decision method (a registry name).
        status: ``done`` or ``error`` (``error`` says why).
        p_defect: the production model's P(defect) on the audited image, in [0, 1].
        scores: every scoring method's value, method name → float or None (higher = more
            suspicious).
        details: the engine's other measurements (``iou_ok``, ``p_defect_adv``, ``flipped`` …).
        decision_score, tau: the decision method's score and threshold (None: not calibrated).
        suspected_false_negative: ``decision_score >= tau`` on an ``ok`` call.
        params: the engine options, decision method and calibration the row was judged with.
        delivery_count: deliveries of this message counted so far (≥ 1).
        decode_ms, score_ms, total_ms: timings in milliseconds.
    """

    inspection_id: str
    model_version: str
    method: str
    status: AuditStatus
    error: str | None = None
    p_defect: float | None = None
    scores: dict[str, float | None] | None = None
    details: dict[str, Any] | None = None
    decision_score: float | None = None
    tau: float | None = None
    suspected_false_negative: bool = False
    params: dict[str, Any] | None = None
    overlay_path: str | None = None
    worker_host: str | None = None
    delivery_count: int = 1
    decode_ms: float | None = None
    score_ms: float | None = None
    total_ms: float | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        """``(inspection_id, model_version, method)``."""
        return (self.inspection_id, self.model_version, self.method)
