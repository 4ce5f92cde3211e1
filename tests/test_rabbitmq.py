"""RabbitMQ as the broker (docs/reliability.md, README "Choosing a broker").

The machine's RabbitMQ (127.0.0.1:5672), a virtual host of each test's own (never a restart
of the shared server), real worker subprocesses, PostgreSQL. The audit queue is a quorum queue
with ``x-delivery-limit`` and a dead-letter queue the workers consume (worker.app.
rabbitmq_queues):

* end to end with 2 workers: every inspection once;
* SIGKILL of one of two workers while it holds a batch: the broker returns its messages at
  once (no visibility timeout), the other worker audits them, one row each;
* a dropped connection, through a TCP proxy of the test's own: the broker returns the
  unacknowledged messages, the worker reconnects; nothing is charged to the cap;
* the malformed messages of part 1, published raw with py-amqp: the worker stays up, error
  rows and dead letters as on Redis;
* a message that keeps killing its pool process, with ``x-delivery-limit`` 1: the broker
  dead-letters it and a worker records it as that inspection's error row.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from inspection_audit.settings import Settings
from tests.support.messages import good_payload, malformed_cases
from tests.support.models import tiny_checkpoint
from tests.support.rabbit import publish_raw, queue_depth, queue_info, vhost_of
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
from tests.test_faults_services import TcpProxy

pytestmark = pytest.mark.slow

QUEUE = "ia-rabbit"


def _env(tmp_path: Path, broker: str, db: str, ckpt: Path, **extra: Any) -> dict[str, str]:
    return worker_env(
        {
            "broker_url": broker,
            "queue": QUEUE,
            "database_url": db,
            "model": ckpt,
            "image_roots": tmp_path / "img",
            "home": tmp_path / "home",
            "torch_threads": 1,
            **extra,
        }
    )


def _enqueue(
    broker: str, tmp_path: Path, ids: list[str], images: list[Path], **settings: Any
) -> None:
    from producer.api import enqueue_many, reset_apps

    s = Settings(
        broker_url=broker,
        queue=QUEUE,
        image_roots=[tmp_path / "img"],
        home=tmp_path,
        **settings,
    )
    try:
        enqueue_many(
            [good_payload(i, images[n % len(images)].name) for n, i in enumerate(ids)],
            settings=s,
        )
    finally:
        reset_apps()


def _until(cond: Callable[[], bool], what: str, ws: list[WorkerProc], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for w in ws:
            assert w.proc.poll() is None, f"worker {w.name} exited waiting for {what}:\n{w.tail()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n" + "\n".join(
            w.tail(30) for w in ws
        )
        time.sleep(0.1)


def _writers_blocked(url: str) -> int:
    from db.session import session_scope

    with session_scope(url) as s:
        return int(
            s.execute(
                sa.text(
                    "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE NOT l.granted AND a.datname = current_database()"
                )
            ).scalar_one()
        )


def _attempts(url: str) -> dict[str, tuple[int, int | None, int]]:
    from db.models import DeliveryAttempt
    from db.session import session_scope

    t = DeliveryAttempt.__table__.c
    with session_scope(url) as s:
        rows = s.execute(sa.select(t.inspection_id, t.attempts, t.open_attempt, t.lost)).all()
    return {r[0]: (int(r[1]), r[2], int(r[3])) for r in rows}


def _one_row_each(url: str, ids: list[str]) -> dict[str, dict[str, Any]]:
    rows = audit_rows(url)
    assert sorted(r["inspection_id"] for r in rows) == sorted(ids)  # exactly once each
    return {r["inspection_id"]: r for r in rows}


def test_end_to_end_two_workers_quorum_queue(
    tmp_path: Path, migrated_pg_url: str, rabbit_url: str
) -> None:
    """60 inspections through a quorum queue to 2 workers: 60 rows, each once, each delivered
    once; both workers took part; nothing is left in the queue."""
    images = make_images(tmp_path / "img", 6)
    ckpt = tiny_checkpoint(tmp_path, size=(48, 48))
    env = _env(tmp_path, rabbit_url, migrated_pg_url, ckpt, batch_size=4, batch_wait_ms=100)
    workers = [start_worker(env, f"r{i}", tmp_path) for i in range(2)]
    ids = [f"rq-{i:02d}" for i in range(60)]
    try:
        wait_ready(workers)
        info = queue_info(vhost_of(rabbit_url), QUEUE)
        dlq = queue_info(vhost_of(rabbit_url), f"{QUEUE}.dead-letter")
        _enqueue(rabbit_url, tmp_path, ids, images)
        wait_rows(migrated_pg_url, ids, workers, timeout=180)
        time.sleep(1.0)
        rows = _one_row_each(migrated_pg_url, ids)
        depth = queue_depth(rabbit_url, QUEUE)
    finally:
        stop_workers(workers)
    assert info["type"] == "quorum" and '{"x-delivery-limit",10}' in info["arguments"], info
    assert f'"x-dead-letter-routing-key","{QUEUE}.dead-letter"' in info["arguments"]
    assert dlq["type"] == "quorum"
    assert all(r["status"] == "done" and r["delivery_count"] == 1 for r in rows.values())
    assert all(r["duplicate_count"] == 0 for r in rows.values())
    hosts = {r["worker_host"] for r in rows.values()}
    assert len(hosts) == 2, hosts  # both workers audited some
    assert depth == 0
    print(
        f"\nFIGURES rabbitmq/e2e: messages 60, rows expected 60, rows {len(rows)}, "
        f"duplicates 0, error rows 0, dead letters 0"
    )


def test_sigkill_one_of_two_workers_mid_batch(
    tmp_path: Path, migrated_pg_url: str, rabbit_url: str
) -> None:
    """Worker A holds a batch that waits to write (a table lock) and more prefetched; it is
    SIGKILLed (main process and pool). The broker returns everything A held at once (no
    visibility timeout to wait for) and worker B audits it: one row each. A died after
    scoring, so nothing is charged (``MAX_REDELIVERIES=0``)."""
    from db.session import make_engine

    images = make_images(tmp_path / "img", 6)
    ckpt = tiny_checkpoint(tmp_path, size=(48, 48))
    env = _env(
        tmp_path,
        rabbit_url,
        migrated_pg_url,
        ckpt,
        batch_size=3,
        batch_wait_ms=100,
        prefetch_multiplier=6,
        max_redeliveries=0,
    )
    ids = [f"rk-{i:02d}" for i in range(12)]
    a = start_worker(env, "victim", tmp_path)
    b: WorkerProc | None = None
    locker = make_engine(migrated_pg_url).connect()
    tx = locker.begin()
    try:
        wait_ready([a])
        locker.exec_driver_sql("LOCK TABLE audits IN EXCLUSIVE MODE")
        _enqueue(rabbit_url, tmp_path, ids, images)
        _until(lambda: _writers_blocked(migrated_pg_url) == 1, "A's writer to block", [a])
        _until(lambda: queue_depth(rabbit_url, QUEUE) == 6, "A to hold 6", [a])
        held = [i for i, v in _attempts(migrated_pg_url).items() if v == (1, None, 0)]
        assert len(held) == 3  # the batch being written; 3 more prefetched
        os.killpg(a.proc.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        a.proc.wait(10)
        _until(lambda: queue_depth(rabbit_url, QUEUE) == 12, "the broker to return A's 6", [])
        requeued_s = time.monotonic() - t_kill
        tx.rollback()
        b = start_worker(env, "successor", tmp_path)
        wait_ready([b])
        wait_rows(migrated_pg_url, ids, [b], timeout=120)
        time.sleep(1.0)
        rows = _one_row_each(migrated_pg_url, ids)
        attempts = _attempts(migrated_pg_url)
    finally:
        locker.close()
        stop_workers([w for w in (a, b) if w is not None])
    assert requeued_s < 5.0, requeued_s
    assert all(r["status"] == "done" for r in rows.values()), rows
    assert sorted(i for i, r in rows.items() if r["delivery_count"] == 2) == sorted(held)
    assert all(v[1:] == (None, 0) for v in attempts.values())  # nothing open, nothing lost
    assert queue_depth(rabbit_url, QUEUE) == 0
    print(
        f"\nFIGURES rabbitmq/sigkill: messages 12, rows expected 12, rows {len(rows)}, "
        f"duplicates {sum(r['duplicate_count'] for r in rows.values())}, error rows 0, "
        f"requeued in {requeued_s:.2f} s"
    )


def test_dropped_connection_through_a_proxy(
    tmp_path: Path, migrated_pg_url: str, rabbit_url: str
) -> None:
    """The worker reaches RabbitMQ through a TCP proxy of the test's own. While a batch of 3
    waits to write, the proxy closes every connection (and keeps listening): the broker
    returns the 3 unacknowledged messages, the worker reconnects and audits them again once
    the first attempt has written. Nothing is charged (``MAX_REDELIVERIES=0``): one ``done``
    row each, the second copy counted."""
    from db.session import make_engine

    images = make_images(tmp_path / "img", 3)
    ckpt = tiny_checkpoint(tmp_path, size=(48, 48))
    proxy = TcpProxy(("127.0.0.1", 5672))
    proxied = rabbit_url.replace(":5672/", f":{proxy.port}/")
    env = _env(
        tmp_path,
        proxied,
        migrated_pg_url,
        ckpt,
        batch_size=3,
        batch_wait_ms=100,
        max_redeliveries=0,
    )
    ids = [f"rd-{i}" for i in range(3)]
    w = start_worker(env, "dropped", tmp_path)
    locker = make_engine(migrated_pg_url).connect()
    tx = locker.begin()
    try:
        wait_ready([w])
        locker.exec_driver_sql("LOCK TABLE audits IN EXCLUSIVE MODE")
        _enqueue(rabbit_url, tmp_path, ids, images)
        _until(lambda: _writers_blocked(migrated_pg_url) == 1, "the writer to block", [w])
        proxy.drop()
        _until(lambda: "Connection to broker lost" in w.text(), "the connection loss", [w])
        _until(lambda: w.text().count("Connected to amqp://") >= 2, "a reconnection", [w])
        tx.rollback()
        wait_rows(migrated_pg_url, ids, [w], timeout=60)
        deadline = time.monotonic() + 60
        while any(r["duplicate_count"] < 1 for r in audit_rows(migrated_pg_url, ids)):
            assert time.monotonic() < deadline, w.tail(60)
            time.sleep(0.2)
        time.sleep(0.5)
        rows = _one_row_each(migrated_pg_url, ids)
        attempts = _attempts(migrated_pg_url)
        depth = queue_depth(rabbit_url, QUEUE)
        assert w.proc.poll() is None, w.tail()
    finally:
        locker.close()
        proxy.close()
        stop_workers([w])
    for iid in ids:
        assert rows[iid]["status"] == "done" and rows[iid]["duplicate_count"] == 1, rows[iid]
        assert attempts[iid][1:] == (None, 0), attempts
    assert "giving up" not in w.text() and depth == 0


def test_requeue_after_database_outage_is_a_copy_not_a_return(
    tmp_path: Path, migrated_pg_url: str, rabbit_url: str
) -> None:
    """The database goes away for longer than every retry while a batch of 2 waits to write:
    the worker puts the messages back itself, as copies, so the broker's delivery count does
    not grow (``x-delivery-limit`` 1 would otherwise dead-letter them after the second
    outage). Two outages in a row; once the database is back both are scored normally."""
    from db.session import dispose_engines, make_engine

    images = make_images(tmp_path / "img", 2)
    ckpt = tiny_checkpoint(tmp_path, size=(48, 48))
    proxy = TcpProxy(("127.0.0.1", sa.engine.make_url(migrated_pg_url).port or 5432))
    proxied = (
        sa.engine.make_url(migrated_pg_url)
        .set(port=proxy.port)
        .render_as_string(hide_password=False)
    )
    ids = ["rdb-0", "rdb-1"]
    env = _env(
        tmp_path,
        rabbit_url,
        proxied,
        ckpt,
        batch_size=2,
        batch_wait_ms=300,
        task_max_retries=1,
        retry_backoff_max_s=1,
        max_redeliveries=0,
        rabbitmq_delivery_limit=1,
    )
    w = start_worker(env, "outage", tmp_path)
    locker = make_engine(migrated_pg_url).connect()
    tx = locker.begin()
    try:
        wait_ready([w])
        locker.exec_driver_sql("LOCK TABLE audits IN EXCLUSIVE MODE")
        _enqueue(rabbit_url, tmp_path, ids, images, rabbitmq_delivery_limit=1)
        _until(lambda: _writers_blocked(migrated_pg_url) == 1, "the writer to block", [w])
        proxy.cut()
        tx.rollback()
        _until(lambda: w.text().count("requeued 2 of 2 message(s)") >= 3, "3 requeues", [w])
        proxy.restore()
        rows = {r["inspection_id"]: r for r in wait_rows(migrated_pg_url, ids, [w], timeout=90)}
        attempts = _attempts(migrated_pg_url)
        dlq = queue_depth(rabbit_url, f"{QUEUE}.dead-letter")
        assert w.proc.poll() is None, w.tail()
    finally:
        locker.close()
        proxy.close()
        dispose_engines(proxied)
        stop_workers([w])
    for iid in ids:
        assert rows[iid]["status"] == "done", (iid, rows[iid]["error"])
        assert attempts[iid] == (2, None, 0), attempts
    assert dlq == 0 and "dead-lettered" not in w.text()


def test_malformed_messages_never_stop_a_worker(
    tmp_path: Path, migrated_pg_url: str, rabbit_url: str
) -> None:
    """Every malformed message shape of part 1 that AMQP can carry, published raw with
    py-amqp between good messages: the worker stays up; each good one gets its row; each
    malformed one is its inspection's error row or a dead letter; the queue ends empty."""
    from db.dead_letters import dead_letters
    from db.session import session_scope

    images = make_images(tmp_path / "img", 2)
    ckpt = tiny_checkpoint(tmp_path, size=(48, 48))
    env = _env(tmp_path, rabbit_url, migrated_pg_url, ckpt, batch_size=4, batch_wait_ms=100)
    cases = [c for c in malformed_cases("rmal", QUEUE, images[0].name) if c.wire is not None]
    goods = [f"rgood-{i}" for i in range(len(cases) + 2)]
    w = start_worker(env, "malformed", tmp_path)
    try:
        wait_ready([w])
        _enqueue(rabbit_url, tmp_path, goods[:1], images)
        for case, good in zip(cases, goods[1:], strict=False):
            assert case.wire is not None
            publish_raw(
                rabbit_url,
                QUEUE,
                case.wire.body,
                headers=case.wire.headers,
                content_type=case.wire.content_type,
                content_encoding=case.wire.content_encoding,
            )
            _enqueue(rabbit_url, tmp_path, [good], images)
        _enqueue(rabbit_url, tmp_path, goods[-1:], images)
        recovered = [c.inspection_id for c in cases if c.inspection_id is not None]
        dead = [c for c in cases if c.inspection_id is None]
        rows = {
            r["inspection_id"]: r
            for r in wait_rows(migrated_pg_url, goods + recovered, [w], timeout=180)
        }

        def letters() -> list[dict[str, Any]]:
            with session_scope(migrated_pg_url) as s:
                return dead_letters(s, limit=None)

        _until(lambda: len(letters()) >= len(dead), "the dead letters", [w])
        _until(lambda: queue_depth(rabbit_url, QUEUE) == 0, "an empty queue", [w])
        time.sleep(1.0)
        found = letters()
        assert w.proc.poll() is None, w.tail()
        all_rows = audit_rows(migrated_pg_url)
    finally:
        stop_workers([w])
    assert "Unrecoverable error" not in w.text() and "Traceback" not in w.text(), w.tail(60)
    assert sorted(r["inspection_id"] for r in all_rows) == sorted(goods + recovered)
    assert all(rows[g]["status"] == "done" for g in goods)
    for case in cases:
        if case.inspection_id is not None:
            row = rows[case.inspection_id]
            assert row["status"] == "error" and case.reason in row["error"], (case.name, row)
    assert len(found) == len(dead)
    unmatched = list(found)
    for case in dead:
        match = [d for d in unmatched if case.reason in d["reason"] and d["stage"] == case.stage]
        assert match, (case.name, case.reason, [d["reason"] for d in unmatched])
        unmatched.remove(match[0])
    print(
        f"\nFIGURES rabbitmq/malformed: messages {len(goods) + len(cases)} (malformed "
        f"{len(cases)}), rows expected {len(goods) + len(recovered)}, rows {len(all_rows)}, "
        f"error rows {len(recovered)}, dead letters {len(found)}, duplicates 0"
    )


