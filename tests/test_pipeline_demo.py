"""``inspection-audit demo`` on the embedded default (no server): a tiny synthetic dataset,
a three-epoch model (with snapshots after epochs 1 and 2) trained and cached, τ calibrated on
val, one worker, the report."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import click
import pytest

from inspection_audit.procs import worker_env as procs_worker_env
from tests.support.models import tiny_manifest
from tests.support.workers import cli_command


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
            "3",
            "--image-size",
            "48",
        ),
        # the product's own default decision method (snapshot_mean), not the tests' pinned one
        env=procs_worker_env({"home": home, "batch_wait_ms": 50}),
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
    assert "snapshot_mean" in text, text[-3000:]
    # the model is cached under home/models with its calibration sidecar and the snapshots of
    # its run (3 epochs: after epochs 1 and 2, i.e. round(3 × 0.4), round(3 × 0.6))
    cached = sorted((home / "models").glob("demo-*.pt"))
    production = [p for p in cached if "-epoch" not in p.name]
    assert len(production) == 1
    assert production[0].with_name(production[0].name + ".calibration.json").is_file()
    assert [p.name for p in cached if "-epoch" in p.name] == [
        f"{production[0].stem}-epoch{e}.pt" for e in (1, 2)
    ]


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
