"""Lost work (docs/reliability.md): a whole worker SIGKILLed mid-batch, a pool process that dies
inside the adversarial step until the redelivery cap gives up on its image, and a warm shutdown
(SIGTERM) in the middle of a batch. Real worker subprocesses on a Redis server of the test's
own (so kombu's global ``unacked`` keys are the test's alone) and PostgreSQL or SQLite.

"Mid-batch" is made deterministic with a table lock: the test holds ``LOCK TABLE audits IN
EXCLUSIVE MODE``, so the pool process has counted and scored its batch and waits to write it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from inspection_audit.settings import Settings
from tests.support.models import tiny_checkpoint
from tests.support.workers import (
    WorkerProc,
    audit_rows,
    make_images,
    start_worker,
    stop_workers,
    wait_ready,
    wait_rows,
    worker_env,
)
from tests.test_faults_services import RedisServer

pytestmark = pytest.mark.slow

QUEUE = "ia-faults"


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A non-persistent ``redis-server`` of the test's own on a free port, killed afterwards."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


def _msg(iid: str, image_path: str) -> dict[str, Any]:
    return {
        "inspection_id": iid,
        "image_path": image_path,
        "prediction": "ok",
        "score": 0.2,
        "line": "L1",
        "station": "S1",
        "captured_at": datetime.now(UTC).isoformat(),
    }


def _env(tmp_path: Path, broker: str, url: str, ckpt: Path, **extra: Any) -> dict[str, str]:
    return worker_env(
        {
            "broker_url": broker,
            "queue": QUEUE,
            "database_url": url,
            "model": ckpt,
            "image_roots": tmp_path / "img",
            "home": tmp_path / "home",
            "torch_threads": 1,
            **extra,
        }
    )


def _enqueue(broker: str, tmp_path: Path, ids: list[str], images: list[Path]) -> list[str]:
    from producer.api import enqueue_many, reset_apps

    s = Settings(broker_url=broker, queue=QUEUE, image_roots=[tmp_path / "img"], home=tmp_path)
    try:
        return enqueue_many([_msg(i, p.name) for i, p in zip(ids, images, strict=True)], settings=s)
    finally:
        reset_apps()


def _until(cond: Callable[[], bool], what: str, w: WorkerProc, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert w.proc.poll() is None, f"worker exited while waiting for {what}:\n{w.tail()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{w.tail()}"
        time.sleep(0.1)


def _writer_blocked(url: str) -> bool:
    from db.session import session_scope

    with session_scope(url) as s:
        return bool(s.execute(sa.text("SELECT count(*) FROM pg_locks WHERE NOT granted")).scalar())


def _one_row_each(url: str, ids: list[str]) -> dict[str, dict[str, Any]]:
    rows = audit_rows(url, ids)
    assert sorted(r["inspection_id"] for r in rows) == sorted(ids)  # exactly one row each
    return {r["inspection_id"]: r for r in rows}


# --- case 1: the whole worker SIGKILLed mid-batch ---------------------------------------------------
def test_sigkill_whole_worker_mid_batch_then_restart_one_row_each(
    tmp_path: Path, migrated_pg_url: str, private_redis: RedisServer
) -> None:
    """B=3, prefetch 6, 9 messages. While one batch of 3 waits to write and 3 more are
    prefetched, the worker's whole process group gets SIGKILL (no requeue by anyone: the 6
    messages sit in kombu's ``unacked`` hash). A new worker with a 5 s visibility timeout
    restores them and every inspection ends with exactly one row."""
    from db.session import make_engine

    images = make_images(tmp_path / "img", 9)
    ckpt = tiny_checkpoint(tmp_path, size=(48, 48))
    env = _env(
        tmp_path,
        private_redis.url,
        migrated_pg_url,
        ckpt,
        batch_size=3,
        batch_wait_ms=100,
        prefetch_multiplier=6,
        visibility_timeout_s=5,
    )
    ids = [f"kill-{i}" for i in range(9)]
    w1 = start_worker(env, "victim", tmp_path)
    w2: WorkerProc | None = None
    locker = make_engine(migrated_pg_url).connect()
    try:
        wait_ready([w1])
        tx = locker.begin()
        locker.exec_driver_sql("LOCK TABLE audits IN EXCLUSIVE MODE")
        _enqueue(private_redis.url, tmp_path, ids, images)
        _until(lambda: _writer_blocked(migrated_pg_url), "the writer to block", w1)
        _until(lambda: private_redis.unacked() == 6, "6 messages in flight", w1, timeout=20)
        os.killpg(w1.proc.pid, signal.SIGKILL)  # main process and pool: nobody acks or requeues
        w1.proc.wait(10)
        tx.rollback()
        assert audit_rows(migrated_pg_url, ids) == []
        assert private_redis.unacked() == 6 and len(private_redis.queue(QUEUE)) == 3

        w2 = start_worker(env, "successor", tmp_path)
        wait_ready([w2])
        wait_rows(migrated_pg_url, ids, [w2], timeout=60)
        time.sleep(1.0)  # a late duplicate would show up now
        rows = _one_row_each(migrated_pg_url, ids)
    finally:
        locker.close()
        stop_workers([w for w in (w1, w2) if w is not None])
    assert all(r["status"] == "done" for r in rows.values()), rows
    # the batch that was scoring when the worker died was delivered twice and counted so
    assert sorted(r["delivery_count"] for r in rows.values()).count(2) == 3, rows
    assert private_redis.unacked() == 0 and private_redis.queue(QUEUE) == []


# --- case 2: a message that kills its pool process in the adversarial step -------------------------
def test_pool_process_killed_in_fgsm_is_requeued_then_capped(
    tmp_path: Path, migrated_sqlite_url: str, private_redis: RedisServer
) -> None:
    """The fault-injection hook (``worker.faults.FAULT_KILL_IN_ATTACK_ENV``) makes the pool
    process SIGKILL itself inside FGSM whenever its engine batch holds ``poison``. ``poison``
    is sent first, three innocent images after it, in one micro-batch. The main process
    requeues the lost batch each time; redelivered images are then worked on one at a time,
    so the innocent ones are scored (never dragged to the cap with ``poison``), and after
    ``max_redeliveries`` (1) lost deliveries ``poison`` becomes an ``error`` row that says so.
    The worker's main process keeps running throughout."""
    from worker.faults import FAULT_KILL_IN_ATTACK_ENV

    images = make_images(tmp_path / "img", 4)
    ckpt = tiny_checkpoint(tmp_path, size=(48, 48))
    env = _env(
        tmp_path,
        private_redis.url,
        migrated_sqlite_url,
        ckpt,
        batch_size=4,
        batch_wait_ms=2000,
        max_redeliveries=1,
    )
    env[FAULT_KILL_IN_ATTACK_ENV] = "poison"
    w = start_worker(env, "poisoned", tmp_path)
    ids = ["poison", "innocent-1", "innocent-2", "innocent-3"]
    try:
        wait_ready([w])
        _enqueue(private_redis.url, tmp_path, ids, images)
        wait_rows(migrated_sqlite_url, ids, [w], timeout=90)
        time.sleep(1.0)
        rows = _one_row_each(migrated_sqlite_url, ids)
        assert w.proc.poll() is None, w.tail()
    finally:
        stop_workers([w])
    text = w.text()
    assert text.count("FAULT INJECTION: pool process") == 2, w.tail()
    assert text.count("lost (WorkerLostError") == 2, w.tail()
    for iid in ids[1:]:
        r = rows[iid]
        assert r["status"] == "done" and r["iou_gap_adv"] is not None, r
        # lost with poison's first batch, then scored alone (and, if poison killed the process
        # after that row was written, delivered once more as a counted duplicate)
        assert r["delivery_count"] in (2, 3) and r["error"] is None, r
    poison = rows["poison"]
    assert poison["status"] == "error", poison
    assert poison["error"] == "worker lost 2 times while scoring this image; giving up"
    assert poison["delivery_count"] == 3
    assert w.proc.returncode == 0, w.tail()
    assert private_redis.unacked() == 0 and private_redis.queue(QUEUE) == []


