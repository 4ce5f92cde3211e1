"""The producer's outbox and reconcile (docs/reliability.md, "Nothing lost unseen").

Database level on both dialects (hand-computed counts), the producer's ordering (recorded
before sending; nothing sent when the outbox cannot be written; a broker failure leaves the
unsent entries for reconcile) and, end to end with a worker, a queue lost behind the workers'
backs: a Redis without persistence restarted, and a list emptied by hand. Reconcile resends
exactly the lost inspections and every inspection ends with exactly one row.
"""

from __future__ import annotations

import json
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from inspection_audit.settings import Settings
from tests.support.messages import good_payload
from tests.support.models import tiny_checkpoint
from tests.support.workers import (
    audit_rows,
    cli_command,
    make_images,
    start_worker,
    stop_workers,
    wait_ready,
    wait_rows,
    worker_env,
)
from tests.test_faults_services import RedisServer

QUEUE = "ia-outbox"


def _audit(session: Any, iid: str) -> None:
    from db.repository import upsert_audit, upsert_inspection
    from db.rows import AuditRow, InspectionRow

    upsert_inspection(
        session,
        InspectionRow(iid, "a.png", "L", "S", datetime.now(UTC), "ok", 0.1),
    )
    upsert_audit(session, AuditRow(iid, "v", "m", "done"))


def test_outbox_queries(migrated_url: str) -> None:
    """record -> mark sent -> an audit row appears for some -> overdue lists the others, by the
    database's clock; counts for the metrics."""
    from db.outbox import count_overdue, mark_audited, mark_sent, overdue, record_queued
    from db.repository import outbox_counts, queued_without_audit
    from db.session import session_scope

    ids = [f"o-{i}" for i in range(5)]
    with session_scope(migrated_url) as s:
        assert record_queued(s, [(i, {"inspection_id": i}) for i in ids], "q1") == 5
    with session_scope(migrated_url) as s:
        assert mark_sent(s, ids[:4]) == 4  # o-4: the broker never took it
        assert mark_sent(s, ids[:1]) == 1  # o-0 resent once
        _audit(s, "o-1")
    with session_scope(migrated_url) as s:
        assert outbox_counts(s) == {
            "queued": 5,
            "pending": 5,
            "never_sent": 1,
            "resent": 1,
            "resends": 1,
        }
        # read-only: o-1 has a row, so it is not overdue, even before mark_audited
        assert queued_without_audit(s, timedelta(0)) == 4
        assert queued_without_audit(s, timedelta(hours=1)) == 0
    with session_scope(migrated_url) as s:
        assert mark_audited(s) == 1
        assert mark_audited(s) == 0  # only pending entries are looked at
        rows = overdue(s, timedelta(0))
        assert [r.inspection_id for r in rows] == ["o-0", "o-2", "o-3", "o-4"]
        by_id = {r.inspection_id: r for r in rows}
        assert by_id["o-0"].sends == 2 and by_id["o-4"].sends == 0
        assert by_id["o-4"].last_sent_at is None and by_id["o-2"].last_sent_at is not None
        assert by_id["o-2"].message == {"inspection_id": "o-2"} and by_id["o-2"].queue == "q1"
        assert [r.inspection_id for r in overdue(s, timedelta(0), limit=2)] == ["o-0", "o-2"]
        assert count_overdue(s, timedelta(0)) == 4
        assert outbox_counts(s)["pending"] == 4
        with pytest.raises(ValueError):
            overdue(s, timedelta(seconds=-1))
    with session_scope(migrated_url) as s:
        # enqueued again: new message and queue, pending again, sends kept
        record_queued(s, [("o-1", {"inspection_id": "o-1", "again": True})], "q2")
    with session_scope(migrated_url) as s:
        row = s.execute(
            sa.text("SELECT queue, sends, audited_at FROM outbox WHERE inspection_id = 'o-1'")
        ).one()
        assert row[0] == "q2" and row[1] == 1 and row[2] is None


