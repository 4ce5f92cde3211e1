"""The review station with real workers: HTTP ingest → Redis → a worker → PostgreSQL → the
review page; ``inspection-audit health`` fails while a queue holds messages and no worker runs,
and passes once a worker has drained it; the export of reviewed inspections trains."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from db.session import dispose_engines, session_scope
from inspection_audit.procs import wait_for
from inspection_audit.settings import Settings
from tests.support.models import tiny_checkpoint, tiny_manifest
from tests.support.queue import redis_queue_length
from tests.support.web import bearer, login, web_settings
from tests.support.workers import (
    audit_rows,
    cli_command,
    engine_scores,
    start_worker,
    stop_workers,
    tau_between,
    wait_ready,
    worker_env,
    write_sidecar,
)

pytestmark = pytest.mark.slow
METHOD = "iou_gap_adv"


def _images(folder: Path, n: int, size: tuple[int, int]) -> list[Path]:
    """Non-square grayscale PNGs (h, w) with a dark blob each."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for i in range(n):
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (0.12 * h) ** 2))
        img = np.clip(rng.normal(0.55, 0.06, size) - 0.4 * blob * rng.choice([-1, 1]), 0, 1)
        p = folder / f"part-{i:02d}.png"
        Image.fromarray((img * 255).astype(np.uint8), mode="L").save(p)
        out.append(p)
    return out


