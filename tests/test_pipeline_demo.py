"""``inspection-audit demo`` on the embedded default (no server): a tiny synthetic dataset,
a one-epoch model trained and cached, τ calibrated on val, one worker, the report."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import click
import pytest

from tests.support.models import tiny_manifest
from tests.support.workers import cli_command, worker_env


@pytest.mark.slow
def test_demo_embedded_default(tmp_path: Path) -> None:
    from inspection_audit.lab.dataset import read_manifest

    manifest = tiny_manifest(tmp_path, n_ok=20, n_defect=15, size=48)
    n_test = len(read_manifest(manifest, "test"))
    home = tmp_path / "home"
    out = subprocess.run(
        cli_command(
            "demo",
            "--dataset",
            str(manifest.parent),
            "--workers",
            "1",
            "--epochs",
            "1",
            "--image-size",
            "48",
        ),
        env=worker_env({"home": home, "batch_wait_ms": 50}),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert re.search(rf"images audited\s*│\s*{n_test}\b", text), text[-3000:]
    assert "false negatives caught" in text and "true negatives flagged" in text
    assert re.search(r"errors\s*│\s*0\b", text), text[-3000:]
    assert "review queue" in text
    # the model is cached under home/models with its calibration sidecar
    cached = list((home / "models").glob("demo-*.pt"))
    assert len(cached) == 1
    assert cached[0].with_name(cached[0].name + ".calibration.json").is_file()


def test_demo_without_dataset_says_where_to_get_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from inspection_audit.lab.demo import find_dataset

    monkeypatch.chdir(tmp_path)
    with pytest.raises(click.ClickException) as err:
        find_dataset(None, None)
    msg = err.value.message
    assert "no dataset found" in msg and "manifest.csv" in msg and "--dataset" in msg
    with pytest.raises(click.ClickException) as err:
        find_dataset(tmp_path / "nothing-here", None)
    assert f"--dataset: {tmp_path / 'nothing-here' / 'manifest.csv'}" in err.value.message


def test_demo_model_cache_key(tmp_path: Path) -> None:
    from inspection_audit.lab.demo import model_cache_path

    m = tmp_path / "manifest.csv"
    m.write_text("path,label,defect_type,mask_path,split\n")
    a = model_cache_path(tmp_path, m, {"epochs": 1})
    assert a == model_cache_path(tmp_path, m, {"epochs": 1})
    assert a != model_cache_path(tmp_path, m, {"epochs": 2})
    m.write_text("path,label,defect_type,mask_path,split\nx.png,ok,,,test\n")
    assert a != model_cache_path(tmp_path, m, {"epochs": 1})
    assert a.parent == tmp_path.resolve() / "models"
