"""The redelivery cap condemns no innocent (docs/reliability.md): requeues that are not worker
deaths are not counted.

The cap counts attempts that never finished (db.deliveries): an attempt is started before the
risky part (decoding and scoring) and finished right after it. With ``MAX_REDELIVERIES=0`` any
charged loss would turn the image into an error row, so each test below ends with a ``done``
row only if nothing was charged:

* a database outage longer than every retry, starting while the batch waits to write (its
  attempts finished) or while it is being scored (its attempts still open: the worker's
  requeued copy says they finished, since the database could not be told);
* a broker connection dropped while a batch waits to write (Redis through a TCP proxy of the
  test's own, which closes every connection and keeps listening, like ``CLIENT KILL``): kombu
  puts the unacknowledged messages back at once, and a second pool process scores them while
  the first still holds them.

Real worker subprocesses, a Redis server of the test's own, PostgreSQL (through a proxy of
the test's own where the database is cut off; the shared server is not touched).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from inspection_audit.settings import Settings
from tests.support.messages import good_payload
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
from tests.test_faults_services import RedisServer, TcpProxy

pytestmark = pytest.mark.slow

QUEUE = "ia-cap"


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


def _until(cond: Callable[[], bool], what: str, w: WorkerProc, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert w.proc.poll() is None, f"worker exited while waiting for {what}:\n{w.tail()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{w.tail()}"
        time.sleep(0.1)


def _attempts(url: str) -> dict[str, tuple[int, int | None, int]]:
    """inspection_id -> (attempts, open_attempt, lost), read directly (not through a proxy)."""
    from db.models import DeliveryAttempt
    from db.session import session_scope

    t = DeliveryAttempt.__table__.c
    with session_scope(url) as s:
        rows = s.execute(sa.select(t.inspection_id, t.attempts, t.open_attempt, t.lost)).all()
    return {r[0]: (int(r[1]), r[2], int(r[3])) for r in rows}


def _writers_blocked(url: str) -> int:
    """Ungranted locks in this test's own database (the writers waiting on our table lock)."""
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


def _enqueue(broker: str, tmp_path: Path, ids: list[str], images: list[Path]) -> None:
    from producer.api import enqueue_many, reset_apps

    s = Settings(broker_url=broker, queue=QUEUE, image_roots=[tmp_path / "img"], home=tmp_path)
    try:
        enqueue_many(
            [good_payload(i, p.name) for i, p in zip(ids, images, strict=True)], settings=s
        )
    finally:
        reset_apps()


def _proxied(url: str, proxy: TcpProxy) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(port=proxy.port).render_as_string(hide_password=False)


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
            "max_redeliveries": 0,  # any charged loss would make an error row
            **extra,
        }
    )


@pytest.mark.parametrize("when", ["writing", "scoring"])
def test_requeue_after_database_outage_is_not_charged(
    tmp_path: Path, migrated_pg_url: str, private_redis: RedisServer, when: str
) -> None:
    """The database goes away for longer than every retry, while a batch of 2 waits to write
    (a table lock holds it there) or while it is being scored (the fault hook holds it inside
    FGSM): the batch is requeued, and once the database is back both images are scored
    normally (``done``, second attempt, nothing lost) although ``MAX_REDELIVERIES`` is 0."""
    from db.session import dispose_engines, make_engine
    from worker.faults import FAULT_HOLD_IN_ATTACK_ENV

    images = make_images(tmp_path / "img", 2)
    ckpt = tiny_checkpoint(tmp_path, size=(48, 48))
    proxy = TcpProxy(("127.0.0.1", sa.engine.make_url(migrated_pg_url).port or 5432))
    proxied = _proxied(migrated_pg_url, proxy)
    ids = [f"cap-{when}-{i}" for i in range(2)]
    release = tmp_path / "release"
    env = _env(
        tmp_path,
        private_redis.url,
        proxied,
        ckpt,
        batch_size=2,
        batch_wait_ms=500,
        task_max_retries=2,  # about 1 s of backoff: the outage outlasts every retry
        retry_backoff_max_s=1,
    )
    if when == "scoring":
        env[FAULT_HOLD_IN_ATTACK_ENV] = f"{','.join(ids)}@{release}"
    w = start_worker(env, f"outage-{when}", tmp_path)
    locker = make_engine(migrated_pg_url).connect()
    tx = locker.begin()
    try:
        wait_ready([w])
        if when == "writing":
            locker.exec_driver_sql("LOCK TABLE audits IN EXCLUSIVE MODE")
        _enqueue(private_redis.url, tmp_path, ids, images)
        if when == "writing":
            # scored, attempts finished, waiting for our lock to write
            _until(lambda: _writers_blocked(migrated_pg_url) > 0, "the writer to block", w)
            assert _attempts(migrated_pg_url) == {i: (1, None, 0) for i in ids}
        else:
            _until(lambda: "holds in FGSM" in w.text(), "scoring to be held", w)
            assert _attempts(migrated_pg_url) == {i: (1, 1, 0) for i in ids}  # open
        proxy.cut()  # the database is gone: connections dropped, new ones refused
        tx.rollback()
        release.touch()
        _until(
            lambda: "requeueing the messages whose rows are not written" in w.text(), "a requeue", w
        )
        _until(lambda: w.text().count("requeued 2 of 2 message(s)") >= 2, "a second requeue", w)
        assert audit_rows(migrated_pg_url, ids) == []
        proxy.restore()
        rows = {r["inspection_id"]: r for r in wait_rows(migrated_pg_url, ids, [w], timeout=90)}
        time.sleep(0.5)
        attempts = _attempts(migrated_pg_url)
        assert w.proc.poll() is None, w.tail()
    finally:
        locker.close()
        proxy.close()
        dispose_engines(proxied)
        stop_workers([w])
    for iid in ids:
        assert rows[iid]["status"] == "done", (iid, rows[iid]["error"], w.tail(40))
        assert rows[iid]["delivery_count"] == 2 and rows[iid]["duplicate_count"] == 0
        assert attempts[iid] == (2, None, 0), attempts  # two attempts, both finished, none lost
    text = w.text()
    assert "giving up" not in text and "never finished; working on it alone" not in text
    assert private_redis.unacked() == 0 and private_redis.queue(QUEUE) == []


