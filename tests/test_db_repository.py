"""Repository: idempotent upserts, the review queue, verdicts and the summary (both dialects)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa

from db.models import Audit, Inspection, Review
from db.repository import (
    audit_summary,
    get_audit,
    latest_verdict,
    record_verdict,
    review_queue,
    upsert_audit,
    upsert_inspection,
)
from db.rows import AuditRow, InspectionRow
from db.session import session_scope

T0 = datetime(2026, 11, 29, 8, 0, tzinfo=UTC)
MV = "mt-r18@1"


def add_inspection(url: str, inspection_id: str, minutes: int = 0, **kw: Any) -> None:
    values: dict[str, Any] = {
        "inspection_id": inspection_id,
        "image_ref": f"/images/{inspection_id}.png",
        "line": "L1",
        "station": "S2",
        "captured_at": T0 + timedelta(minutes=minutes),
        "prediction": "ok",
        "score": 0.1,
    }
    values.update(kw)
    with session_scope(url) as s:
        upsert_inspection(s, InspectionRow(**values))


def done_row(inspection_id: str, decision_score: float, flagged: bool, **kw: Any) -> AuditRow:
    row: dict[str, Any] = {
        "inspection_id": inspection_id,
        "model_version": MV,
        "method": "iou_gap_adv",
        "status": "done",
        "p_defect": 0.2,
        "scores": {
            "msp": 0.2,
            "energy": -1.5,
            "iou_defect": 0.6,
            "iou_gap": 0.5,
            "iou_defect_adv": 0.7,
            "iou_gap_adv": decision_score,
        },
        "details": {"iou_ok": 0.1, "p_defect_adv": 0.4, "iou_ok_adv": 0.05, "flipped": False},
        "decision_score": decision_score,
        "tau": 0.3,
        "suspected_false_negative": flagged,
        "params": {"attack": "fgsm", "epsilon": 2 / 255},
        "overlay_path": f"/results/{inspection_id}.png",
        "worker_host": "w1",
        "decode_ms": 1.0,
        "score_ms": 20.0,
        "total_ms": 21.5,
    }
    row.update(kw)
    return AuditRow(**row)


def error_row(inspection_id: str, **kw: Any) -> AuditRow:
    row: dict[str, Any] = {
        "inspection_id": inspection_id,
        "model_version": MV,
        "method": "iou_gap_adv",
        "status": "error",
        "error": "ImageError: cannot decode",
        "worker_host": "w1",
    }
    row.update(kw)
    return AuditRow(**row)


def upsert(url: str, row: AuditRow) -> bool:
    with session_scope(url) as s:
        return upsert_audit(s, row)


def audit(url: str, inspection_id: str, method: str = "iou_gap_adv") -> dict[str, Any]:
    with session_scope(url) as s:
        found = get_audit(s, inspection_id, MV, method)
    assert found is not None
    return found


def n_audits(url: str) -> int:
    with session_scope(url) as s:
        return int(s.execute(sa.select(sa.func.count()).select_from(Audit)).scalar_one())


# --- inspections -----------------------------------------------------------------------------


def test_upsert_inspection_is_idempotent_and_keeps_first(migrated_url: str) -> None:
    add_inspection(migrated_url, "A")
    add_inspection(migrated_url, "A", line="other", score=0.9)
    with session_scope(migrated_url) as s:
        rows = s.execute(sa.select(Inspection)).scalars().all()
        assert len(rows) == 1
        assert rows[0].line == "L1" and rows[0].score == pytest.approx(0.1)


def test_timestamps_are_aware_utc(migrated_url: str) -> None:
    cet = timezone(timedelta(hours=1))
    add_inspection(migrated_url, "A", captured_at=datetime(2026, 11, 29, 9, 30, tzinfo=cet))
    upsert(migrated_url, done_row("A", 0.9, True))
    with session_scope(migrated_url) as s:
        ins = s.get(Inspection, "A")
        assert ins is not None
        assert ins.captured_at == datetime(2026, 11, 29, 8, 30, tzinfo=UTC)
        assert ins.captured_at.utcoffset() == timedelta(0)
        assert ins.received_at.tzinfo is not None and ins.created_at.tzinfo is not None
    row = audit(migrated_url, "A")
    assert row["created_at"].tzinfo is not None and row["updated_at"].tzinfo is not None
    assert abs(row["created_at"] - datetime.now(UTC)) < timedelta(minutes=5)


@pytest.mark.parametrize(
    ("kw", "message"), [({"prediction": "maybe"}, "prediction"), ({"score": 1.5}, "score")]
)
def test_upsert_inspection_rejects_bad_values(
    migrated_url: str, kw: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        add_inspection(migrated_url, "A", **kw)


def test_check_constraints_enforced_by_database(migrated_url: str) -> None:
    with pytest.raises(sa.exc.IntegrityError), session_scope(migrated_url) as s:
        s.add(
            Inspection(
                inspection_id="X",
                image_ref="x",
                line=None,
                station=None,
                captured_at=T0,
                prediction="maybe",
                score=0.5,
            )
        )
    add_inspection(migrated_url, "A")
    with pytest.raises(sa.exc.IntegrityError), session_scope(migrated_url) as s:
        s.add(Review(inspection_id="A", verdict="meh"))


# --- audits ----------------------------------------------------------------------------------


def test_upsert_audit_same_key_twice(migrated_url: str) -> None:
    add_inspection(migrated_url, "A")
    assert upsert(migrated_url, done_row("A", 0.9, True)) is True
    first = audit(migrated_url, "A")
    assert upsert(migrated_url, done_row("A", 0.1, False, worker_host="w2")) is False
    assert n_audits(migrated_url) == 1
    row = audit(migrated_url, "A")
    assert row["duplicate_count"] == 1
    assert row["delivery_count"] == 1
    # a first success is never overwritten
    assert row["decision_score"] == pytest.approx(0.9)
    assert row["suspected_false_negative"] is True
    assert row["worker_host"] == "w1"
    assert row["params"] == {"attack": "fgsm", "epsilon": 2 / 255}
    assert row["updated_at"] >= first["updated_at"]
    assert row["created_at"] == first["created_at"]


def test_other_method_or_model_version_is_another_row(migrated_url: str) -> None:
    add_inspection(migrated_url, "A")
    assert upsert(migrated_url, done_row("A", 0.9, True))
    assert upsert(migrated_url, done_row("A", 0.2, False, method="msp"))
    assert upsert(migrated_url, done_row("A", 0.9, True, model_version="mt-r18@2"))
    assert n_audits(migrated_url) == 3


def test_error_then_done_replaces(migrated_url: str) -> None:
    add_inspection(migrated_url, "A")
    assert upsert(migrated_url, error_row("A", delivery_count=1)) is True
    err = audit(migrated_url, "A")
    assert err["status"] == "error" and err["p_defect"] is None
    assert err["suspected_false_negative"] is False
    assert (
        upsert(migrated_url, done_row("A", 0.8, True, delivery_count=2, worker_host="w2")) is False
    )
    row = audit(migrated_url, "A")
    assert row["status"] == "done"
    assert row["error"] is None
    assert row["decision_score"] == pytest.approx(0.8)
    assert row["p_defect"] == pytest.approx(0.2)
    assert row["suspected_false_negative"] is True
    assert row["worker_host"] == "w2"
    assert row["params"] == {"attack": "fgsm", "epsilon": 2 / 255}
    assert row["delivery_count"] == 2
    assert row["duplicate_count"] == 1


def test_done_then_error_keeps_done(migrated_url: str) -> None:
    add_inspection(migrated_url, "A")
    assert upsert(migrated_url, done_row("A", 0.8, True)) is True
    assert upsert(migrated_url, error_row("A", delivery_count=4)) is False
    row = audit(migrated_url, "A")
    assert row["status"] == "done"
    assert row["error"] is None
    assert row["decision_score"] == pytest.approx(0.8)
    assert row["duplicate_count"] == 1
    assert row["delivery_count"] == 4  # the highest delivery count seen


def test_error_then_error_keeps_first(migrated_url: str) -> None:
    add_inspection(migrated_url, "A")
    upsert(migrated_url, error_row("A", error="first"))
    assert upsert(migrated_url, error_row("A", error="second")) is False
    row = audit(migrated_url, "A")
    assert row["error"] == "first" and row["duplicate_count"] == 1


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (AuditRow("A", MV, "", "done"), "lacks"),
        (AuditRow("A", MV, "m", "late"), "status"),  # type: ignore[arg-type]
        (AuditRow("A", MV, "m", "done", delivery_count=0), "delivery_count"),
    ],
)
def test_upsert_audit_rejects_bad_rows(migrated_url: str, row: AuditRow, message: str) -> None:
    add_inspection(migrated_url, "A")
    with pytest.raises(ValueError, match=message):
        upsert(migrated_url, row)


def test_scores_are_queryable_by_method_name(migrated_url: str) -> None:
    """``audit_scores`` exposes every method's value by name on both dialects."""
    from db.models import audit_scores_view

    add_inspection(migrated_url, "A")
    add_inspection(migrated_url, "B")
    upsert(migrated_url, done_row("A", 0.9, True))
    upsert(migrated_url, error_row("B"))
    v = audit_scores_view.c
    with session_scope(migrated_url) as s:
        got = s.execute(
            sa.select(v.inspection_id, v.value, v.decision_method).where(v.method == "iou_gap_adv")
        ).all()
        names = set(s.execute(sa.select(v.method).where(v.inspection_id == "A")).scalars())
    assert [(r[0], r[2]) for r in got] == [("A", "iou_gap_adv")]
    assert got[0][1] == pytest.approx(0.9)
    assert names == {"msp", "energy", "iou_defect", "iou_gap", "iou_defect_adv", "iou_gap_adv"}


