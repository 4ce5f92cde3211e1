"""End to end: producer -> broker -> two real worker processes -> database -> review queue.

* Redis + PostgreSQL (the production shape): 20 images through ``producer.api.enqueue_many``
  into a private Redis queue, two workers (``-c 1`` each, distinct node names), a fresh
  migrated PostgreSQL database.
* The embedded default: SQLite + kombu's filesystem broker under ``tmp_path``, nothing else set.

Then: one audit row per inspection, both workers did work, and the review queue holds exactly
the rows whose decision score is at least τ (a hand-written calibration sidecar with a τ that
flags some rows but not all).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from inspection_audit.settings import Settings
from tests.support.models import tiny_checkpoint
from tests.support.workers import (
    engine_scores,
    make_images,
    start_worker,
    stop_workers,
    tau_between,
    wait_ready,
    wait_rows,
    worker_env,
    write_sidecar,
)

pytestmark = pytest.mark.slow

N_IMAGES = 20
METHOD = "iou_gap_adv"


def _messages(images: list[Path], prefix: str) -> list[dict[str, Any]]:
    now = datetime.now(UTC).isoformat()
    return [
        {
            "inspection_id": f"{prefix}-{i:03d}",
            "image_path": p.name,
            "prediction": "ok",
            "score": 0.1,
            "line": "L1",
            "station": "S1",
            "captured_at": now,
        }
        for i, p in enumerate(images)
    ]


def _run_flow(tmp_path: Path, env_values: dict[str, Any], url: str, prefix: str) -> None:
    from db.repository import review_queue
    from db.session import session_scope
    from producer.api import enqueue_many, reset_apps

    img_dir = tmp_path / "img"
    images = make_images(img_dir, N_IMAGES, seed=1)
    ckpt = tiny_checkpoint(tmp_path, size=(48, 48))
    tau = tau_between(engine_scores(ckpt, images, METHOD))
    write_sidecar(ckpt, METHOD, tau)

    values = {
        "model": ckpt,
        "image_roots": img_dir,
        "home": tmp_path / "home",
        "decision_method": METHOD,
        "batch_size": 2,
        "batch_wait_ms": 100,
        "torch_threads": 1,
        **env_values,
    }
    env = worker_env(values)
    workers = [start_worker(env, f"w{i}", tmp_path) for i in (1, 2)]
    try:
        wait_ready(workers)
        settings = Settings(
            broker_url=values.get("broker_url"),
            queue=values.get("queue", "inspection-audit"),
            home=values["home"],
            image_roots=[img_dir],
            enqueue_timeout_s=5.0,
        )
        ids = enqueue_many(_messages(images, prefix), settings=settings)
        reset_apps()
        rows = wait_rows(url, ids, workers, timeout=120)
    finally:
        stop_workers(workers)

    # exactly one row per inspection, all scored
    assert sorted(r["inspection_id"] for r in rows) == sorted(ids)
    assert all(r["status"] == "done" for r in rows), [r["error"] for r in rows]
    assert {r["method"] for r in rows} == {METHOD}
    # both workers did work (hostname:pid of the pool process)
    hosts = {r["worker_host"] for r in rows}
    assert len(hosts) >= 2, hosts
    logs = [w.text() for w in workers]
    assert all("scored a batch" in t for t in logs), "a worker scored nothing"
    # the decision: flagged <=> decision_score >= tau, with the sidecar's tau
    for r in rows:
        assert r["tau"] == pytest.approx(tau)
        assert r["decision_score"] == pytest.approx(r["iou_gap_adv"])
        assert r["suspected_false_negative"] == (r["decision_score"] >= r["tau"])
        assert r["decode_ms"] is not None and r["score_ms"] is not None
        assert r["total_ms"] >= r["score_ms"]
        assert r["params"]["decision_method"] == METHOD
        if r["suspected_false_negative"]:
            assert r["overlay_path"] and Path(r["overlay_path"]).is_file()
        else:
            assert r["overlay_path"] is None
    flagged = {r["inspection_id"] for r in rows if r["decision_score"] >= r["tau"]}
    assert 0 < len(flagged) < len(rows)
    with session_scope(url) as session:
        queue = review_queue(session, limit=None)
    assert {q["inspection_id"] for q in queue} == flagged
    scores = [q["decision_score"] for q in queue]
    assert scores == sorted(scores, reverse=True)


def test_redis_postgres_two_workers(
    tmp_path: Path, migrated_pg_url: str, queue_settings: Settings
) -> None:
    _run_flow(
        tmp_path,
        {
            "broker_url": queue_settings.broker_url,
            "queue": queue_settings.queue,
            "database_url": migrated_pg_url,
        },
        migrated_pg_url,
        "pg",
    )


def test_embedded_default_two_workers(tmp_path: Path) -> None:
    """No broker or database URL: SQLite file and filesystem broker under ``home``."""
    from db.migrate import upgrade
    from db.session import dispose_engines

    home = tmp_path / "home"
    url = Settings(home=home).resolved_database_url
    assert url.startswith("sqlite:///")
    upgrade(url)
    dispose_engines(url)
    try:
        _run_flow(tmp_path, {"home": home}, url, "emb")
    finally:
        dispose_engines(url)