def _health(env: dict[str, str], cwd: Path, stall: str = "5") -> tuple[int, dict[str, Any]]:
    out = subprocess.run(
        cli_command("health", "--stall-s", stall, "--json"),
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.returncode, json.loads(out.stdout or "{}")


def test_ingest_health_worker_review_page(
    tmp_path: Path, migrated_pg_url: str, queue_settings: Settings
) -> None:
    from inspection_audit.web import create_app

    s = web_settings(queue_settings, tmp_path, migrated_pg_url, decision_method=METHOD)
    root = s.image_roots[0]
    images = _images(root, 8, (48, 80))
    ckpt = tiny_checkpoint(tmp_path, size=(48, 48))
    tau = tau_between(engine_scores(ckpt, images, METHOD))
    write_sidecar(ckpt, METHOD, tau)
    values = {
        "broker_url": s.broker_url,
        "queue": s.queue,
        "database_url": migrated_pg_url,
        "model": ckpt,
        "image_roots": root,
        "results_dir": s.resolved_results_dir,
        "home": tmp_path / "home",
        "decision_method": METHOD,
        "batch_size": 4,
        "batch_wait_ms": 100,
    }
    env = worker_env(values)
    now = datetime.now(UTC).isoformat()
    with TestClient(create_app(s)) as client:
        ids = []
        for i, p in enumerate(images):
            msg = {
                "inspection_id": f"HTTP-{i:02d}",
                "image_path": p.name,
                "prediction": "ok",
                "score": 0.1,
                "line": f"line-{i % 2}",
                "station": "st-1",
                "captured_at": now,
            }
            r = client.post("/api/v1/inspections", json=msg, headers=bearer())
            assert r.status_code == 202, r.text
            ids.append(msg["inspection_id"])
        # the same id again, before any row exists: it waits in the outbox, so it is accepted
        # as a duplicate and not sent a second time
        r = client.post("/api/v1/inspections", json={**msg, "score": 0.2}, headers=bearer())
        assert r.status_code == 202 and r.json()["status"] == "duplicate"
        assert redis_queue_length(s) == len(ids)
        # nothing consumes: health fails (messages wait, no row ever written)
        rc, facts = _health(env, tmp_path)
        assert rc == 1 and facts["stalled"] and facts["waiting"] == len(ids), facts
        workers = [start_worker(env, "w1", tmp_path)]
        try:
            wait_ready(workers)
            assert wait_for(
                lambda: (
                    len(audit_rows(migrated_pg_url, ids)) == len(ids) and redis_queue_length(s) == 0
                ),
                timeout=120,
                workers=workers,
            ), workers[0].tail()
            rc, facts = _health(env, tmp_path)
            assert rc == 0 and not facts["stalled"] and facts["waiting"] == 0, facts
        finally:
            stop_workers(workers)
        rows = audit_rows(migrated_pg_url, ids)
        assert sorted(r["inspection_id"] for r in rows) == ids  # one row per id
        twice = next(r for r in rows if r["inspection_id"] == ids[-1])
        assert twice["duplicate_count"] == 0  # sent once: the outbox knew it
        flagged = [r for r in rows if r["suspected_false_negative"]]
        assert flagged
        for r in flagged:
            maps = r["details"]["maps"]
            assert set(maps) >= {"image", "gradcam_defect", "gradcam_ok", "agnostic"}
            with Image.open(maps["image"]) as im:
                assert im.size == (256, round(256 * 48 / 80))  # the image's own aspect ratio
            assert Path(r["overlay_path"]).is_file()
        # the review page shows them
        login(client)
        r0 = flagged[0]
        page = client.get(f"/inspections/{r0['inspection_id']}").text
        for name in ("gradcam_defect", "gradcam_ok", "agnostic"):
            assert f'data-map="{name}"' in page
            got = client.get(f"/media/audit/{r0['id']}/{name}")
            assert got.status_code == 200 and got.content[:4] == b"\x89PNG"
    dispose_engines(migrated_pg_url)


def test_export_trains(tmp_path: Path, migrated_sqlite_url: str) -> None:
    from click.testing import CliRunner

    from db.repository import record_verdict, upsert_audit, upsert_inspection
    from db.rows import AuditRow, InspectionRow
    from inspection_audit.cli import main
    from inspection_audit.lab.dataset import read_manifest
    from inspection_audit.settings import get_settings

    manifest = tiny_manifest(tmp_path, n_ok=10, n_defect=10, size=32)
    root = manifest.parent
    records = read_manifest(manifest)
    with session_scope(migrated_sqlite_url) as session:
        for n, rec in enumerate(records):
            iid = f"EXP-{n:03d}"
            upsert_inspection(
                session,
                InspectionRow(iid, rec.rel_path, "l1", "s1", datetime.now(UTC), "ok", 0.1),
            )
            upsert_audit(
                session,
                AuditRow(
                    iid,
                    "v1",
                    METHOD,
                    "done",
                    decision_score=1.0,
                    tau=0.5,
                    suspected_false_negative=True,
                ),
            )
            verdict = "confirmed_defect" if rec.label == "defect" else "cleared"
            record_verdict(session, iid, verdict, reviewer="ann")
        # an inline inspection without a kept image is skipped and reported
        upsert_inspection(
            session,
            InspectionRow("EXP-inline", "<inline>", "l1", "s1", datetime.now(UTC), "ok", 0.1),
        )
        record_verdict(session, "EXP-inline", "confirmed_defect", reviewer="ann")
    env = {
        "INSPECTION_AUDIT_DATABASE_URL": migrated_sqlite_url,
        "INSPECTION_AUDIT_IMAGE_ROOTS": str(root),
        "INSPECTION_AUDIT_HOME": str(tmp_path / "home"),
    }
    out = tmp_path / "export"
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(
            main,
            ["export", "--verdict", "confirmed", "--verdict", "cleared", "--out", str(out)],
            env=env,
            catch_exceptions=False,
        )
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "EXP-inline: sent inline" in result.output
    exported = read_manifest(out / "manifest.csv")
    assert len(exported) == len(records)
    by_label = {lab: [r for r in exported if r.label == lab] for lab in ("ok", "defect")}
    assert len(by_label["ok"]) == 10 and len(by_label["defect"]) == 10
    assert {r.split for r in exported} == {"train", "val"}
    assert all(r.defect_type == "confirmed_miss" for r in by_label["defect"])
    # byte for byte the originals
    originals = {f"EXP-{n:03d}": rec.path.read_bytes() for n, rec in enumerate(records)}
    for r in exported:
        assert r.path.read_bytes() == originals[r.path.stem]
    # and `train` takes the folder as it is
    trained = subprocess.run(
        cli_command(
            "train",
            "--manifest",
            str(out / "manifest.csv"),
            "--out",
            str(tmp_path / "retrained.pt"),
            "--epochs",
            "1",
            "--image-size",
            "32",
            "--threads",
            "1",
        ),
        env=worker_env({}),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    assert (tmp_path / "retrained.pt").is_file()
    # exporting into a folder that is not empty is refused
    get_settings.cache_clear()
    try:
        again = CliRunner().invoke(main, ["export", "--out", str(out)], env=env)
    finally:
        get_settings.cache_clear()
    assert again.exit_code != 0 and "not an empty folder" in again.output
    dispose_engines(migrated_sqlite_url)