_CONSUMING = ("brpop", "blpop", "psubscribe", "subscribe")


def _consuming_connections(server: RedisServer) -> set[int]:
    """Ids of the connections waiting on the server (``BRPOP``, or subscribed for Celery's
    remote control): what a worker's event loop watches."""
    import contextlib

    with contextlib.closing(server.client()) as c:
        return {int(cl["id"]) for cl in c.client_list() if cl.get("cmd") in _CONSUMING}


def _client_kill(server: RedisServer, ids: set[int]) -> None:
    """``CLIENT KILL ID`` each of ``ids`` on the test's own Redis (the server stays up)."""
    import contextlib

    with contextlib.closing(server.client()) as c:
        for cid in ids:
            c.client_kill_filter(_id=cid)


def test_broker_connection_dropped_is_not_charged(
    tmp_path: Path, migrated_pg_url: str, private_redis: RedisServer
) -> None:
    """While worker A's batch of 3 waits to write, Redis drops A's consuming connection
    (``CLIENT KILL`` on the test's own server, which stays up, as in the trial that found
    this): A reconnects and kombu puts the 3 unacknowledged messages back at once; worker B
    scores the copies it gets while A still holds the originals. Nobody died, so nothing is
    charged: with ``MAX_REDELIVERIES=0`` all 3 end ``done``, once each, each second copy
    counted as a duplicate."""
    from db.session import make_engine

    images = make_images(tmp_path / "img", 3)
    ckpt = tiny_checkpoint(tmp_path, size=(48, 48))
    ids = [f"drop-{i}" for i in range(3)]
    env = _env(tmp_path, private_redis.url, migrated_pg_url, ckpt, batch_size=3, batch_wait_ms=300)
    a = start_worker(env, "dropped", tmp_path)
    workers = [a]
    locker = make_engine(migrated_pg_url).connect()
    tx = locker.begin()
    try:
        wait_ready([a])
        locker.exec_driver_sql("LOCK TABLE audits IN EXCLUSIVE MODE")
        _enqueue(private_redis.url, tmp_path, ids, images)
        _until(lambda: _writers_blocked(migrated_pg_url) == 1, "A's writer to block", a)
        assert _attempts(migrated_pg_url) == {i: (1, None, 0) for i in ids}
        of_a = _consuming_connections(private_redis)  # A's window is full: no BRPOP now
        assert of_a, "worker A watches no connection"
        b = start_worker(env, "other", tmp_path)
        workers.append(b)
        wait_ready([b])
        assert private_redis.unacked() == 3 and private_redis.queue(QUEUE) == []
        _client_kill(private_redis, of_a)  # A's event loop sees its connection lost
        _until(lambda: "Restoring 3 unacknowledged" in a.text(), "kombu to put them back", a)
        # B scores the copies it got while A holds the originals: a second attempt, not lost
        _until(
            lambda: any(v[0] == 2 for v in _attempts(migrated_pg_url).values()),
            "a copy to be scored",
            b,
        )
        tx.rollback()
        wait_rows(migrated_pg_url, ids, workers, timeout=60)
        deadline = time.monotonic() + 30
        while sum(r["duplicate_count"] for r in audit_rows(migrated_pg_url, ids)) < 3:
            assert time.monotonic() < deadline, "\n".join(w.tail() for w in workers)
            time.sleep(0.2)
        time.sleep(0.5)
        rows = {r["inspection_id"]: r for r in audit_rows(migrated_pg_url, ids)}
        attempts = _attempts(migrated_pg_url)
        _until(lambda: private_redis.unacked() == 0, "every message acknowledged", a, 30)
        assert all(w.proc.poll() is None for w in workers)
    finally:
        locker.close()
        stop_workers(workers)
    assert sorted(rows) == ids
    for iid in ids:
        r = rows[iid]
        assert r["status"] == "done" and r["error"] is None, (iid, r["error"])
        assert r["duplicate_count"] == 1, r  # the original and one copy, one row
        assert attempts[iid][1:] == (None, 0), attempts  # nothing open, nothing lost
        assert r["delivery_count"] == attempts[iid][0]
    text = a.text() + b.text()
    assert "Connection to broker lost" in a.text()
    assert "giving up" not in text and "never finished; working on it alone" not in text
    assert private_redis.queue(QUEUE) == []
