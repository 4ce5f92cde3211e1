"""``/metrics`` parses as Prometheus text and its counts equal the rows in the database and the
messages in the broker; ``/healthz`` says whether the database and the broker answer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from db.models import Audit, Inspection, Review
from db.repository import record_verdict
from db.session import dispose_engines, session_scope
from inspection_audit.settings import Settings
from producer.api import enqueue_many
from tests.support.queue import redis_queue_length
from tests.support.web import bearer, fill, png_bytes, web_settings


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _messages(root: Path, n: int, captured: datetime) -> list[dict[str, object]]:
    (root / "q.png").write_bytes(png_bytes())
    return [
        {
            "inspection_id": f"Q-{i}",
            "image_path": "q.png",
            "prediction": "ok",
            "score": 0.1,
            "line": "l",
            "station": "s",
            "captured_at": (captured + timedelta(seconds=i)).isoformat(),
        }
        for i in range(n)
    ]


def test_metrics_equal_the_rows(
    migrated_url: str, queue_settings: Settings, tmp_path: Path
) -> None:
    from inspection_audit.web import create_app

    s = web_settings(queue_settings, tmp_path, migrated_url)
    fill(s, flagged=5, unflagged=4, errors=3, maps=False)
    with session_scope(migrated_url) as session:
        record_verdict(session, "INS-flagged-0000", "confirmed_defect", reviewer="a")
        record_verdict(session, "INS-flagged-0001", "cleared", reviewer="a")
        record_verdict(session, "INS-flagged-0001", "confirmed_defect", reviewer="b")  # newest wins
        record_verdict(session, "INS-flagged-0002", "cleared", reviewer="a")
    captured = datetime.now(UTC) - timedelta(hours=2)
    enqueue_many(_messages(s.image_roots[0], 4, captured), settings=s)
    with TestClient(create_app(s)) as client:
        r = client.get("/metrics", headers=bearer())
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = _samples(r.text)
    with session_scope(migrated_url) as session:
        a = Audit.__table__.c

        def count(*where: object) -> int:
            return int(
                session.execute(
                    sa.select(sa.func.count()).select_from(Audit).where(*where)
                ).scalar_one()
            )

        done, error = count(a.status == "done"), count(a.status == "error")
        flagged = count(a.status == "done", a.suspected_false_negative)
        reviews = session.execute(sa.select(Review.inspection_id, Review.verdict, Review.id)).all()
        pending = session.execute(sa.text("SELECT count(*) FROM review_queue")).scalar_one()
        lags = session.execute(
            sa.select(Audit.created_at, Inspection.captured_at).join(
                Inspection, Inspection.inspection_id == Audit.inspection_id
            )
        ).all()
    newest = {}
    for iid, verdict, _rid in sorted(reviews, key=lambda t: t[2]):
        newest[iid] = verdict
    assert (done, error, flagged) == (9, 3, 5)
    assert m[("inspection_audit_audits", (("status", "done"),))] == done
    assert m[("inspection_audit_audits", (("status", "error"),))] == error
    assert m[("inspection_audit_flagged", ())] == flagged
    for verdict in ("confirmed_defect", "cleared"):
        want = sum(1 for v in newest.values() if v == verdict)
        assert m[("inspection_audit_verdicts", (("verdict", verdict),))] == want
    assert m[("inspection_audit_verdicts", (("verdict", "confirmed_defect"),))] == 2
    assert m[("inspection_audit_review_queue", ())] == pending == 2
    assert (
        m[("inspection_audit_queue_messages", (("queue", s.queue),))] == redis_queue_length(s) == 4
    )
    age = m[("inspection_audit_oldest_waiting_age_seconds", ())]
    assert 2 * 3600 - 5 <= age <= 2 * 3600 + 120
    # every row was created seconds ago, captured on 2026-11-29 or 2 h ago
    assert m[("inspection_audit_rows_written_last_minute", ())] == done + error
    # every row, done or error: the time until the audit's row was written
    assert m[("inspection_audit_capture_to_score_seconds_count", ())] == len(lags) == done + error
    want_sum = sum((c - cap).total_seconds() for c, cap in lags)
    assert m[("inspection_audit_capture_to_score_seconds_sum", ())] == pytest.approx(
        want_sum, rel=1e-3, abs=5
    )
    assert m[("inspection_audit_capture_to_score_seconds_bucket", (("le", "60"),))] == 0
    assert (
        m[("inspection_audit_capture_to_score_seconds_bucket", (("le", "+Inf"),))] == done + error
    )
    assert m[("inspection_audit_up", (("component", "database"),))] == 1
    assert m[("inspection_audit_up", (("component", "broker"),))] == 1
    assert m[("inspection_audit_last_write_age_seconds", ())] < 120
    dispose_engines(migrated_url)


def test_filesystem_broker_depth_and_oldest(tmp_path: Path, migrated_sqlite_url: str) -> None:
    from inspection_audit.web.broker import oldest_waiting, queue_depth

    s = Settings(home=tmp_path / "home", image_roots=[tmp_path], database_url=migrated_sqlite_url)
    assert queue_depth(s) == 0 and oldest_waiting(s) is None
    captured = datetime(2026, 11, 29, 8, 0, tzinfo=UTC)
    enqueue_many(_messages(tmp_path, 3, captured), settings=s)
    assert queue_depth(s) == 3
    assert oldest_waiting(s) == captured


def test_healthz(migrated_url: str, queue_settings: Settings, tmp_path: Path) -> None:
    from inspection_audit.web import create_app

    s = web_settings(queue_settings, tmp_path, migrated_url)
    with TestClient(create_app(s)) as client:
        r = client.get("/healthz")
        assert r.status_code == 200 and r.json() == {"database": "ok", "broker": "ok"}
    bad = s.model_copy(update={"broker_url": "redis://127.0.0.1:1/0", "enqueue_timeout_s": 1.0})
    with TestClient(create_app(bad)) as client:
        r = client.get("/healthz")
        assert r.status_code == 503
        assert r.json()["database"] == "ok" and "does not answer" in r.json()["broker"]
        # /metrics still answers, and says the broker is down
        m = _samples(client.get("/metrics", headers=bearer()).text)
        assert m[("inspection_audit_up", (("component", "broker"),))] == 0
    nodb = s.model_copy(update={"database_url": "postgresql+psycopg://postgres@127.0.0.1:1/x"})
    with TestClient(create_app(nodb)) as client:
        r = client.get("/healthz")
        assert r.status_code == 503 and r.json()["broker"] == "ok"
    dispose_engines(migrated_url)


def test_ingest_uses_the_outbox_and_metrics_count_dead_letters(
    migrated_url: str, queue_settings: Settings, tmp_path: Path
) -> None:
    """HTTP ingest records every inspection in the outbox before sending it: the same id again
    is a duplicate before any worker ran, GET says it is queued, and ``/metrics`` counts the
    outbox and the dead letters exactly as the tables hold them."""
    from db.models import DeadLetter, OutboxEntry
    from inspection_audit.web import create_app

    s = web_settings(queue_settings, tmp_path, migrated_url)
    (s.image_roots[0] / "o.png").write_bytes(png_bytes())
    body = {
        "inspection_id": "OUT-1",
        "image_path": "o.png",
        "prediction": "ok",
        "score": 0.2,
        "line": "l",
        "station": "s",
        "captured_at": datetime.now(UTC).isoformat(),
    }
    with session_scope(migrated_url) as session:
        session.add_all(
            [
                DeadLetter(stage="transport", reason="not JSON", raw=b"\x00", raw_size=1),
                DeadLetter(stage="message", reason="no inspection_id", raw=b"{}", raw_size=2),
                DeadLetter(stage="message", reason="no inspection_id", raw=b"[]", raw_size=2),
            ]
        )
    with TestClient(create_app(s)) as client:
        first = client.post("/api/v1/inspections", json=body, headers=bearer())
        again = client.post("/api/v1/inspections", json=body, headers=bearer())
        got = client.get("/api/v1/inspections/OUT-1", headers=bearer())
        m = _samples(client.get("/metrics", headers=bearer()).text)
    assert first.status_code == 202 and first.json()["status"] == "queued"
    assert again.status_code == 202 and again.json()["status"] == "duplicate"
    assert got.status_code == 404 and got.json()["status"] == "queued"
    assert redis_queue_length(queue_settings) == 1  # sent once
    with session_scope(migrated_url) as session:
        entries = session.execute(sa.select(OutboxEntry.inspection_id)).scalars().all()
    assert entries == ["OUT-1"]
    assert m[("inspection_audit_outbox", (("state", "queued"),))] == 1
    assert m[("inspection_audit_dead_letters", (("stage", "transport"),))] == 1
    assert m[("inspection_audit_dead_letters", (("stage", "message"),))] == 2
    assert m[("inspection_audit_queued_without_audit", ())] == 0  # not overdue yet
    dispose_engines(migrated_url)
