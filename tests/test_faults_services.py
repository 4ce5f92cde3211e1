"""Faults of the services around the pipeline (docs/reliability.md): the database unreachable
for ~10 s while a worker runs, and Redis restarting while a producer enqueues.

Nothing here stops a shared server (docs/design.md §8): the database outage is a TCP proxy owned by the
test between the worker and PostgreSQL, and the Redis that restarts is a ``redis-server`` the
test starts on a free port of its own. The helper :class:`RedisServer` is used by the other
``test_faults_*`` modules too.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

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


# --- helpers: a Redis server of the test's own ----------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A ``redis-server`` owned by a test, on its own port and folder.

    ``persistent=False``: ``--save "" --appendonly no`` (like the shared server: a restart
    loses everything). ``persistent=True``: AOF with ``appendfsync always`` (like the compose
    file), so a restart after SIGKILL keeps every write the server acknowledged.
    """

    def __init__(self, folder: Path, *, persistent: bool = False) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.persistent = persistent
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed")
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)]
        args += ["--save", "", "--logfile", str(self.folder / "redis.log")]
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with contextlib.closing(self.client()) as c:
                    if c.ping():
                        return
            except Exception:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL (no shutdown save, like a crash or an OOM kill)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def client(self) -> Any:
        import redis

        return redis.Redis(
            host="127.0.0.1", port=self.port, socket_connect_timeout=2, socket_timeout=5
        )

    def queue_ids(self, queue: str) -> list[str]:
        """The inspection ids waiting in ``queue``, oldest first (see tests.support.queue)."""
        return [e["decoded_body"][0][0]["inspection_id"] for e in self.queue(queue)]

    def queue(self, queue: str) -> list[dict[str, Any]]:
        from tests.support.queue import redis_queue_messages

        return redis_queue_messages(queue, url=self.url)

    def unacked(self) -> int:
        """Messages delivered to a consumer and not acknowledged yet (kombu's ``unacked`` hash)."""
        with contextlib.closing(self.client()) as c:
            return int(c.hlen("unacked"))


# --- helpers: a TCP proxy that can cut the database off ---------------------------------------------
class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``upstream`` in threads; :meth:`cut` closes the listening
    socket and every open connection (the port then refuses connections), :meth:`restore`
    listens again on the same port."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = free_port()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._closed = False
        self.restore()

    def restore(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def drop(self) -> None:
        """Close every open connection but keep listening, as Redis's ``CLIENT KILL`` or a
        broker restarting behind a load balancer does: clients can reconnect at once."""
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def close(self) -> None:
        self._closed = True
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    client.close()
                    server.close()
                    return
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


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


def _pool_pids(main_pid: int) -> set[int]:
    """Children of a worker's main process (its prefork pool processes)."""
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(main_pid)], capture_output=True, text=True, check=False
    )
    return {int(p) for p in out.stdout.split()}


# --- case 4: PostgreSQL unreachable for ~10 s ---------------------------------------------------------
@pytest.mark.slow
def test_postgres_unreachable_10s_is_retried_and_nothing_lost(
    tmp_path: Path, migrated_pg_url: str, queue_settings: Settings
) -> None:
    """The worker reaches PostgreSQL through a proxy; the proxy drops every connection and
    refuses new ones for 10 s while messages arrive. The pool process retries with backoff
    (no process dies), and once the database is back every inspection has exactly one row."""
    from sqlalchemy.engine import make_url

    from db.session import dispose_engines
    from producer.api import enqueue_many, reset_apps

    images = make_images(tmp_path / "img", 7)
    ckpt = tiny_checkpoint(tmp_path, size=(48, 48))
    proxy = TcpProxy(("127.0.0.1", make_url(migrated_pg_url).port or 5432))
    proxied = make_url(migrated_pg_url).set(port=proxy.port).render_as_string(hide_password=False)
    env = worker_env(
        {
            "broker_url": queue_settings.broker_url,
            "queue": queue_settings.queue,
            "database_url": proxied,
            "model": ckpt,
            "image_roots": tmp_path / "img",
            "home": tmp_path / "home",
            "torch_threads": 1,
            "batch_size": 2,
            "batch_wait_ms": 100,
            "task_max_retries": 20,  # >= 0.25 + 0.5 + 18 × 1 s of backoff: outlasts the outage
            "retry_backoff_max_s": 2,
        }
    )
    qs = queue_settings.model_copy(update={"image_roots": [tmp_path / "img"]})
    w = start_worker(env, "pgproxy", tmp_path)
    try:
        wait_ready([w])
        before = enqueue_many([_msg(f"pgp-{i}", images[i].name) for i in range(3)], settings=qs)
        rows = wait_rows(migrated_pg_url, before, [w], timeout=60)
        pool = _pool_pids(w.proc.pid)
        assert {int(r["worker_host"].rsplit(":", 1)[1]) for r in rows} <= pool

        proxy.cut()
        t_cut = time.monotonic()
        during = enqueue_many([_msg(f"pgp-{i}", images[i].name) for i in range(3, 7)], settings=qs)
        reset_apps()
        while time.monotonic() - t_cut < 10.0:
            assert w.proc.poll() is None, w.tail()
            time.sleep(0.5)
        assert "database fault" in w.text(), w.tail()
        assert audit_rows(migrated_pg_url, during) == []  # nothing got through the cut
        proxy.restore()
        rows = wait_rows(migrated_pg_url, before + during, [w], timeout=60)
        assert w.proc.poll() is None, w.tail()
        assert _pool_pids(w.proc.pid) == pool  # no pool process died or was replaced
    finally:
        proxy.close()
        dispose_engines(proxied)
        stop_workers([w])
    assert sorted(r["inspection_id"] for r in rows) == sorted(before + during)  # one row each
    assert all(r["status"] == "done" for r in rows), [r["error"] for r in rows]
    assert {int(r["worker_host"].rsplit(":", 1)[1]) for r in rows} <= pool
    assert all(r["duplicate_count"] == 0 for r in rows)
    text = w.text()
    assert "database fault (OperationalError" in text, w.tail()
    assert "WorkerLostError" not in text and "still failing after" not in text, w.tail()


