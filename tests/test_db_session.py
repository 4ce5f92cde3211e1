"""Sessions and engines: SQLite settings, caching, transactions, fork safety."""

from __future__ import annotations

import multiprocessing
import os

import pytest
import sqlalchemy as sa

from db.session import dispose_engines, make_engine, session_scope


def test_sqlite_pragmas(sqlite_url: str) -> None:
    with make_engine(sqlite_url).connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_engine_cached_per_url(sqlite_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    other = f"sqlite:///{(tmp_path / 'other.sqlite3').as_posix()}"
    try:
        assert make_engine(sqlite_url) is make_engine(sqlite_url)
        assert make_engine(other) is not make_engine(sqlite_url)
        first = make_engine(sqlite_url)
        dispose_engines(sqlite_url)
        assert make_engine(sqlite_url) is not first
    finally:
        dispose_engines(other)


def test_session_scope_commits_and_rolls_back(migrated_url: str) -> None:
    from tests.test_db_repository import add_inspection

    add_inspection(migrated_url, "kept")
    with pytest.raises(RuntimeError), session_scope(migrated_url) as s:
        s.execute(sa.text("DELETE FROM inspections"))
        raise RuntimeError("boom")
    with session_scope(migrated_url) as s:
        ids = s.execute(sa.text("SELECT inspection_id FROM inspections")).scalars().all()
    assert ids == ["kept"]


def _child(url: str, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    try:
        dispose_engines()  # what Celery's worker_process_init does
        with make_engine(url).connect() as conn:
            queue.put((os.getpid(), conn.exec_driver_sql("SELECT 41 + 1").scalar()))
    except BaseException as exc:  # pragma: no cover - reported to the parent
        queue.put(("error", repr(exc)))


def test_fork_then_dispose_leaves_parent_connections_alive(pg_url: str) -> None:
    engine = make_engine(pg_url)
    with engine.connect() as conn:  # put a connection in the parent's pool
        backend = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(pg_url, queue))
    proc.start()
    pid, value = queue.get(timeout=60)
    proc.join(60)
    assert proc.exitcode == 0 and value == 42, (pid, value)
    # the parent's pooled connection survived the child (pre-ping would otherwise have
    # replaced it by a new one, with another backend pid)
    assert make_engine(pg_url) is engine
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() == backend
