"""Concurrent writers of one audit key end with exactly one row (DESIGN §6)."""

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

from db.models import Audit
from db.repository import get_audit, upsert_audit
from db.session import session_scope
from tests.test_db_repository import MV, add_inspection, done_row

ROOT = Path(__file__).resolve().parents[1]


def test_second_writer_waits_for_first_and_counts_a_duplicate(migrated_url: str) -> None:
    """T1 inserts and holds its transaction open; T2's upsert of the same key blocks on it,
    then finds the committed row and counts a duplicate instead of inserting a second one."""
    add_inspection(migrated_url, "A")
    t1_inserted = threading.Event()
    t2_starting = threading.Event()
    results: dict[str, object] = {}

    def t1() -> None:
        try:
            with session_scope(migrated_url) as s:
                results["t1"] = upsert_audit(s, done_row("A", 0.9, True, worker_host="t1"))
                t1_inserted.set()
                t2_starting.wait(10)
                time.sleep(0.5)  # T2 is now blocked on our uncommitted row
        except BaseException as exc:  # pragma: no cover - reported below
            results["t1"] = exc
            t1_inserted.set()

    def t2() -> None:
        try:
            t1_inserted.wait(10)
            t2_starting.set()
            start = time.monotonic()
            with session_scope(migrated_url) as s:
                results["t2"] = upsert_audit(s, done_row("A", 0.1, False, worker_host="t2"))
            results["t2_waited"] = time.monotonic() - start
        except BaseException as exc:  # pragma: no cover - reported below
            results["t2"] = exc

    threads = [threading.Thread(target=t1), threading.Thread(target=t2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results["t1"] is True, results
    assert results["t2"] is False, results
    assert float(results["t2_waited"]) >= 0.3  # type: ignore[arg-type]
    with session_scope(migrated_url) as s:
        assert s.execute(sa.select(sa.func.count()).select_from(Audit)).scalar_one() == 1
        row = get_audit(s, "A", MV, "iou_gap_adv")
    assert row is not None
    assert row["duplicate_count"] == 1 and row["worker_host"] == "t1"


WRITER = textwrap.dedent(
    """
    import sys, time
    from datetime import UTC, datetime
    from db.repository import upsert_audit, upsert_inspection
    from db.session import session_scope
    url, start_at, name = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    from db.session import make_engine
    make_engine(url).connect().close()
    time.sleep(max(0.0, start_at - time.time()))
    with session_scope(url) as s:
        upsert_inspection(s, inspection_id="P", image_ref="p.png", line="L", station="S",
                          captured_at=datetime(2026, 1, 1, tzinfo=UTC), prediction="ok", score=0.2)
        new = upsert_audit(s, {"inspection_id": "P", "model_version": "v", "method": "m",
                               "status": "done", "decision_score": 0.5, "worker_host": name,
                               "suspected_false_negative": True})
    print("NEW" if new else "DUP")
    """
)


@pytest.mark.parametrize("fixture", ["migrated_pg_url", "migrated_sqlite_url"])
def test_concurrent_processes_one_row(fixture: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue(fixture)
    n = 4
    start_at = time.time() + 4.0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, url, str(start_at), f"p{i}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for i in range(n)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(out.strip())
    assert sorted(outs) == ["DUP"] * (n - 1) + ["NEW"]
    with session_scope(url) as s:
        rows = s.execute(sa.select(Audit)).scalars().all()
        assert len(rows) == 1
        assert rows[0].duplicate_count == n - 1