# --- case 7: warm shutdown in the middle of a batch ---------------------------------------------------
def test_sigterm_mid_batch_finishes_or_requeues_then_restart_one_row_each(
    tmp_path: Path, migrated_pg_url: str, private_redis: RedisServer
) -> None:
    """SIGTERM to the worker while a batch of 3 waits to write and 3 more are prefetched: the
    worker waits for the running batch (its rows are written and acked), puts every message it
    has not started back on the queue, and exits 0. A new worker audits the rest: one row per
    inspection, each delivered once (nothing was lost and redelivered)."""
    from db.session import make_engine

    images = make_images(tmp_path / "img", 9)
    ckpt = tiny_checkpoint(tmp_path, size=(48, 48))
    env = _env(
        tmp_path,
        private_redis.url,
        migrated_pg_url,
        ckpt,
        batch_size=3,
        batch_wait_ms=100,
        prefetch_multiplier=6,
    )
    ids = [f"term-{i}" for i in range(9)]
    w1 = start_worker(env, "stopping", tmp_path)
    w2: WorkerProc | None = None
    locker = make_engine(migrated_pg_url).connect()
    try:
        wait_ready([w1])
        tx = locker.begin()
        locker.exec_driver_sql("LOCK TABLE audits IN EXCLUSIVE MODE")
        _enqueue(private_redis.url, tmp_path, ids, images)
        _until(lambda: _writer_blocked(migrated_pg_url), "the writer to block", w1)
        _until(lambda: private_redis.unacked() == 6, "6 messages in flight", w1, timeout=20)
        os.kill(w1.proc.pid, signal.SIGTERM)  # the main process only: Celery's warm shutdown
        time.sleep(1.5)
        assert w1.proc.poll() is None, "the worker did not wait for its running batch"
        tx.rollback()
        w1.proc.wait(30)
        assert w1.proc.returncode == 0, w1.tail()
        first = audit_rows(migrated_pg_url, ids)
        assert len(first) >= 3  # the running batch was finished
        waiting = [e["decoded_body"][0][0]["inspection_id"] for e in private_redis.queue(QUEUE)]
        assert private_redis.unacked() == 0  # nothing left in flight
        assert sorted(waiting + [r["inspection_id"] for r in first]) == sorted(ids)

        w2 = start_worker(env, "after", tmp_path)
        wait_ready([w2])
        wait_rows(migrated_pg_url, ids, [w2], timeout=60)
        time.sleep(1.0)
        rows = _one_row_each(migrated_pg_url, ids)
    finally:
        locker.close()
        stop_workers([w for w in (w1, w2) if w is not None])
    assert all(r["status"] == "done" for r in rows.values())
    assert all(r["delivery_count"] == 1 and r["duplicate_count"] == 0 for r in rows.values())
    assert "Warm shutdown" in w1.text() or "warm shutdown" in w1.text().lower(), w1.tail()


