"""Concurrent writers of one audit key end with exactly one row (docs/design.md §6).

No test here waits a fixed time: the first writer holds its transaction open until the second
is *observed* blocked on it (PostgreSQL: an ungranted lock of this test's own database in
``pg_locks``; SQLite: the second writer's thread sitting inside the driver's ``execute``),
and the writer processes start together on a barrier (each says READY, then all get GO).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from db.models import Audit
from db.repository import get_audit, upsert_audit
from db.session import session_scope
from inspection_audit.procs import wait_for
from tests.test_db_repository import MV, add_inspection, done_row

ROOT = Path(__file__).resolve().parents[1]


def _blocked(url: str, thread: threading.Thread) -> bool:
    """Whether ``thread`` is waiting on a database lock of ``url``'s own database."""
    if make_url(url).get_backend_name() == "postgresql":
        with sa.create_engine(url, poolclass=sa.pool.NullPool).connect() as conn:
            waiting = conn.exec_driver_sql(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE NOT l.granted AND a.datname = current_database()"
            ).scalar_one()
        return bool(waiting)
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:  # SQLite: blocked in its busy handler, inside execute()
        code = frame.f_code
        if code.co_name in ("do_execute", "execute") and "sqlalchemy" in code.co_filename:
            return True
        frame = frame.f_back
    return False


def test_second_writer_waits_for_first_and_counts_a_duplicate(migrated_url: str) -> None:
    """T1 inserts and holds its transaction open; T2's upsert of the same key blocks on it,
    then finds the committed row and counts a duplicate instead of inserting a second one."""
    add_inspection(migrated_url, "A")
    t1_inserted = threading.Event()
    t2_blocked = threading.Event()
    results: dict[str, object] = {}
    holder: dict[str, threading.Thread] = {}

    def t1() -> None:
        try:
            with session_scope(migrated_url) as s:
                results["t1"] = upsert_audit(s, done_row("A", 0.9, True, worker_host="t1"))
                t1_inserted.set()
                # hold the transaction until T2 is seen waiting on it
                seen = wait_for(lambda: _blocked(migrated_url, holder["t2"]), timeout=30)
                results["t2_seen_blocked"] = seen
                t2_blocked.set()
        except BaseException as exc:  # pragma: no cover - reported below
            results["t1"] = exc
            t1_inserted.set()

    def t2() -> None:
        try:
            t1_inserted.wait(10)
            with session_scope(migrated_url) as s:
                results["t2"] = upsert_audit(s, done_row("A", 0.1, False, worker_host="t2"))
            results["t2_after_t1"] = t2_blocked.is_set()
        except BaseException as exc:  # pragma: no cover - reported below
            results["t2"] = exc

    threads = [threading.Thread(target=t1), threading.Thread(target=t2)]
    holder["t2"] = threads[1]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results["t1"] is True, results
    assert results["t2"] is False, results
    assert results["t2_seen_blocked"] is True and results["t2_after_t1"] is True, results
    with session_scope(migrated_url) as s:
        assert s.execute(sa.select(sa.func.count()).select_from(Audit)).scalar_one() == 1
        row = get_audit(s, "A", MV, "iou_gap_adv")
    assert row is not None
    assert row["duplicate_count"] == 1 and row["worker_host"] == "t1"


WRITER = textwrap.dedent(
    """
    import sys
    from datetime import UTC, datetime
    from db.repository import upsert_audit, upsert_inspection
    from db.rows import AuditRow, InspectionRow
    from db.session import make_engine, session_scope
    url, name = sys.argv[1], sys.argv[2]
    make_engine(url).connect().close()
    print("READY", flush=True)
    assert sys.stdin.readline().strip() == "GO"
    with session_scope(url) as s:
        upsert_inspection(s, InspectionRow("P", "p.png", "L", "S",
                                           datetime(2026, 1, 1, tzinfo=UTC), "ok", 0.2))
        new = upsert_audit(s, AuditRow("P", "v", "m", "done", decision_score=0.5,
                                       worker_host=name, suspected_false_negative=True))
    print("NEW" if new else "DUP", flush=True)
    """
)


@pytest.mark.parametrize("fixture", ["migrated_pg_url", "migrated_sqlite_url"])
def test_concurrent_processes_one_row(fixture: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue(fixture)
    n = 4
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, url, f"p{i}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for i in range(n)
    ]
    try:
        for p in procs:  # the barrier: every writer connected and waiting
            assert p.stdout is not None
            line = p.stdout.readline().strip()
            assert line == "READY", (line, p.stderr.read() if p.stderr else "")
        start = time.monotonic()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("GO\n")
            p.stdin.flush()
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            outs.append(out.strip())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert time.monotonic() - start < 120
    assert sorted(outs) == ["DUP"] * (n - 1) + ["NEW"]
    with session_scope(url) as s:
        rows = s.execute(sa.select(Audit)).scalars().all()
        assert len(rows) == 1
        assert rows[0].duplicate_count == n - 1