def test_delivery_limit_dead_letters_are_recorded(
    tmp_path: Path, migrated_pg_url: str, rabbit_url: str
) -> None:
    """``poison`` kills its pool process inside FGSM every time (test-only fault hook); with
    the quorum queue's ``x-delivery-limit`` at 1 (and the worker's own cap set higher), the
    broker dead-letters it after its second return. A worker consumes the dead-letter queue
    and records it as poison's error row, saying why; the innocent image sent with it is
    scored."""
    from worker.faults import FAULT_KILL_IN_ATTACK_ENV

    images = make_images(tmp_path / "img", 2)
    ckpt = tiny_checkpoint(tmp_path, size=(48, 48))
    env = _env(
        tmp_path,
        rabbit_url,
        migrated_pg_url,
        ckpt,
        batch_size=1,
        batch_wait_ms=50,
        rabbitmq_delivery_limit=1,
        max_redeliveries=5,
    )
    env[FAULT_KILL_IN_ATTACK_ENV] = "poison"
    w = start_worker(env, "poisoned", tmp_path)
    try:
        wait_ready([w])
        # the producer declares the queue too: same arguments, or RabbitMQ refuses
        _enqueue(rabbit_url, tmp_path, ["poison", "innocent"], images, rabbitmq_delivery_limit=1)
        rows = {
            r["inspection_id"]: r
            for r in wait_rows(migrated_pg_url, ["poison", "innocent"], [w], timeout=120)
        }
        _until(lambda: queue_depth(rabbit_url, f"{QUEUE}.dead-letter") == 0, "the DLQ empty", [w])
        assert w.proc.poll() is None, w.tail()
    finally:
        stop_workers([w])
    poison = rows["poison"]
    assert poison["status"] == "error", poison
    assert poison["error"].startswith("dead-lettered by the broker (delivery_limit)"), poison
    assert "x-delivery-limit" in poison["error"]
    assert rows["innocent"]["status"] == "done"
    text = w.text()
    assert text.count("FAULT INJECTION: pool process") == 2, w.tail(60)  # then the broker said no
    assert "dead-lettered message" in text
