"""Engines and sessions: :func:`make_engine`, :func:`session_scope`, :func:`dispose_engines`.

One engine per database URL per process. Engines must not cross a ``fork``: Celery's prefork
pool forks workers after the parent may have connected, so a worker calls
:func:`dispose_engines` in ``worker_process_init``; an engine inherited from another process is
dropped without closing the parent's sockets (``dispose(close=False)``), and :func:`make_engine`
notices a fork on its own as well.

SQLite is configured so that several worker processes can write to one file: WAL journal,
``busy_timeout`` of 30 s, foreign keys on, and every transaction opened with
``BEGIN IMMEDIATE`` (a writer takes the write lock up front and waits for it, instead of failing
with "database is locked" when it upgrades a read transaction).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000

_lock = threading.Lock()
# url -> (pid that created it, engine, session factory)
_engines: dict[str, tuple[int, Engine, sessionmaker[Session]]] = {}


def _ensure_sqlite_folder(url: str) -> None:
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return
    if database.startswith("file:"):
        return
    Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy (the "begin" hook below) decide when transactions start.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _create(url: str) -> Engine:
    _ensure_sqlite_folder(url)
    backend = make_url(url).get_backend_name()
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if backend == "sqlite":
        kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
    engine = create_engine(url, **kwargs)
    if backend == "sqlite":
        _configure_sqlite(engine)
    return engine


def make_engine(url: str) -> Engine:
    """Return this process's engine for ``url``, creating it on first use.

    Engines are cached per URL and per process (an engine created before a ``fork`` is
    replaced, never reused, in the child). For SQLite the file's parent folder is created and
    WAL, a 30 s busy timeout, foreign keys and ``BEGIN IMMEDIATE`` transactions are set up.
    ``pool_pre_ping`` is on for every backend.

    Raises ``sqlalchemy.exc.ArgumentError`` for a malformed URL and ``ModuleNotFoundError``
    when the URL's driver is not installed.
    """
    pid = os.getpid()
    with _lock:
        cached = _engines.get(url)
        if cached is not None:
            owner, engine, _ = cached
            if owner == pid:
                return engine
            engine.dispose(close=False)
        engine = _create(url)
        _engines[url] = (pid, engine, sessionmaker(bind=engine, expire_on_commit=False))
        return engine


def _session_factory(url: str) -> sessionmaker[Session]:
    make_engine(url)
    with _lock:
        return _engines[url][2]


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """Yield a :class:`~sqlalchemy.orm.Session` on ``url`` as one transaction.

    ``sessionmaker.begin()``: commits when the block ends normally, rolls back and re-raises
    when it raises, and always closes the session. Objects stay usable after the commit (``expire_on_commit`` is
    off). Database errors propagate as ``sqlalchemy.exc`` exceptions.
    """
    with _session_factory(url).begin() as session:
        yield session


def dispose_engines(url: str | None = None) -> None:
    """Dispose the cached engine for ``url``, or every cached engine when ``url`` is None.

    Call it in Celery's ``worker_process_init`` (after the fork) and before dropping a
    database. An engine created by this process closes its pooled connections; one inherited
    from a parent process is dropped with ``dispose(close=False)``, so the parent's
    connections stay intact. The next :func:`make_engine` creates a fresh engine.
    """
    pid = os.getpid()
    with _lock:
        urls = list(_engines) if url is None else [url] if url in _engines else []
        for key in urls:
            owner, engine, _ = _engines.pop(key)
            engine.dispose(close=owner == pid)