# --- the visibility-timeout trap: one message delivered twice ---------------------------------------
def test_visibility_timeout_expiry_delivers_twice_and_the_upsert_absorbs_it(
    tmp_path: Path, migrated_pg_url: str, private_redis: RedisServer
) -> None:
    """The visibility timeout counts from delivery: a message held longer than that (here 2 s,
    while its writer waits on a lock) is handed to a second worker although the first is
    alive and still working on it. Both write; the idempotent upsert keeps one row and counts
    the duplicate."""
    from db.models import DeliveryAttempt
    from db.session import make_engine, session_scope

    images = make_images(tmp_path / "img", 1)
    ckpt = tiny_checkpoint(tmp_path, size=(48, 48))
    env = _env(
        tmp_path,
        private_redis.url,
        migrated_pg_url,
        ckpt,
        batch_size=1,
        batch_wait_ms=50,
        visibility_timeout_s=2,
    )
    workers = [start_worker(env, name, tmp_path) for name in ("slow", "other")]
    locker = make_engine(migrated_pg_url).connect()

    def attempts() -> int:
        with session_scope(migrated_pg_url) as s:
            n = s.execute(sa.select(DeliveryAttempt.attempts)).scalar_one_or_none()
        return int(n or 0)

    try:
        wait_ready(workers)
        tx = locker.begin()
        locker.exec_driver_sql("LOCK TABLE audits IN EXCLUSIVE MODE")
        _enqueue(private_redis.url, tmp_path, ["vt-1"], images)
        _until(lambda: attempts() == 2, "a second delivery", workers[0], timeout=30)
        tx.rollback()
        wait_rows(migrated_pg_url, ["vt-1"], workers, timeout=30)
        deadline = time.monotonic() + 20
        while audit_rows(migrated_pg_url, ["vt-1"])[0]["duplicate_count"] < 1:
            assert time.monotonic() < deadline, "\n".join(w.tail() for w in workers)
            time.sleep(0.2)
        rows = _one_row_each(migrated_pg_url, ["vt-1"])
    finally:
        locker.close()
        stop_workers(workers)
    row = rows["vt-1"]
    assert row["status"] == "done" and row["duplicate_count"] == 1 and row["delivery_count"] == 2
    assert all("batch of 1 message(s)" in w.text() for w in workers)  # each worker had it
    assert private_redis.unacked() == 0 and private_redis.queue(QUEUE) == []


