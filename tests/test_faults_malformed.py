"""No message stops a worker (docs/reliability.md): malformed entries pushed straight into a
Redis list, between good messages, with a real worker subprocess.

Before this, an entry that was not JSON, a body that was JSON ``null`` or ``{}`` and several
other shapes raised in the worker's main process ("Unrecoverable error", exit 1); the entry
went back on the queue and stopped the next worker too. Here every shape of
tests/support/messages.py (43 of them, the three of the issue among them) is pushed with
``LPUSH`` between good messages sent by the producer, on a Redis server of the test's own (so
kombu's global ``unacked`` hash is the test's alone) and PostgreSQL. The worker stays up, every
good message gets its ``done`` row, each malformed one whose bytes still hold a usable
``inspection_id`` becomes that inspection's ``error`` row saying what was wrong, each other one
a dead letter (reason, first bytes, time) visible in SQL and counted for the metrics; nothing is
left in the queue or unacknowledged. Text a database cannot store (NUL, an unpaired surrogate)
is refused where the message is parsed, naming the field.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from inspection_audit.settings import Settings
from tests.support.messages import Case, Wire, good_payload, malformed_cases
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
from tests.test_faults_services import RedisServer

pytestmark = pytest.mark.slow

QUEUE = "ia-malformed"


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


def dead_letter_rows(url: str) -> list[dict[str, Any]]:
    from db.dead_letters import dead_letters
    from db.session import session_scope

    with session_scope(url) as s:
        return dead_letters(s, limit=None)


def test_malformed_entries_never_stop_the_worker_and_each_is_accounted_for(
    tmp_path: Path, migrated_pg_url: str, private_redis: RedisServer
) -> None:
    from db.repository import dead_letter_count, dead_letter_counts_by_stage
    from db.session import session_scope
    from producer.api import enqueue_many, reset_apps

    images = make_images(tmp_path / "img", 3)
    ckpt = tiny_checkpoint(tmp_path, size=(48, 48))
    cases = malformed_cases("mal", QUEUE, images[0].name)
    # text a database cannot store, sent raw: refused at parsing, naming the field
    unstorable = {
        "mal-nul-model-version": ("model_version", "v1\x00"),
        "mal-surrogate-station": ("station", "S\ud800"),
        "mal-surrogate-path": ("image_path", "img-\udcff.png"),
    }
    env = worker_env(
        {
            "broker_url": private_redis.url,
            "queue": QUEUE,
            "database_url": migrated_pg_url,
            "model": ckpt,
            "image_roots": tmp_path / "img",
            "home": tmp_path / "home",
            "torch_threads": 1,
            "batch_size": 4,
            "batch_wait_ms": 100,
        }
    )
    s = Settings(
        broker_url=private_redis.url, queue=QUEUE, image_roots=[tmp_path / "img"], home=tmp_path
    )
    before = [f"good-before-{i}" for i in range(3)]
    between = [f"good-between-{i}" for i in range(len(cases))]
    after = [f"good-after-{i}" for i in range(3)]
    w = start_worker(env, "malformed", tmp_path)
    try:
        wait_ready([w])
        msgs = [good_payload(i, images[n % 3].name) for n, i in enumerate(before)]
        enqueue_many(msgs, settings=s)
        with private_redis.client() as redis:
            for case, good in zip(cases, between, strict=True):
                redis.lpush(QUEUE, case.redis_entry(QUEUE))
                redis.lpush(QUEUE, Wire.task(good_payload(good, images[1].name)).redis_entry(QUEUE))
            for iid, (field, value) in unstorable.items():
                bad = {**good_payload(iid, images[2].name), field: value}
                entry = Wire(json.dumps([[bad], {}, None]).encode()).redis_entry(QUEUE)
                redis.lpush(QUEUE, entry)
        enqueue_many([good_payload(i, images[n % 3].name) for n, i in enumerate(after)], settings=s)
        recovered = [c.inspection_id for c in cases if c.inspection_id is not None]
        ids = before + between + after + recovered + list(unstorable)
        rows = {r["inspection_id"]: r for r in wait_rows(migrated_pg_url, ids, [w], timeout=180)}
        dead = [c for c in cases if c.inspection_id is None]
        deadline = time.monotonic() + 60
        while len(dead_letter_rows(migrated_pg_url)) < len(dead):
            assert w.proc.poll() is None, w.tail()
            assert time.monotonic() < deadline, w.tail()
            time.sleep(0.3)
        deadline = time.monotonic() + 30
        while private_redis.unacked() or private_redis.queue(QUEUE):
            assert time.monotonic() < deadline, "messages left in the queue or unacknowledged"
            time.sleep(0.3)
        time.sleep(1.0)  # anything extra (a duplicate row, a second dead letter) shows up now
        assert w.proc.poll() is None, f"the worker stopped:\n{w.tail()}"
        all_rows = audit_rows(migrated_pg_url)
        letters = dead_letter_rows(migrated_pg_url)
        with session_scope(migrated_pg_url) as session:
            counted = dead_letter_count(session)
            by_stage = dead_letter_counts_by_stage(session)
            in_sql = session.execute(sa.text("SELECT count(*) FROM dead_letters")).scalar_one()
    finally:
        reset_apps()
        stop_workers([w])
    log = w.text()
    assert "Unrecoverable error" not in log and "Traceback" not in log, w.tail(80)

    # every good message: one done row; each recovered case: one error row saying why
    assert sorted(r["inspection_id"] for r in all_rows) == sorted(ids)  # nothing else, once each
    for iid in before + between + after:
        assert rows[iid]["status"] == "done", rows[iid]
    by_name = {c.name: c for c in cases}
    for case in cases:
        if case.inspection_id is None:
            continue
        row = rows[case.inspection_id]
        assert row["status"] == "error", (case.name, row)
        assert row["error"].startswith("malformed message: "), row["error"]
        assert case.reason in row["error"], (case.name, row["error"])
    for iid, (field, _) in unstorable.items():
        err = rows[iid]["error"]
        assert rows[iid]["status"] == "error" and err.startswith("invalid inspection message")
        assert f"{field}: contains " in err, err  # named at parsing ...
        assert "could not be stored" not in err and "NUL (0x00)" not in err, err  # ... not by PG

    # each other case: one dead letter with its reason, stage and first bytes
    assert counted == in_sql == len(letters) == len(dead), (counted, in_sql, len(dead))
    assert sum(by_stage.values()) == len(dead)
    unmatched = list(letters)
    for case in dead:
        # a transport stand-in keeps the entry's own first bytes and its size
        match = [
            d
            for d in unmatched
            if case.reason in d["reason"]
            and d["stage"] == case.stage
            and (
                case.raw is None
                or (d["raw"] == case.raw[: len(d["raw"])] and d["raw_size"] == len(case.raw))
            )
        ]
        assert match, (case.name, case.stage, case.reason, [d["reason"] for d in unmatched])
        letter = match[0]
        unmatched.remove(letter)
        assert letter["queue"] == QUEUE and letter["worker_host"]
        assert letter["received_at"] is not None
    assert unmatched == []
    assert by_name["mal-deep"].raw is not None and len(by_name["mal-deep"].raw) == 100_000

    # one clear log line per malformed message
    assert log.count("malformed message ") >= len(cases), w.tail(80)
    assert log.count("taken off queue") == len(cases), w.tail(80)
    _write_figures(tmp_path, cases, rows, letters)


def _write_figures(
    tmp_path: Path, cases: list[Case], rows: dict[str, Any], letters: list[Any]
) -> None:
    """The closing note's figures, printed for the test log (-s) and the report."""
    recovered = sum(1 for c in cases if c.inspection_id is not None)
    print(
        f"\nFIGURES malformed/redis: messages {len(rows) + len(letters)} "
        f"(malformed {len(cases) + 3}), rows {len(rows)}, error rows "
        f"{sum(1 for r in rows.values() if r['status'] == 'error')} "
        f"({recovered} recovered + 3 unstorable), dead letters {len(letters)}, "
        f"duplicates {sum(r['duplicate_count'] for r in rows.values())}"
    )