def test_dead_letter_queries(migrated_url: str) -> None:
    from db.dead_letters import DeadLetterRow, dead_letters, record_dead_letter
    from db.repository import dead_letter_count, dead_letter_counts_by_stage
    from db.session import session_scope

    raw = b"\x00\xff" * 10_000
    with session_scope(migrated_url) as s:
        record_dead_letter(s, DeadLetterRow("transport", "not JSON \x00 \ud800", raw, "q"))
        record_dead_letter(
            s, DeadLetterRow("message", "no id", b"{}", headers={"task": "x", "n": {1, 2}})
        )
        with pytest.raises(ValueError):
            record_dead_letter(s, DeadLetterRow("elsewhere", "?"))
    with session_scope(migrated_url) as s:
        letters = dead_letters(s)
        assert dead_letter_count(s) == 2 and dead_letter_counts_by_stage(s) == {
            "transport": 1,
            "message": 1,
        }
        assert dead_letter_count(s, since=datetime.now(UTC) + timedelta(hours=1)) == 0
    first = next(d for d in letters if d["stage"] == "transport")
    assert first["reason"] == "not JSON \\u0000 \\ud800"  # stored, escaped
    assert first["raw"] == raw[:16_384] and first["raw_size"] == 20_000
    second = next(d for d in letters if d["stage"] == "message")
    assert json.loads(second["headers"])["task"] == "x"


def test_producer_records_before_sending_and_refuses_without_the_outbox(
    tmp_path: Path, migrated_sqlite_url: str, queue_settings: Settings
) -> None:
    """With the outbox on, the entries exist (committed) when the broker gets the first
    message, and each accepted send is counted. An outbox that cannot be written stops the
    batch before anything is sent."""
    from db.outbox import overdue
    from db.session import session_scope
    from producer.api import enqueue_many
    from producer.outbox import OutboxError
    from tests.support.queue import redis_queue_length

    images = make_images(tmp_path / "img", 2)
    s = queue_settings.model_copy(
        update={"image_roots": [tmp_path / "img"], "database_url": migrated_sqlite_url}
    )
    seen_at_first_send: list[int] = []

    def on_sent(msg: Any) -> None:
        if not seen_at_first_send:
            with session_scope(migrated_sqlite_url) as session:
                seen_at_first_send.append(len(overdue(session, timedelta(0))))

    msgs = [good_payload(f"ob-{i}", p.name) for i, p in enumerate(images)]
    assert enqueue_many(msgs, settings=s, outbox=True, on_sent=on_sent) == ["ob-0", "ob-1"]
    assert seen_at_first_send == [2]  # both recorded before the first send
    with session_scope(migrated_sqlite_url) as session:
        assert [r.sends for r in overdue(session, timedelta(0))] == [1, 1]

    down = s.model_copy(
        update={
            "database_url": "postgresql+psycopg://nobody@127.0.0.1:9/none",
            "enqueue_timeout_s": 1.0,
        }
    )
    t0 = time.monotonic()
    with pytest.raises(OutboxError, match="recording 1 message"):
        enqueue_many([good_payload("ob-2", images[0].name)], settings=down, outbox=True)
    assert time.monotonic() - t0 < 10
    assert redis_queue_length(s) == 2  # nothing more was sent
    # the setting turns it on too
    on = s.model_copy(update={"outbox": True})
    enqueue_many([good_payload("ob-3", images[0].name)], settings=on)
    with session_scope(migrated_sqlite_url) as session:
        assert "ob-3" in {r.inspection_id for r in overdue(session, timedelta(0))}


