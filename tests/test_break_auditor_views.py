"""Break: views that swap H and W are checked against the production model's input only; an
auditor with a non-square input passes the startup check and then every image fails."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inspection_audit.settings import Settings
from tests.support.models import tiny_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")


def test_swapping_views_with_a_non_square_auditor_are_refused_at_startup(tmp_path: Path) -> None:
    from worker.runtime import RuntimeConfigError, get_runtime, reset_runtime, validate

    prod = tiny_checkpoint(tmp_path, size=(64, 64), name="prod.pt")
    aud = tiny_checkpoint(tmp_path, size=(64, 48), seed=3, name="aud.pt")
    s = Settings(model=prod, home=tmp_path, auditor_models=[aud], views=["identity", "rot90"])
    try:
        validate(s)
    except RuntimeConfigError as exc:
        assert "rot90" in str(exc)
        return
    # accepted at startup: then it must be able to measure an image
    reset_runtime()
    try:
        rt = get_runtime(s)
        image = torch.rand(1, 80, 80)
        rt.suite.measure([image])  # raises: every image of this worker becomes an error row
    finally:
        reset_runtime()


def test_repeated_views_are_refused_at_startup(tmp_path: Path) -> None:
    from worker.runtime import RuntimeConfigError, get_runtime, reset_runtime, validate

    prod = tiny_checkpoint(tmp_path, size=(64, 64), name="prod.pt")
    s = Settings(model=prod, home=tmp_path, views="identity,hflip,identity")
    try:
        validate(s)
    except RuntimeConfigError as exc:
        assert "identity" in str(exc)
        return
    reset_runtime()
    try:
        get_runtime(s).suite.measure([torch.rand(1, 80, 80)])
    finally:
        reset_runtime()
