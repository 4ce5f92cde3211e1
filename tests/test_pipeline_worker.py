"""A real worker subprocess on Redis: micro-batching, hostile input, lost workers, the cap.

Each test starts one worker (``-c 1``, prefork) on a private Redis queue.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from inspection_audit.procs import wait_for
from inspection_audit.settings import Settings
from tests.support.models import tiny_checkpoint
from tests.support.workers import (
    audit_rows,
    make_images,
    start_worker,
    stop_workers,
    wait_ready,
    wait_rows,
    worker_env,
)

pytestmark = pytest.mark.slow


def _msg(iid: str, image_path: str, prediction: str = "ok") -> dict[str, Any]:
    return {
        "inspection_id": iid,
        "image_path": image_path,
        "prediction": prediction,
        "score": 0.2,
        "line": "L1",
        "station": "S1",
        "captured_at": datetime.now(UTC).isoformat(),
    }


def _env(tmp_path: Path, qs: Settings, url: str, ckpt: Path, **extra: Any) -> dict[str, str]:
    return worker_env(
        {
            "broker_url": qs.broker_url,
            "queue": qs.queue,
            "database_url": url,
            "model": ckpt,
            "image_roots": tmp_path / "img",
            "home": tmp_path / "home",
            "torch_threads": 1,
            **extra,
        }
    )


def _send_raw(qs: Settings, payloads: list[Any]) -> None:
    """Send task messages as a careless or hostile producer would: no validation at all."""
    from worker.app import TASK_NAME, create_app

    app = create_app(qs, worker=False)
    try:
        for p in payloads:
            app.send_task(TASK_NAME, args=[p], queue=qs.queue, serializer="json")
    finally:
        app.close()


def test_micro_batches_of_b(
    tmp_path: Path, migrated_sqlite_url: str, queue_settings: Settings
) -> None:
    """B=4, T large, 8 messages waiting before the worker starts: two engine calls of 4."""
    from producer.api import enqueue_many, reset_apps

    images = make_images(tmp_path / "img", 8)
    ckpt = tiny_checkpoint(tmp_path, size=(48, 48))
    qs = queue_settings.model_copy(update={"image_roots": [tmp_path / "img"]})
    ids = enqueue_many([_msg(f"mb-{i}", p.name) for i, p in enumerate(images)], settings=qs)
    reset_apps()
    env = _env(
        tmp_path, queue_settings, migrated_sqlite_url, ckpt, batch_size=4, batch_wait_ms=60_000
    )
    w = start_worker(env, "mb", tmp_path)
    try:
        wait_ready([w])
        rows = wait_rows(migrated_sqlite_url, ids, [w], timeout=60)
    finally:
        stop_workers([w])
    assert sorted(r["inspection_id"] for r in rows) == sorted(ids)  # one row each
    assert all(r["status"] == "done" for r in rows)
    assert [r["params"]["batch_size"] for r in rows] == [4] * 8
    sizes = [int(n) for n in re.findall(r"scored a batch of (\d+) image", w.text())]
    assert sizes == [4, 4], w.tail()


def test_hostile_input_becomes_error_rows(
    tmp_path: Path, migrated_sqlite_url: str, queue_settings: Settings
) -> None:
    """Missing file, non-image, path outside the roots, bad fields: error rows; the rest done."""
    img = tmp_path / "img"
    good = make_images(img, 3)
    (img / "notes.png").write_text("this is not an image\n")
    outside = tmp_path / "outside.png"
    outside.write_bytes(good[0].read_bytes())
    (img / "escape.png").symlink_to(outside)
    ckpt = tiny_checkpoint(tmp_path, size=(48, 48))
    payloads: list[Any] = [
        _msg("h-good-0", good[0].name),
        _msg("h-missing", "does-not-exist.png"),
        _msg("h-notimage", "notes.png"),
        _msg("h-outside", "../outside.png"),
        _msg("h-abs-outside", str(outside)),
        _msg("h-symlink", "escape.png"),
        {**_msg("h-badscore", good[1].name), "score": 7.5},
        {**_msg("h-sha", good[1].name), "image_sha256": "0" * 64},
        {"no_id": True},  # nothing to record it under: a dead letter, acknowledged
        _msg("h-good-1", good[1].name),
        _msg("h-defect", good[2].name, prediction="defect"),
        _msg("h-good-0", good[0].name),  # the line sent it twice: still one row
    ]
    _send_raw(queue_settings, payloads)
    env = _env(tmp_path, queue_settings, migrated_sqlite_url, ckpt, batch_size=4, batch_wait_ms=100)
    w = start_worker(env, "hostile", tmp_path)
    ids = sorted({p["inspection_id"] for p in payloads if "inspection_id" in p})
    try:
        wait_ready([w])
        rows = {r["inspection_id"]: r for r in wait_rows(migrated_sqlite_url, ids, [w], timeout=60)}
        # the message without an id is a dead letter, acknowledged, not redelivered forever
        deadline = time.monotonic() + 10
        while "recording it as a dead letter" not in w.text() and time.monotonic() < deadline:
            time.sleep(0.2)
        # the second copy of h-good-0 is counted on its row, not written as another row
        while audit_rows(migrated_sqlite_url, ["h-good-0"])[0]["duplicate_count"] != 1:
            assert time.monotonic() < deadline, f"duplicate not counted:\n{w.tail()}"
            time.sleep(0.2)
    finally:
        stop_workers([w])
    assert len(rows) == len(ids)
    expect = {
        "h-missing": "image file not found",
        "h-notimage": "not a recognised image format",
        "h-outside": "outside the configured image roots",
        "h-abs-outside": "outside the configured image roots",
        "h-symlink": "outside the configured image roots",
        "h-badscore": "score",
        "h-sha": "do not match image_sha256",
    }
    for iid, text in expect.items():
        assert rows[iid]["status"] == "error", (iid, rows[iid])
        assert text in rows[iid]["error"], (iid, rows[iid]["error"])
        assert rows[iid]["suspected_false_negative"] is False
    for iid in ("h-good-0", "h-good-1"):
        assert rows[iid]["status"] == "done" and rows[iid]["iou_gap_adv"] is not None
    cheap = rows["h-defect"]
    assert cheap["status"] == "done" and cheap["p_defect"] is not None
    assert cheap["iou_gap"] is None and cheap["suspected_false_negative"] is False
    assert "has no inspection_id (nothing to record it under); recording it as a dead letter" in (
        w.text()
    )
    from db.repository import dead_letter_count
    from db.session import session_scope

    with session_scope(migrated_sqlite_url) as s:
        assert dead_letter_count(s) == 1
    assert w.proc.returncode is not None


def test_lost_worker_requeues_and_cap_gives_up(
    tmp_path: Path, migrated_pg_url: str, queue_settings: Settings
) -> None:
    """Kill the pool process while it waits to write: the batch is redelivered and scored
    once more. That death came after scoring, so it is charged to nobody; an inspection whose
    attempts never finished more than ``max_redeliveries`` times gets an error row."""
    import os
    import signal

    import sqlalchemy as sa

    from db.deliveries import attempt_state, start_attempt
    from db.models import DeliveryAttempt
    from db.session import make_engine, session_scope
    from producer.api import enqueue_many, reset_apps
    from worker.model.checkpoint import load_checkpoint

    images = make_images(tmp_path / "img", 2)
    ckpt = tiny_checkpoint(tmp_path, size=(48, 48))
    version = load_checkpoint(ckpt).model_version
    method = "iou_gap_adv"
    # "lost-b" was lost before this test: its first attempt never finished, and its second is
    # still open. Here it waits its turn (a suspect is scored alone, after its batch-mates)
    # when the process dies while writing lost-a's row, which does not count against it: on
    # its next delivery its open second attempt is charged, 2 > max_redeliveries.
    with session_scope(migrated_pg_url) as s:
        start_attempt(s, ("lost-b", version, method))
        start_attempt(s, ("lost-b", version, method))
    env = _env(
        tmp_path,
        queue_settings,
        migrated_pg_url,
        ckpt,
        batch_size=2,
        batch_wait_ms=100,
        max_redeliveries=1,
    )
    w = start_worker(env, "lost", tmp_path)
    locker = make_engine(migrated_pg_url).connect()
    try:
        wait_ready([w])
        tx = locker.begin()
        locker.exec_driver_sql("LOCK TABLE audits IN EXCLUSIVE MODE")
        ids = enqueue_many(
            [_msg("lost-a", images[0].name), _msg("lost-b", images[1].name)],
            settings=queue_settings.model_copy(update={"image_roots": [tmp_path / "img"]}),
        )
        reset_apps()
        # Wait until the batch was counted and the writer is blocked on our lock (an ungranted
        # lock of this test's own database: other tests' databases are not ours to watch).
        found: dict[str, int] = {}

        def writer_blocked() -> bool:
            with session_scope(migrated_pg_url) as s:
                host = s.execute(
                    sa.select(DeliveryAttempt.last_worker).where(
                        DeliveryAttempt.inspection_id == "lost-a"
                    )
                ).scalar_one_or_none()
                waiting = s.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a "
                        "ON a.pid = l.pid WHERE NOT l.granted AND a.datname = current_database()"
                    )
                ).scalar_one()
            if host and waiting:
                found["pid"] = int(host.rsplit(":", 1)[1])
            return "pid" in found

        assert wait_for(writer_blocked, 60, [w]), f"the worker never blocked:\n{w.tail()}"
        pid = found["pid"]
        os.kill(pid, signal.SIGKILL)  # the pool process this worker forked

        def gone() -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        assert wait_for(gone, 30), "the pool process did not die"
        tx.rollback()
        rows = {r["inspection_id"]: r for r in wait_rows(migrated_pg_url, ids, [w], timeout=90)}
    finally:
        locker.close()
        stop_workers([w])
    assert "lost (WorkerLostError: Worker exited prematurely" in w.text(), w.tail()
    a, b = rows["lost-a"], rows["lost-b"]
    assert a["status"] == "done" and a["delivery_count"] == 2
    assert b["status"] == "error" and b["delivery_count"] == 3
    assert b["error"] == "worker lost 2 times while scoring this image; giving up"
    assert len(audit_rows(migrated_pg_url, ids)) == 2
    with session_scope(migrated_pg_url) as s:
        a_state = attempt_state(s, ("lost-a", version, method))
    # two attempts on lost-a; the first had finished scoring when its process died: not lost
    assert (a_state.attempts, a_state.open_attempt, a_state.lost) == (2, None, 0)


def test_database_fault_is_retried(
    tmp_path: Path, migrated_pg_url: str, queue_settings: Settings
) -> None:
    """The database refuses connections for a while: the worker retries with backoff, does
    not crash, and writes the rows once the database is back."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    from db.session import dispose_engines
    from producer.api import enqueue_many, reset_apps
    from tests.support.db import pg_admin_url

    images = make_images(tmp_path / "img", 3)
    ckpt = tiny_checkpoint(tmp_path, size=(48, 48))
    env = _env(
        tmp_path,
        queue_settings,
        migrated_pg_url,
        ckpt,
        batch_size=4,
        batch_wait_ms=100,
        task_max_retries=10,
        retry_backoff_max_s=2,
    )
    name = make_url(migrated_pg_url).database
    admin = sa.create_engine(pg_admin_url(), isolation_level="AUTOCOMMIT", poolclass=NullPool)
    w = start_worker(env, "dbfault", tmp_path)
    try:
        wait_ready([w])
        dispose_engines(migrated_pg_url)
        with admin.connect() as c:
            c.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            c.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %(d)s",
                {"d": name},
            )
        qs = queue_settings.model_copy(update={"image_roots": [tmp_path / "img"]})
        ids = enqueue_many([_msg(f"dbf-{i}", p.name) for i, p in enumerate(images)], settings=qs)
        reset_apps()
        # the worker retries (at least twice) while the database refuses it
        assert wait_for(lambda: "retry 2/10" in w.text(), 60, [w]), w.tail()
    finally:
        with admin.connect() as c:
            c.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        admin.dispose()
    try:
        rows = wait_rows(migrated_pg_url, ids, [w], timeout=60)
    finally:
        stop_workers([w])
    assert sorted(r["inspection_id"] for r in rows) == sorted(ids)
    assert all(r["status"] == "done" for r in rows)
    assert re.search(r"counting deliveries: database fault \(OperationalError", w.text())
    assert "retry 2/10" in w.text()


def test_warm_shutdown_returns_buffered_messages(
    tmp_path: Path, migrated_sqlite_url: str, queue_settings: Settings
) -> None:
    """Messages waiting in the micro-batch buffer when the worker stops go back to the queue."""
    from producer.api import enqueue_many, reset_apps
    from tests.support.queue import redis_queue_length

    images = make_images(tmp_path / "img", 3)
    ckpt = tiny_checkpoint(tmp_path, size=(48, 48))
    qs = queue_settings.model_copy(update={"image_roots": [tmp_path / "img"]})
    env = _env(
        tmp_path, queue_settings, migrated_sqlite_url, ckpt, batch_size=4, batch_wait_ms=600_000
    )
    w = start_worker(env, "buffer", tmp_path)
    try:
        wait_ready([w])
        enqueue_many([_msg(f"buf-{i}", p.name) for i, p in enumerate(images)], settings=qs)
        reset_apps()
        # all three taken into the buffer
        assert wait_for(lambda: redis_queue_length(queue_settings) == 0, 20, [w]), w.tail()
    finally:
        stop_workers([w])
    assert w.proc.returncode == 0, w.tail()
    assert audit_rows(migrated_sqlite_url) == []
    assert redis_queue_length(queue_settings) == 3