def _reconcile_cli(env: dict[str, str], cwd: Path, *args: str) -> dict[str, Any]:
    out = subprocess.run(
        cli_command("reconcile", "--json", *args),
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


@pytest.mark.slow
def test_queue_lost_behind_the_workers_backs_is_reconciled_one_row_each(
    tmp_path: Path, migrated_pg_url: str
) -> None:
    """10 inspections audited; 10 more enqueued while no worker runs, then the Redis (no
    persistence, like an existing site's) is killed and restarted: they are gone; 5 more
    enqueued, then their list is deleted by hand. A worker starts; nothing arrives. Reconcile
    (the CLI) lists and resends exactly the 15 lost ones, and every one of the 25 inspections
    ends with exactly one row, no duplicate. A second reconcile has nothing to do."""
    from db.repository import outbox_counts, queued_without_audit
    from db.session import session_scope
    from producer.api import enqueue_many, reset_apps

    images = make_images(tmp_path / "img", 5)
    ckpt = tiny_checkpoint(tmp_path, size=(48, 48))
    redis = RedisServer(tmp_path / "redis")  # no persistence
    redis.start()
    s = Settings(
        broker_url=redis.url,
        database_url=migrated_pg_url,
        queue=QUEUE,
        image_roots=[tmp_path / "img"],
        home=tmp_path / "home",
        outbox=True,
    )
    values = {
        "broker_url": redis.url,
        "queue": QUEUE,
        "database_url": migrated_pg_url,
        "model": ckpt,
        "image_roots": tmp_path / "img",
        "home": tmp_path / "home",
        "torch_threads": 1,
        "batch_size": 4,
        "batch_wait_ms": 100,
    }
    env = worker_env(values)

    def send(ids: list[str]) -> None:
        try:
            enqueue_many(
                [good_payload(i, images[n % 5].name) for n, i in enumerate(ids)], settings=s
            )
        finally:
            reset_apps()

    audited = [f"kept-{i}" for i in range(10)]
    restarted = [f"lost-restart-{i}" for i in range(10)]
    emptied = [f"lost-emptied-{i}" for i in range(5)]
    workers = []
    try:
        w = start_worker(env, "first", tmp_path)
        workers.append(w)
        wait_ready([w])
        send(audited)
        wait_rows(migrated_pg_url, audited, [w], timeout=90)
        stop_workers([w])
        send(restarted)
        assert len(redis.queue(QUEUE)) == 10
        redis.kill()
        redis.start()  # no persistence: the queue is gone
        assert redis.queue(QUEUE) == []
        send(emptied)
        with redis.client() as c:
            assert c.delete(QUEUE) == 1  # emptied by hand
        w2 = start_worker(env, "second", tmp_path)
        workers.append(w2)
        wait_ready([w2])
        time.sleep(2.0)
        assert len(audit_rows(migrated_pg_url)) == 10  # nothing else arrives on its own
        lost = sorted(restarted + emptied)
        with session_scope(migrated_pg_url) as session:
            assert queued_without_audit(session, timedelta(0)) == 15  # the metric sees them

        dry = _reconcile_cli(env, tmp_path, "--older-than", "0", "--dry-run")
        assert sorted(r["inspection_id"] for r in dry["overdue"]) == lost and dry["resent"] == []
        assert dry["audited"] == 10
        assert _reconcile_cli(env, tmp_path, "--older-than", "3600")["overdue"] == []
        done = _reconcile_cli(env, tmp_path, "--older-than", "0")
        assert sorted(done["resent"]) == lost  # exactly the lost ones
        all_ids = audited + restarted + emptied
        wait_rows(migrated_pg_url, all_ids, [w2], timeout=120)
        time.sleep(1.0)
        rows = audit_rows(migrated_pg_url)
        again = _reconcile_cli(env, tmp_path, "--older-than", "0")
        with session_scope(migrated_pg_url) as session:
            counts = outbox_counts(session)
            overdue_after = queued_without_audit(session, timedelta(0))
    finally:
        stop_workers(workers)
        redis.kill()
    assert sorted(r["inspection_id"] for r in rows) == sorted(all_ids)  # one row each
    assert all(r["status"] == "done" and r["duplicate_count"] == 0 for r in rows)
    assert again == {"audited": 15, "overdue": [], "resent": [], "unsendable": {}, "dry_run": False}
    assert counts == {"queued": 25, "pending": 0, "never_sent": 0, "resent": 15, "resends": 15}
    assert overdue_after == 0
    print(
        f"\nFIGURES outbox/redis: messages 25 (15 lost), rows expected 25, rows {len(rows)}, "
        f"resent {len(done['resent'])}, duplicates {sum(r['duplicate_count'] for r in rows)}, "
        f"error rows {sum(1 for r in rows if r['status'] == 'error')}"
    )
