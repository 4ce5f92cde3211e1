"""Smoke tests of the ``bench.throughput`` package: structure and equal work, never timing.

The benchmark functions for (a)-(d) run in ``--quick`` mode on tiny synthetic images (no
dataset, no servers). The engine's maps from (b) must equal pytorch_grad_cam's maps from (d) on
the same batch within 1e-4 (EigenCAM up to its SVD sign), so that (b) vs (d) compares equal work.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.throughput import (
    KINDS,
    BenchConfig,
    GradCamRunner,
    compare_with_gradcam,
    evaluate_targets,
    main,
    make_engine,
    random_model,
    render_markdown,
    run_core,
    synthetic_images,
)

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-4


def _quick(size: int) -> BenchConfig:
    return replace(
        BenchConfig.quick_preset(), image_size=size, reps=2, min_images=4, warmup_images=1
    )


def test_core_benchmarks_quick_structure():
    cfg = _quick(48)
    spec = random_model(cfg.image_size, seed=0)
    pool = synthetic_images(6, cfg.image_size, seed=0)
    steps: list[str] = []
    results = run_core(spec, pool, cfg, n_threads=1, on_step=steps.append)

    assert [(r["kind"], r["batch_size"]) for r in results] == [
        (k, b) for b in cfg.sizes for k in KINDS
    ]
    assert len(steps) == len(results)
    for r in results:
        assert r["threads"] == 1 and r["device"] == "cpu"
        assert len(r["reps_images_per_s"]) == cfg.reps
        assert all(math.isfinite(v) and v > 0 for v in r["reps_images_per_s"])
        assert r["images_per_s"] == pytest.approx(float(np.median(r["reps_images_per_s"])))
        assert r["images_per_rep"] >= cfg.min_images
        assert r["images_per_rep"] % r["batch_size"] == 0
        assert r["warmup_iters"] >= 1
        assert r["ms_per_image"] == pytest.approx(1000.0 / r["images_per_s"])
    # the model handed in is left on the CPU in eval mode
    assert not spec.model.training
    assert next(spec.model.parameters()).device.type == "cpu"


def test_engine_maps_equal_gradcam_maps():
    """(b) and (d) compute the same three maps on the same batch."""
    spec = random_model(64, seed=1)
    x = synthetic_images(4, 64, seed=2)
    scores = make_engine(spec, "none").score(x)
    with GradCamRunner(spec) as runner:
        cams = runner(x)
    for cam in cams:
        assert isinstance(cam, np.ndarray) and cam.dtype == np.float32
        assert cam.shape == (4, 64, 64)
    errs = compare_with_gradcam(spec, x, scores, cams)
    assert set(errs) >= {"defect", "ok", "agnostic"}
    assert errs["defect"] <= ATOL
    assert errs["ok"] <= ATOL
    assert errs["agnostic"] <= ATOL
    # not vacuous: the maps are not all zero
    assert float(scores.cam_defect.max()) == 1.0 or float(scores.cam_ok.max()) == 1.0
    assert float(scores.cam_agnostic.max()) == 1.0
    # the runner's model copies keep the caller's model untouched
    assert all(p.grad is None for p in spec.model.parameters())


def _fake_core(values: dict[str, float], b: int) -> list[dict]:
    return [
        {"kind": k, "batch_size": b, "threads": 1, "device": "cpu", "images_per_s": v}
        for k, v in values.items()
    ]


def test_targets_pass_miss_and_not_measured():
    core = _fake_core({"a": 100.0, "b": 70.0, "c": 20.0, "d": 30.0}, 8)
    e2e = [
        {"batch_size": 8, "workers": 1, "images_per_s": 18.0, "peak_rss_tree_mb": [900.0],
         "peak_pss_tree_mb": [500.0]},
        {"batch_size": 8, "workers": 2, "images_per_s": 30.0, "peak_rss_tree_mb": [1600.0, 900.0],
         "peak_pss_tree_mb": [600.0, 600.0]},
    ]  # fmt: skip
    targets = evaluate_targets(core, e2e, sizes=[8], e2e_sizes=[8])
    by_name = {t["target"]: t for t in targets}
    assert by_name["(b) ≥ 0.6 × (a)"]["passed"] is True  # 0.7
    assert by_name["(c) ≥ 0.25 × (a)"]["passed"] is False  # 0.2
    assert by_name["(b) ≥ 3 × (d)"]["passed"] is False  # 2.33
    assert by_name["(e) 1 worker ≥ 0.8 × (c)"]["value"] == pytest.approx(0.9)
    assert by_name["(e) 2 workers ≥ 1.6 × (e) 1 worker"]["passed"] is True  # 1.67
    assert by_name["peak RSS ≤ 1.5 GB per CPU worker"]["value"] == 1600.0
    assert by_name["peak RSS ≤ 1.5 GB per CPU worker"]["passed"] is False
    # without (e) the end-to-end targets are listed as not measured
    skipped = evaluate_targets(core, [], sizes=[8], e2e_sizes=[8, 32])
    assert [t["passed"] for t in skipped if t["target"].startswith(("(e)", "peak"))] == [None] * 6


def _tiny_dataset(folder: Path, n: int = 6) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with (folder / "manifest.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "defect_type", "mask_path", "split"])
        for i in range(n):
            img = (rng.uniform(0.2, 0.8, (40, 40)) * 255).astype(np.uint8)
            Image.fromarray(img, mode="L").save(folder / f"img{i}.png")
            w.writerow([f"img{i}.png", "ok" if i % 2 else "defect", "", "", "test"])
    return folder


def test_quick_run_writes_reports(tmp_path, monkeypatch):
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "KINETO_LOG_LEVEL"):
        monkeypatch.setenv(var, "1" if var != "KINETO_LOG_LEVEL" else "5")
    dataset = _tiny_dataset(tmp_path / "ds")
    out = tmp_path / "out"
    args = ["--quick", "--skip-e2e", "--no-all-cores", "--image-size", "32", "--sizes", "1,2"]
    args += ["--dataset", str(dataset), "--out", str(out), "--profile"]
    with torch.random.fork_rng(devices=[]):
        assert main(args) == 0

    report = json.loads((out / "performance.json").read_text())
    for key in ("machine", "config", "core", "e2e", "targets", "maps_agreement", "command"):
        assert key in report
    m = report["machine"]
    for key in ("cpu_model", "cores_usable", "ram_gb", "torch", "date"):
        assert m[key]
    assert report["config"]["quick"] is True and report["config"]["sizes"] == [1, 2]
    assert {(r["kind"], r["batch_size"]) for r in report["core"]} == {
        (k, b) for k in KINDS for b in (1, 2)
    }
    assert report["e2e"] == []
    agree = report["maps_agreement"]
    assert max(agree["defect"], agree["ok"], agree["agnostic"]) <= ATOL

    md = (out / "performance.md").read_text()
    assert "Quick smoke run" in md
    assert "| target | B | measured | required | result |" in md
    assert "not measured" in md  # the end-to-end targets
    if not torch.cuda.is_available():
        assert "No GPU was available in this session; CUDA numbers not measured." in md
    assert md == render_markdown(report)

    prof = (out / "profile.txt").read_text()
    assert "attack='none'" in prof and "attack='fgsm'" in prof
    assert "Self CPU" in prof