# --- case 5: Redis restarts while a producer enqueues -------------------------------------------------
def _producer_settings(server: RedisServer, tmp_path: Path, timeout_s: float) -> Settings:
    return Settings(
        broker_url=server.url,
        queue="ia-faults-producer",
        image_roots=[tmp_path / "img"],
        home=tmp_path / "home",
        enqueue_timeout_s=timeout_s,
    )


@pytest.mark.parametrize("persistent", [True, False], ids=["aof", "no-persistence"])
def test_redis_down_longer_than_enqueue_timeout_raises_with_exact_sent_ids(
    tmp_path: Path, persistent: bool
) -> None:
    """Redis is killed after the 4th of 10 messages and stays down past ``enqueue_timeout_s``:
    ``enqueue_many`` raises ``EnqueueError`` in bounded time, and ``sent_ids`` are exactly the
    messages the broker held at the moment it died. With AOF they are all still there after a
    restart, and nothing else is; without persistence a restart loses them (that is Redis,
    not the producer: the compose file runs Redis with AOF)."""
    from producer.api import EnqueueError, enqueue_many, reset_apps

    images = make_images(tmp_path / "img", 1)
    server = RedisServer(tmp_path / "redis", persistent=persistent)
    server.start()
    s = _producer_settings(server, tmp_path, timeout_s=2.0)
    ids = [f"rr-{i}" for i in range(10)]
    held: list[str] = []

    def on_sent(msg: Any) -> None:
        if msg.inspection_id == "rr-3":
            held.extend(server.queue_ids(s.queue))
            server.kill()

    try:
        t0 = time.monotonic()
        with pytest.raises(EnqueueError) as ei:
            enqueue_many([_msg(i, images[0].name) for i in ids], settings=s, on_sent=on_sent)
        took = time.monotonic() - t0
        err = ei.value
        assert held == ids[:4]
        assert err.sent_ids == ids[:4] and err.total == 10
        assert "4 of 10 message(s) were sent" in str(err)
        assert took < 2.0 + 8.0, took  # the timeout, plus connection attempts and start-up
        server.start()  # the same port and folder
        after = server.queue_ids(s.queue)
        assert after == (err.sent_ids if persistent else [])
    finally:
        reset_apps()
        server.kill()


@pytest.mark.parametrize("persistent", [True, False], ids=["aof", "no-persistence"])
def test_redis_back_within_enqueue_timeout_send_succeeds(tmp_path: Path, persistent: bool) -> None:
    """Redis is killed after the 4th of 10 messages and is back 1.5 s later, inside
    ``enqueue_timeout_s``: the producer reconnects and every message is sent. Each message
    reported sent is in Redis (with AOF: all ten, in order; without persistence: the six sent
    after the restart, the restart having lost the first four)."""
    from producer.api import enqueue_many, reset_apps

    images = make_images(tmp_path / "img", 1)
    server = RedisServer(tmp_path / "redis", persistent=persistent)
    server.start()
    s = _producer_settings(server, tmp_path, timeout_s=10.0)
    ids = [f"rb-{i}" for i in range(10)]
    restarter: list[threading.Thread] = []

    def on_sent(msg: Any) -> None:
        if msg.inspection_id == "rb-3":
            assert server.queue_ids(s.queue) == ids[:4]
            server.kill()
            t = threading.Thread(target=lambda: (time.sleep(1.5), server.start()), daemon=True)
            t.start()
            restarter.append(t)

    try:
        t0 = time.monotonic()
        sent = enqueue_many([_msg(i, images[0].name) for i in ids], settings=s, on_sent=on_sent)
        took = time.monotonic() - t0
        assert sent == ids
        assert 1.5 <= took < 10.0 + 5.0, took
        after = server.queue_ids(s.queue)
        assert after == (ids if persistent else ids[4:])
    finally:
        for t in restarter:
            t.join(20)
        reset_apps()
        server.kill()
