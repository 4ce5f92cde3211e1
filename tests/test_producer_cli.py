"""``inspection-audit enqueue`` against the real Redis (no mocks)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from inspection_audit.cli import main
from inspection_audit.settings import Settings
from tests.support.queue import redis_queue_length, redis_queue_messages


def _env(monkeypatch: pytest.MonkeyPatch, settings: Settings, root: Path | None = None) -> None:
    """The environment the CLI reads: ``settings``' broker and queue; image roots unset or one."""
    for key in list(os.environ):
        if key.startswith("INSPECTION_AUDIT_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(settings.home.parent)  # no stray .env file
    monkeypatch.setenv("INSPECTION_AUDIT_BROKER_URL", settings.resolved_broker_url)
    monkeypatch.setenv("INSPECTION_AUDIT_QUEUE", settings.queue)
    monkeypatch.setenv("INSPECTION_AUDIT_HOME", str(settings.home))
    if root is not None:
        # JSON list: pydantic-settings JSON-decodes list fields before the comma splitter runs
        monkeypatch.setenv("INSPECTION_AUDIT_IMAGE_ROOTS", json.dumps([str(root)]))


def _dataset(folder: Path) -> Path:
    rows = ["path,label,defect_type,mask_path,split"]
    for i, (label, split) in enumerate(
        [("ok", "test"), ("defect", "test"), ("ok", "train"), ("ok", "test")]
    ):
        rel = f"MT_{label}/Imgs/img {i}.png"  # a space: sanitised in the id
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (24, 24), 40 * i).save(folder / rel)
        rows.append(f"{rel},{label},,,{split}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv"


def test_enqueue_manifest_split(
    queue_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = _dataset(tmp_path / "data")
    _env(monkeypatch, queue_settings)  # no roots: the CLI uses the manifest's folder
    res = CliRunner().invoke(
        main,
        [
            "enqueue",
            "--manifest",
            str(manifest),
            "--split",
            "test",
            "--prediction",
            "ok",
            "--score",
            "0.1",
            "--line",
            "L7",
            "--id-prefix",
            "t:",
        ],
    )
    assert res.exit_code == 0, res.output
    assert f"enqueued 3 messages to {queue_settings.queue}" in res.output
    assert "INSPECTION_AUDIT_IMAGE_ROOTS is empty" in res.output
    assert redis_queue_length(queue_settings) == 3
    bodies = [e["decoded_body"][0][0] for e in redis_queue_messages(queue_settings)]
    assert [b["image_path"] for b in bodies] == [
        "MT_ok/Imgs/img 0.png",
        "MT_defect/Imgs/img 1.png",
        "MT_ok/Imgs/img 3.png",
    ]
    assert [b["inspection_id"] for b in bodies] == [
        "t:MT_ok-Imgs-img-0",
        "t:MT_defect-Imgs-img-1",
        "t:MT_ok-Imgs-img-3",
    ]
    assert {(b["prediction"], b["score"], b["line"], b["station"]) for b in bodies} == {
        ("ok", 0.1, "L7", "cli")
    }


def test_enqueue_files_with_configured_root(
    queue_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(3):
        Image.new("L", (20, 20), i).save(tmp_path / f"f{i}.png")
    _env(monkeypatch, queue_settings, root=tmp_path)
    res = CliRunner().invoke(
        main, ["enqueue", str(tmp_path / "f*.png"), "--prediction", "defect", "--score", "0.7"]
    )
    assert res.exit_code == 0, res.output
    assert "IMAGE_ROOTS is empty" not in res.output
    ids = [e["decoded_body"][0][0]["inspection_id"] for e in redis_queue_messages(queue_settings)]
    assert ids == ["f0", "f1", "f2"]


def test_enqueue_refuses_before_sending(
    queue_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = _dataset(tmp_path / "data")
    _env(monkeypatch, queue_settings)
    runner = CliRunner()
    res = runner.invoke(
        main, ["enqueue", "--manifest", str(manifest), "--prediction", "ok", "--score", "1.5"]
    )
    assert res.exit_code == 1
    assert "score: Input should be less than or equal to 1 (got 1.5)" in res.output
    res = runner.invoke(main, ["enqueue", "--manifest", str(manifest), "--prediction", "ok"])
    assert res.exit_code == 2 and "--score" in res.output
    # a root that does not contain the manifest's images
    other = tmp_path / "elsewhere"
    other.mkdir()
    _env(monkeypatch, queue_settings, root=other)
    res = runner.invoke(
        main, ["enqueue", "--manifest", str(manifest), "--prediction", "ok", "--score", "0.1"]
    )
    assert res.exit_code == 1
    assert "outside the configured image roots" in res.output
    assert redis_queue_length(queue_settings) == 0


def test_enqueue_run_model(
    queue_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from tests.support.models import tiny_checkpoint
    from worker.model.checkpoint import load_checkpoint, p_defect_from_logits
    from worker.model.preprocess import preprocess

    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    manifest = _dataset(tmp_path / "data")
    _env(monkeypatch, queue_settings)
    res = CliRunner().invoke(
        main,
        ["enqueue", "--manifest", str(manifest), "--run-model", str(ckpt), "--batch-size", "2"],
    )
    assert res.exit_code == 0, res.output
    assert f"enqueued 4 messages to {queue_settings.queue}" in res.output
    bodies = [e["decoded_body"][0][0] for e in redis_queue_messages(queue_settings)]
    pm = load_checkpoint(ckpt)
    x = torch.stack(
        [
            preprocess(tmp_path / "data" / b["image_path"], pm.input_size, pm.in_channels)
            for b in bodies
        ]
    )
    with torch.no_grad():
        expected = p_defect_from_logits(pm.model(x), pm.defect_index).tolist()
    for b, p in zip(bodies, expected, strict=True):
        assert b["score"] == pytest.approx(p, abs=1e-6)
        assert b["prediction"] == ("defect" if p >= 0.5 else "ok")
        assert b["model_version"] == pm.model_version
