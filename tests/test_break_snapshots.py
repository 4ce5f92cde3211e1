"""Break: the snapshots the default decision method reads. A demo with too few epochs for any
snapshot, odd file names beside a given model, and a snapshot that does not fit (named as a
snapshot, not an auditor) are each refused or handled in one line."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from inspection_audit.procs import worker_env as procs_worker_env
from inspection_audit.settings import Settings
from tests.support.models import tiny_checkpoint, tiny_manifest
from tests.support.workers import cli_command

pytestmark = pytest.mark.usefixtures("single_thread")


def test_snapshot_paths_reads_file_names_literally(tmp_path: Path) -> None:
    from inspection_audit.lab.demo import snapshot_paths

    ckpt = tmp_path / "run[1].pt"
    for name in ("run[1].pt", "run[1]-epoch12.pt", "run[1]-epoch3.pt", "run1-epoch4.pt"):
        (tmp_path / name).write_bytes(b"")
    for odd in ("run[1]-epoch².pt", "run[1]-epochfoo.pt", "run[1]-epoch3.pt.partial"):
        (tmp_path / odd).write_bytes(b"")
    assert snapshot_paths(ckpt) == [tmp_path / "run[1]-epoch3.pt", tmp_path / "run[1]-epoch12.pt"]
    assert snapshot_paths(ckpt, (6, 9)) == [
        tmp_path / "run[1]-epoch6.pt",
        tmp_path / "run[1]-epoch9.pt",
    ]


def test_demo_with_one_epoch_is_refused_before_training(tmp_path: Path) -> None:
    manifest = tiny_manifest(tmp_path, n_ok=6, n_defect=4, size=32)
    home = tmp_path / "home"
    out = subprocess.run(
        cli_command("demo", "--dataset", str(manifest.parent), "--epochs", "1"),
        env=procs_worker_env({"home": home}),  # the product's default decision method
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "snapshot_mean reads snapshots" in out.stderr and "--epochs 2" in out.stderr
    assert "Traceback" not in out.stderr
    models = home / "models"
    assert not models.exists() or not list(models.glob("*.pt"))  # nothing was trained


def test_a_snapshot_that_does_not_fit_is_named_a_snapshot(tmp_path: Path) -> None:
    from worker.runtime import RuntimeConfigError, validate

    prod = tiny_checkpoint(tmp_path, size=(48, 48), name="prod.pt")
    rgb = tiny_checkpoint(tmp_path, size=(48, 48), in_channels=3, seed=1, name="prod-epoch2.pt")
    s = Settings(model=prod, home=tmp_path, snapshot_models=[rgb], decision_method="snapshot_mean")
    with pytest.raises(RuntimeConfigError, match=r"snapshot .*prod-epoch2\.pt takes 3 input"):
        validate(s)
