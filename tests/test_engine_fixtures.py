"""The shared model/dataset factories in ``tests/support/models.py`` do what they promise."""

from __future__ import annotations

import csv
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from inspection_audit.lab.dataset import read_manifest
from tests.support import models as fm
from worker.engine import EngineConfig, ReliabilityEngine
from worker.model.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")


def test_tiny_model_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = fm.tiny_model(seed=5)
    after = torch.rand(3)
    assert torch.equal(after, expected_next)
    b = fm.tiny_model(seed=5)
    c = fm.tiny_model(seed=6)
    assert not a.training
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["backbone.conv1.weight"], sc["backbone.conv1.weight"])


def test_tiny_checkpoint_fixture_and_function(tmp_path, tiny_checkpoint, tiny_model):
    assert tiny_checkpoint is fm.tiny_checkpoint and tiny_model is fm.tiny_model
    path = tiny_checkpoint(tmp_path, num_classes=1, in_channels=3, size=(64, 48))
    pm = load_checkpoint(path)
    assert (pm.num_classes, pm.in_channels, pm.input_size) == (1, 3, (64, 48))
    default = load_checkpoint(tiny_checkpoint(tmp_path))
    assert (default.num_classes, default.in_channels, default.input_size) == (2, 1, (32, 32))
    assert default.target_layer == "layer4" and default.class_names == ["ok", "defect"]
    x = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    rows = ReliabilityEngine.from_production_model(pm, EngineConfig()).score(x).rows()
    assert len(rows) == 2


def test_tiny_manifest_layout(tmp_path, tiny_manifest):
    assert tiny_manifest is fm.tiny_manifest
    manifest = tiny_manifest(tmp_path, n_ok=15, n_defect=10)
    assert manifest.name == "manifest.csv"
    with manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "label", "defect_type", "mask_path", "split"]
    records = read_manifest(manifest)
    assert len(records) == 25
    counts = Counter((r.split, r.label) for r in records)
    assert counts == {
        ("train", "ok"): 9,
        ("val", "ok"): 3,
        ("test", "ok"): 3,
        ("train", "defect"): 6,
        ("val", "defect"): 2,
        ("test", "defect"): 2,
    }
    for row in rows:
        img = Image.open(manifest.parent / row["path"])
        assert img.mode == "L" and img.size == (48, 48)
        if row["label"] == "ok":
            assert row["mask_path"] == "" and row["defect_type"] == ""
        else:
            assert row["defect_type"] in ("blob", "scratch")
            mask = np.asarray(Image.open(manifest.parent / row["mask_path"])) > 0
            pixels = np.asarray(img, dtype=np.float64) / 255
            assert 10 <= mask.sum() <= 400
            # the masked region is the dark defect
            assert pixels[mask].mean() < pixels[~mask].mean() - 0.25
    # deterministic in the seed, different across seeds
    again = tiny_manifest(tmp_path / "again", n_ok=15, n_defect=10)
    other = tiny_manifest(tmp_path / "other", n_ok=15, n_defect=10, seed=1)
    first = manifest.parent / "images" / "defect_000.png"
    assert first.read_bytes() == (again.parent / "images" / "defect_000.png").read_bytes()
    assert first.read_bytes() != (other.parent / "images" / "defect_000.png").read_bytes()


def test_tiny_manifest_defects_are_separable_by_a_local_feature(tmp_path):
    """Learnable: the darkest 3×3 patch separates every defect from every ok image by a margin.

    (A 3×3-mean then global-min is what one conv + min-pool computes, so a tiny CNN can learn it.)
    """
    manifest = fm.tiny_manifest(tmp_path, n_ok=30, n_defect=20, seed=2)
    feats = {"ok": [], "defect": []}
    for r in read_manifest(manifest):
        x = torch.from_numpy(np.asarray(Image.open(r.path), dtype=np.float32) / 255)[None, None]
        feats[r.label].append(float(F.avg_pool2d(x, 3, stride=1).min()))
    assert max(feats["defect"]) < min(feats["ok"]) - 0.05


def test_tiny_manifest_small_counts(tmp_path):
    manifest = fm.tiny_manifest(tmp_path, n_ok=3, n_defect=3)
    splits = Counter((r.split, r.label) for r in read_manifest(manifest))
    assert all(splits[(s, lab)] == 1 for s in ("train", "val", "test") for lab in ("ok", "defect"))
    with pytest.raises(ValueError):
        fm.tiny_manifest(tmp_path / "none", n_ok=0, n_defect=2)
