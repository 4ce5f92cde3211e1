"""Break: the message at the head of the Redis queue decides whether ``/metrics`` works. A
malformed entry (which the worker will record as a dead letter) makes the broker look down
(``inspection_audit_up{component="broker"} 0``, no queue depth); one whose ``captured_at`` has
no offset makes the scrape itself fail (TypeError, a 500)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import redis

from inspection_audit.settings import Settings


def _samples(settings: Settings) -> dict[str, list[tuple[dict[str, str], float]]]:
    from inspection_audit.web.metrics import AuditCollector

    return {
        m.name: [(s.labels, s.value) for s in m.samples] for m in AuditCollector(settings).collect()
    }


@pytest.mark.parametrize(
    "entry",
    [
        b"not json at all",
        json.dumps(
            {
                "body": base64.b64encode(
                    json.dumps([[{"captured_at": "2026-01-01T00:00:00"}], {}, {}]).encode()
                ).decode(),
                "properties": {"body_encoding": "base64"},
            }
        ).encode(),
    ],
    ids=["garbage", "naive-captured-at"],
)
def test_the_queue_head_never_breaks_the_metrics(
    entry: bytes, queue_settings: Settings, migrated_sqlite_url: str, tmp_path: Path
) -> None:
    s = queue_settings.model_copy(update={"database_url": migrated_sqlite_url})
    redis.Redis.from_url(s.resolved_broker_url).lpush(s.queue, entry)
    found = _samples(s)
    assert ({"component": "broker"}, 1) in found["inspection_audit_up"]
    assert found["inspection_audit_queue_messages"] == [({"queue": s.queue}, 1)]
