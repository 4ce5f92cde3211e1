"""``inspection-audit worker`` refuses to start, quickly and with one clear line, when it cannot
work: no model, a missing or corrupt checkpoint, a calibration for another model, an
unmigrated database. Real subprocesses; no broker is needed (they stop before Celery starts)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.models import tiny_checkpoint
from tests.support.workers import cli_command, worker_env


def _run_worker(tmp_path: Path, **values: object) -> tuple[int, list[str], float]:
    env = worker_env(
        {
            "home": tmp_path / "home",
            "broker_url": "redis://127.0.0.1:1/0",  # never reached
            **values,
        }
    )
    t0 = time.monotonic()
    out = subprocess.run(
        cli_command("worker", "-c", "1"),
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    return out.returncode, lines, time.monotonic() - t0


def test_missing_checkpoint(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    rc, lines, took = _run_worker(tmp_path, model=missing)
    assert rc == 2
    assert lines == [f"inspection-audit worker: cannot start: checkpoint {missing}: file not found"]
    assert took < 30


def test_no_model_configured(tmp_path: Path) -> None:
    rc, lines, _ = _run_worker(tmp_path)
    assert rc == 2
    assert (
        len(lines) == 1
        and "no model configured" in lines[0]
        and "INSPECTION_AUDIT_MODEL" in lines[0]
    )


def test_corrupt_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    rc, lines, _ = _run_worker(tmp_path, model=bad)
    assert rc == 2
    assert len(lines) == 1 and f"checkpoint {bad}: cannot be read" in lines[0]


def test_calibration_for_another_model(tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path, size=(32, 32))
    sidecar = ckpt.with_name(ckpt.name + ".calibration.json")
    sidecar.write_text(json.dumps({"model_version": "someone-else", "methods": {}}))
    rc, lines, _ = _run_worker(tmp_path, model=ckpt)
    assert rc == 2
    assert len(lines) == 1 and "is for model_version 'someone-else'" in lines[0]


@pytest.mark.parametrize("device", ["cuda"])
def test_cuda_requested_without_cuda(tmp_path: Path, device: str) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    ckpt = tiny_checkpoint(tmp_path, size=(32, 32))
    rc, lines, _ = _run_worker(tmp_path, model=ckpt, device=device)
    assert rc == 2
    assert len(lines) == 1 and "CUDA is not available" in lines[0]


def test_unmigrated_database(tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path, size=(32, 32))
    rc, lines, _ = _run_worker(tmp_path, model=ckpt)  # embedded default: empty SQLite file
    assert rc == 2
    assert "run `inspection-audit db upgrade`" in lines[-1]
    assert "at revision none" in lines[-1]
