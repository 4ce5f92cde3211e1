"""Worker pieces without a broker: overlays, database-fault classification and retries, the
delivery counter (both dialects), the runtime's decision with and without a calibration."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch
from PIL import Image
from sqlalchemy import exc as sa_exc

from inspection_audit.settings import Settings
from tests.support.models import tiny_checkpoint


# --- overlay -----------------------------------------------------------------------------------
def test_overlay_png(tmp_path: Path) -> None:
    from worker.model.overlay import overlay_array, save_overlay

    img = torch.rand(1, 40, 48)
    cam = torch.zeros(5, 6)
    cam[2, 3] = 1.0
    arr = overlay_array(img, cam)
    assert arr.shape == (40, 48, 3) and arr.dtype.name == "uint8"
    p = save_overlay(img, cam, tmp_path / "a" / "b.png", title="id-1 iou_gap_adv 0.3 >= tau 0.2")
    with Image.open(p) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert min(im.size) >= 256  # upscaled for reviewers, plus a title strip
    rgb = torch.rand(3, 32, 32)
    nan_cam = torch.full((32, 32), float("nan"))
    assert save_overlay(rgb, nan_cam, tmp_path / "c.png").is_file()
    assert not list(tmp_path.rglob("*.tmp"))
    with pytest.raises(ValueError):
        overlay_array(torch.rand(2, 8, 8), cam)
    with pytest.raises(ValueError):
        overlay_array(img, torch.rand(1, 5, 6))


# --- database faults ----------------------------------------------------------------------------
def test_transient_classification() -> None:
    from worker.retry import is_transient_db_error

    assert is_transient_db_error(sa_exc.OperationalError("SELECT 1", {}, Exception("down")))
    assert is_transient_db_error(sa_exc.InterfaceError("SELECT 1", {}, Exception("closed")))
    lost = sa_exc.DBAPIError("SELECT 1", {}, Exception("x"), connection_invalidated=True)
    assert is_transient_db_error(lost)
    assert not is_transient_db_error(sa_exc.IntegrityError("INSERT", {}, Exception("dup")))
    assert not is_transient_db_error(ValueError("no"))


def test_retries_with_backoff_then_succeeds(monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.retry as tasks

    slept: list[float] = []
    monkeypatch.setattr(tasks.time, "sleep", slept.append)
    calls = {"n": 0}

    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 4:
            raise sa_exc.OperationalError("SELECT 1", {}, Exception("server closed"))
        return "ok"

    s = Settings(task_max_retries=5, retry_backoff_max_s=2)
    assert tasks.with_db_retries(flaky, "test", s) == "ok"
    assert calls["n"] == 4 and len(slept) == 3
    assert all(0 < d <= 2 for d in slept)
    assert slept[1] > slept[0] * 0.9  # growing (with jitter in [0.5, 1])

    calls["n"] = -100
    with pytest.raises(tasks.DatabaseUnavailable, match="after 5 retries"):
        tasks.with_db_retries(flaky, "test", s)

    def broken() -> None:
        raise sa_exc.IntegrityError("INSERT", {}, Exception("constraint"))

    slept.clear()
    with pytest.raises(sa_exc.IntegrityError):
        tasks.with_db_retries(broken, "test", s)
    assert slept == []


def test_backoff_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.retry as retry

    d: list[float] = []
    monkeypatch.setattr(retry.time, "sleep", d.append)

    def down() -> None:
        raise sa_exc.OperationalError("SELECT 1", {}, Exception("down"))

    with pytest.raises(retry.DatabaseUnavailable):
        retry.with_db_retries(down, "test", Settings(task_max_retries=10, retry_backoff_max_s=3))
    assert len(d) == 10 and max(d) <= 3.0 and d[-1] >= 1.5


# --- attempts (the redelivery cap) -------------------------------------------------------------------
def test_attempts_charge_only_the_ones_that_never_finished(migrated_url: str) -> None:
    """Hand-computed: an attempt started and finished is not charged to the next one; an
    attempt left open is (once); an attempt a message says finished is not; a late finish of
    an attempt that is no longer the open one changes nothing."""
    from db.deliveries import attempt_state, done_keys, finish_attempts, start_attempt
    from db.repository import upsert_audit, upsert_inspection
    from db.rows import AuditRow, InspectionRow
    from db.session import session_scope

    a, b = ("i-1", "v1", "iou_gap_adv"), ("i-2", "v1", "iou_gap_adv")
    with session_scope(migrated_url) as s:
        assert attempt_state(s, a).unfinished() is False
        assert start_attempt(s, a, "host:1") == start_attempt(s, b, "host:1")
        assert (start_attempt(s, ("x", "v", "m")).number, attempt_state(s, a).open_attempt) == (
            1,
            1,
        )
        finish_attempts(s, [(a, 1)])  # a came through its risky part; b's process "died"
    with session_scope(migrated_url) as s:
        assert attempt_state(s, a).unfinished() is False and attempt_state(s, b).unfinished()
        two_a, two_b = start_attempt(s, a, "host:2"), start_attempt(s, b, "host:2")
        assert (two_a.number, two_a.lost) == (2, 0)  # a finished: not charged
        assert (two_b.number, two_b.lost) == (2, 1)  # b's first attempt never finished
        finish_attempts(s, [(b, 1)])  # a late finish of an attempt that is not open: no-op
        assert attempt_state(s, b).open_attempt == 2
    with session_scope(migrated_url) as s:
        # b's 2nd attempt ended without being recorded finished, but its message says so
        assert attempt_state(s, b).unfinished(finished=2) is False
        three_b = start_attempt(s, b, "host:3", finished=2)
        assert (three_b.number, three_b.lost) == (3, 1)
        # a message naming another attempt does not excuse the open one
        four_b = start_attempt(s, b, "host:3", finished=2)
        assert (four_b.number, four_b.lost) == (4, 2)
        state = attempt_state(s, b)
        assert (state.attempts, state.open_attempt, state.lost) == (4, 4, 2)
        assert done_keys(s, [a, b]) == set()
        upsert_inspection(
            s,
            InspectionRow(
                inspection_id="i-1",
                image_ref="x.png",
                line="L",
                station="S",
                captured_at=datetime.now(UTC),
                prediction="ok",
                score=0.1,
            ),
        )
        upsert_audit(s, AuditRow("i-1", "v1", "iou_gap_adv", "done"))
    with session_scope(migrated_url) as s:
        assert done_keys(s, [a, b]) == {a}
        last = s.execute(
            sa.text("SELECT last_worker FROM delivery_attempts WHERE inspection_id = 'i-2'")
        ).scalar_one()
        assert last == "host:3"


# --- runtime ------------------------------------------------------------------------------------------
def _sidecar(ckpt: Path, **engine: object) -> None:
    from worker.model.checkpoint import load_checkpoint

    version = load_checkpoint(ckpt).model_version
    ckpt.with_name(ckpt.name + ".calibration.json").write_text(
        json.dumps(
            {
                "model_version": version,
                "split": "val",
                "target_recall": 1.0,
                "engine": engine,
                "methods": {"iou_gap_adv": {"tau": 0.1}, "msp": {"tau": 0.5}},
            }
        )
    )


def test_runtime_without_calibration(tmp_path: Path) -> None:
    from worker.runtime import load_runtime, validate

    ckpt = tiny_checkpoint(tmp_path, size=(48, 48))
    s = Settings(model=ckpt, home=tmp_path / "home", attack="none")
    summary = validate(s)
    assert "no calibration sidecar" in summary.describe() and "tau is NULL" in summary.describe()
    rt = load_runtime(s)
    assert rt.calibration is None and rt.engine.config.attack == "none"
    row = {"p_defect": 0.9, "iou_gap": 0.5, "iou_gap_adv": None}
    assert rt.decide(row) == (None, None, False)  # iou_gap_adv is None without attack
    rt2 = load_runtime(s.model_copy(update={"decision_method": "iou_gap"}))
    assert rt2.decide(row) == (0.5, None, False)


def test_runtime_with_calibration_uses_its_engine_config(tmp_path: Path) -> None:
    from worker.runtime import load_runtime, validate

    ckpt = tiny_checkpoint(tmp_path, size=(48, 48))
    _sidecar(ckpt, attack="pgd", epsilon=0.01, pgd_steps=2, target_layer="layer3")
    s = Settings(model=ckpt, home=tmp_path / "home")  # settings say fgsm: the sidecar wins
    assert "tau 0.1" in validate(s).describe()
    rt = load_runtime(s)
    assert rt.engine.config.attack == "pgd" and rt.engine.config.pgd_steps == 2
    assert rt.engine.target_layer_name == "layer3" and rt.params["target_layer"] == "layer3"
    assert rt.decide({"iou_gap_adv": 0.2}) == (0.2, 0.1, True)
    assert rt.decide({"iou_gap_adv": 0.05}) == (0.05, 0.1, False)
    x = torch.rand(2, 1, 48, 48)
    assert len(rt.engine.score(x).rows()) == 2


def test_validate_refuses_bad_sidecar(tmp_path: Path) -> None:
    from worker.runtime import RuntimeConfigError, validate

    ckpt = tiny_checkpoint(tmp_path, size=(32, 32))
    ckpt.with_name(ckpt.name + ".calibration.json").write_text("{not json")
    with pytest.raises(RuntimeConfigError, match="unreadable"):
        validate(Settings(model=ckpt, home=tmp_path))