def test_upsert_audit_requires_the_inspection(migrated_url: str) -> None:
    with pytest.raises(sa.exc.IntegrityError):
        upsert(migrated_url, done_row("nope", 0.9, True))


# --- review queue and verdicts -------------------------------------------------------------


def _populate(url: str) -> None:
    """Hand-made rows: which are in the queue is known exactly."""
    for i, name in enumerate(["A", "B", "C", "D", "E", "F", "G"]):
        add_inspection(url, name, minutes=i)
    upsert(url, done_row("A", 0.40, True))  # queued
    upsert(url, done_row("B", 0.90, True))  # queued, most suspicious
    upsert(url, done_row("C", 0.95, False))  # not flagged
    upsert(url, error_row("D"))  # error
    upsert(url, done_row("E", 0.60, True))  # queued
    upsert(url, done_row("F", 0.99, True))  # flagged, but reviewed below
    upsert(url, done_row("G", 0.60, True))  # queued, ties with E: later captured_at
    with session_scope(url) as s:
        record_verdict(s, "F", "cleared", reviewer="ann")


def test_review_queue_exact_rows_and_order(migrated_url: str) -> None:
    _populate(migrated_url)
    with session_scope(migrated_url) as s:
        rows = review_queue(s)
    assert [r["inspection_id"] for r in rows] == ["B", "E", "G", "A"]
    first = rows[0]
    expected_keys = {
        "inspection_id",
        "line",
        "station",
        "captured_at",
        "prediction",
        "score",
        "model_version",
        "method",
        "decision_score",
        "tau",
        "p_defect",
        "iou_gap",
        "iou_gap_adv",
        "overlay_path",
        "audited_at",
    }
    assert expected_keys <= set(first)
    assert first["decision_score"] == pytest.approx(0.9)
    assert first["line"] == "L1" and first["station"] == "S2"
    assert first["captured_at"] == T0 + timedelta(minutes=1)
    assert first["audited_at"].tzinfo is not None
    assert first["overlay_path"] == "/results/B.png"
    with session_scope(migrated_url) as s:
        assert [r["inspection_id"] for r in review_queue(s, limit=2)] == ["B", "E"]