# --- the embedded default's filesystem broker: a known limit -----------------------------------------
def test_filesystem_broker_requeues_on_sigterm_but_loses_unacked_on_sigkill(
    tmp_path: Path,
) -> None:
    """kombu's filesystem transport deletes a message file when it delivers it; unacked
    messages live only in the worker's memory. A warm shutdown writes them back; a SIGKILL of
    the whole worker loses them (no visibility timeout exists there). This is why production
    runs Redis (docs/reliability.md); the test pins the limit down so the docs stay true."""
    from db.migrate import upgrade
    from db.session import dispose_engines
    from producer.api import enqueue_many, reset_apps

    images = make_images(tmp_path / "img", 3)
    ckpt = tiny_checkpoint(tmp_path, size=(48, 48))
    home = tmp_path / "home"
    s = Settings(home=home, image_roots=[tmp_path / "img"], queue=QUEUE)
    url = s.resolved_database_url
    upgrade(url)
    dispose_engines(url)
    env = worker_env(
        {
            "home": home,
            "queue": QUEUE,
            "model": ckpt,
            "image_roots": tmp_path / "img",
            "torch_threads": 1,
            "batch_size": 4,
            "batch_wait_ms": 600_000,  # the 3 messages stay in the micro-batch buffer
        }
    )

    def files() -> int:
        return len(list((home / "broker" / "queue").glob(f"*.{QUEUE}.msg")))

    ids = [f"fs-{i}" for i in range(3)]
    try:
        enqueue_many([_msg(i, p.name) for i, p in zip(ids, images, strict=True)], settings=s)
    finally:
        reset_apps()
    assert files() == 3
    for how in ("SIGTERM", "SIGKILL"):
        w = start_worker(env, f"fs-{how.lower()}", tmp_path)
        try:
            wait_ready([w])
            _until(lambda: files() == 0, "the worker to take the messages", w, timeout=30)
            time.sleep(0.5)
            if how == "SIGTERM":
                os.kill(w.proc.pid, signal.SIGTERM)
            else:
                os.killpg(w.proc.pid, signal.SIGKILL)
            w.proc.wait(30)
        finally:
            stop_workers([w])
        if how == "SIGTERM":
            assert w.proc.returncode == 0 and files() == 3, w.tail()  # written back
        else:
            assert files() == 0  # lost: nothing on disk, nothing to restore them from
    assert audit_rows(url, ids) == []
    dispose_engines(url)
