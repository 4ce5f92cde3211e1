"""A worker given a wrong checkpoint refuses to start with one clear line (docs/reliability.md).

``tests/test_worker_startup.py`` covers no model, a missing file, bytes that are not a
checkpoint, a calibration for another model and an unmigrated database. These are the wrong
checkpoints that *load* as torch files: a bare ``state_dict``, weights of another architecture,
an unknown architecture, and a checkpoint carrying a pickled object that would run code when
loaded (``torch.load(weights_only=True)`` refuses it: nothing runs).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.models import tiny_checkpoint
from tests.support.workers import cli_command, worker_env


class _TouchOnUnpickle:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[Path]]:
        return (Path.touch, (self.path,))


def _wrong_checkpoint(tmp_path: Path, case: str) -> tuple[Path, str]:
    good = tiny_checkpoint(tmp_path, size=(32, 32))
    ckpt = torch.load(good, map_location="cpu", weights_only=True)
    bad = tmp_path / f"{case}.pt"
    if case == "bare-state-dict":
        torch.save(ckpt["state_dict"], bad)
        return bad, "missing keys ["
    if case == "other-arch-weights":
        torch.save({**ckpt, "arch": "resnet34"}, bad)
        return bad, "state_dict does not fit arch 'resnet34'"
    if case == "unknown-arch":
        torch.save({**ckpt, "arch": "not_a_net"}, bad)
        return bad, "unknown arch 'not_a_net' (not a torchvision classification model)"
    if case == "code-on-load":
        torch.save({**ckpt, "extra": _TouchOnUnpickle(tmp_path / "ran")}, bad)
        return bad, "cannot be read (UnpicklingError"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case", ["bare-state-dict", "other-arch-weights", "unknown-arch", "code-on-load"]
)
def test_wrong_checkpoint_refused_with_one_line(tmp_path: Path, case: str) -> None:
    bad, reason = _wrong_checkpoint(tmp_path, case)
    env = worker_env(
        {"home": tmp_path / "home", "broker_url": "redis://127.0.0.1:1/0", "model": bad}
    )
    out = subprocess.run(
        cli_command("worker", "-c", "1"),
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    assert out.returncode == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"inspection-audit worker: cannot start: checkpoint {bad}: ")
    assert reason in lines[0], lines[0]
    assert not (tmp_path / "ran").exists()  # the pickled object was never loaded
