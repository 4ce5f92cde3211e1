"""Break: an inspection whose only audit row is an ``error`` (e.g. its file was not yet on the
workers' mount when the message arrived) can never be audited through HTTP ingest: resending
it answers 202 ``duplicate`` and sends nothing, and ``reconcile`` never resends it either (it
has an audit row). The worker itself lets a late success replace an error row
(docs/design.md §6), and the Python producer does resend it."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from db.session import dispose_engines
from inspection_audit.settings import Settings
from tests.support.queue import redis_queue_length
from tests.support.web import bearer, fill, web_settings


def test_an_id_with_only_an_error_row_can_be_sent_again(
    migrated_url: str, queue_settings: Settings, tmp_path: Path
) -> None:
    from inspection_audit.web import create_app

    s = web_settings(queue_settings, tmp_path, migrated_url)
    filled = fill(s, flagged=1, unflagged=0, errors=1, maps=False)
    (iid,) = filled.errors
    msg = {
        "inspection_id": iid,
        "image_path": f"error/{iid}.png",  # fill wrote it: now the file is there
        "prediction": "ok",
        "score": 0.07,
        "line": "line-1",
        "station": "st-1",
        "captured_at": "2026-11-29T08:15:02+01:00",
    }
    with TestClient(create_app(s)) as client:
        r = client.post("/api/v1/inspections", json=msg, headers=bearer())
        done = client.post(
            "/api/v1/inspections",
            json={**msg, "inspection_id": filled.flagged[0], "image_path": "error/" + iid + ".png"},
            headers=bearer(),
        )
    dispose_engines(migrated_url)
    assert done.json()["status"] == "duplicate"  # a done row is never sent again
    assert r.status_code == 202 and r.json()["status"] == "queued", r.text
    assert redis_queue_length(s) == 1