def test_view_without_order_by_holds_the_same_rows(migrated_url: str) -> None:
    _populate(migrated_url)
    with session_scope(migrated_url) as s:
        ids = s.execute(sa.text("SELECT inspection_id FROM review_queue")).scalars().all()
    assert sorted(ids) == ["A", "B", "E", "G"]


def test_verdict_removes_from_queue_and_keeps_history(migrated_url: str) -> None:
    _populate(migrated_url)
    with session_scope(migrated_url) as s:
        first = record_verdict(s, "B", "confirmed_defect", reviewer="bob", note="scratch")
    with session_scope(migrated_url) as s:
        assert [r["inspection_id"] for r in review_queue(s)] == ["E", "G", "A"]
        second = record_verdict(s, "B", "cleared", reviewer="carl")
    assert second > first
    with session_scope(migrated_url) as s:
        latest = latest_verdict(s, "B")
        assert latest is not None
        assert latest["verdict"] == "cleared" and latest["reviewer"] == "carl"
        n = s.execute(
            sa.select(sa.func.count()).select_from(Review).where(Review.inspection_id == "B")
        ).scalar_one()
        assert n == 2
        assert latest_verdict(s, "A") is None


def test_record_verdict_errors(migrated_url: str) -> None:
    add_inspection(migrated_url, "A")
    with pytest.raises(LookupError, match="nope"), session_scope(migrated_url) as s:
        record_verdict(s, "nope", "cleared")
    with pytest.raises(ValueError, match="verdict"), session_scope(migrated_url) as s:
        record_verdict(s, "A", "confirmed")


def test_audit_summary(migrated_url: str) -> None:
    with session_scope(migrated_url) as s:
        empty = audit_summary(s)
    assert empty["audited"] == 0 and empty["duplicates"] == 0
    _populate(migrated_url)
    upsert(migrated_url, done_row("A", 0.40, True))  # a duplicate delivery
    with session_scope(migrated_url) as s:
        summary = audit_summary(s)
    assert summary == {
        "inspections": 7,
        "audited": 7,
        "done": 6,
        "error": 1,
        "flagged": 5,
        "duplicates": 1,
        "reviewed": 1,
        "pending_review": 4,
    }