def test_embedded_default_broker_file_that_is_not_a_message(tmp_path: Path) -> None:
    """The embedded default (kombu's filesystem broker): a message file that is not JSON, and
    one that is JSON but no envelope, between good messages. The worker stays up, records
    both as dead letters (their bytes kept) and audits the good ones."""
    from db.migrate import upgrade
    from db.session import dispose_engines
    from producer.api import enqueue_many, reset_apps

    images = make_images(tmp_path / "img", 2)
    ckpt = tiny_checkpoint(tmp_path, size=(48, 48))
    home = tmp_path / "home"
    s = Settings(home=home, image_roots=[tmp_path / "img"], queue=QUEUE)
    url = s.resolved_database_url
    upgrade(url)
    dispose_engines(url)
    folder = home / "broker" / "queue"
    folder.mkdir(parents=True, exist_ok=True)
    junk = {"0_a.": b"\x00\x01 not json \xff", "0_b.": b'{"body": "x"}'}
    for prefix, data in junk.items():
        (folder / f"{prefix}{QUEUE}.msg").write_bytes(data)
    try:
        enqueue_many(
            [good_payload(f"fs-good-{i}", p.name) for i, p in enumerate(images)], settings=s
        )
    finally:
        reset_apps()
    env = worker_env(
        {
            "home": home,
            "queue": QUEUE,
            "model": ckpt,
            "image_roots": tmp_path / "img",
            "torch_threads": 1,
            "batch_size": 2,
            "batch_wait_ms": 100,
        }
    )
    w = start_worker(env, "fs-junk", tmp_path)
    try:
        wait_ready([w])
        rows = wait_rows(url, ["fs-good-0", "fs-good-1"], [w], timeout=60)
        deadline = time.monotonic() + 30
        while len(dead_letter_rows(url)) < 2:
            assert w.proc.poll() is None, w.tail()
            assert time.monotonic() < deadline, w.tail()
            time.sleep(0.2)
        time.sleep(0.5)
        letters = dead_letter_rows(url)
        assert w.proc.poll() is None, w.tail()
    finally:
        stop_workers([w])
        dispose_engines(url)
    assert all(r["status"] == "done" for r in rows)
    assert sorted(bytes(d["raw"]) for d in letters) == sorted(junk.values())
    assert {d["stage"] for d in letters} == {"transport"}
    assert any("not JSON" in d["reason"] for d in letters)
    assert any("no properties" in d["reason"] for d in letters)
    assert list(folder.glob(f"*.{QUEUE}.msg")) == []
