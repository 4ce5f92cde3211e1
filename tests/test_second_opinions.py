"""Second opinions end to end: auditors in a real worker, refusal of auditors that do not fit,
the recall promise, non-square training, and the lab's nested second opinions.

Hand-made expectations: each auditor's P(defect) is recomputed here from its checkpoint
(softmax of its logits on the image fitted to its own input), and the stored means must equal
the means of those numbers.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from inspection_audit.cli import main
from inspection_audit.settings import Settings
from tests.support.models import tiny_checkpoint, tiny_manifest
from tests.support.workers import (
    make_images,
    start_worker,
    stop_workers,
    wait_ready,
    wait_rows,
    worker_env,
)


def _p_defect(ckpt: Path, image: Path) -> float:
    from worker.model.checkpoint import load_checkpoint, p_defect_from_logits
    from worker.model.preprocess import preprocess

    pm = load_checkpoint(ckpt)
    x = preprocess(image, pm.input_size, pm.in_channels, resize=pm.resize)[None]
    with torch.no_grad():
        return float(p_defect_from_logits(pm.model(x), pm.defect_index)[0])


@pytest.mark.slow
def test_worker_with_two_auditors_stores_each_and_their_means(
    tmp_path: Path, migrated_sqlite_url: str, queue_settings: Settings
) -> None:
    from producer.api import enqueue_many, reset_apps

    images = make_images(tmp_path / "img", 3, seed=3)
    prod = tiny_checkpoint(tmp_path, size=(48, 48), seed=0, name="prod.pt")
    a1 = tiny_checkpoint(tmp_path, size=(40, 40), seed=1, name="aud1.pt")
    a2 = tiny_checkpoint(tmp_path, size=(56, 56), seed=2, name="aud2.pt")
    env = worker_env(
        {
            "model": prod,
            "auditor_models": [a1, a2],
            "database_url": migrated_sqlite_url,
            "broker_url": queue_settings.broker_url,
            "queue": queue_settings.queue,
            "image_roots": tmp_path / "img",
            "home": tmp_path / "home",
            "decision_method": "msp",
            "batch_size": 3,
            "batch_wait_ms": 100,
        }
    )
    w = start_worker(env, "aud", tmp_path)
    try:
        wait_ready([w])
        now = datetime.now(UTC).isoformat()
        msgs = [
            {
                "inspection_id": f"aud-{i}",
                "image_path": p.name,
                "prediction": "ok",
                "score": 0.1,
                "line": "L1",
                "station": "S1",
                "captured_at": now,
            }
            for i, p in enumerate(images)
        ]
        ids = enqueue_many(
            msgs, settings=queue_settings.model_copy(update={"image_roots": [tmp_path / "img"]})
        )
        reset_apps()
        rows = {r["inspection_id"]: r for r in wait_rows(migrated_sqlite_url, ids, [w])}
    finally:
        stop_workers([w])
    from worker.model.checkpoint import load_checkpoint

    v1, v2 = load_checkpoint(a1).model_version, load_checkpoint(a2).model_version
    for i, image in enumerate(images):
        r = rows[f"aud-{i}"]
        assert r["status"] == "done", r["error"]
        p0, p1, p2 = _p_defect(prod, image), _p_defect(a1, image), _p_defect(a2, image)
        assert r["details"]["auditors"] == pytest.approx({v1: p1, v2: p2}, abs=1e-6)
        assert r["scores"]["auditor_mean"] == pytest.approx((p1 + p2) / 2, abs=1e-6)
        assert r["scores"]["ensemble_mean"] == pytest.approx((p0 + p1 + p2) / 3, abs=1e-6)
        assert r["scores"]["ensemble_disagreement"] == pytest.approx(max(p1, p2) - p0, abs=1e-6)
        assert r["params"]["second_opinions"]["auditor"] == [v1, v2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"in_channels": 3}, "takes 3 input channel"),
        ({"num_classes": 2, "class_names": ["ok", "scratch"]}, "class names"),
    ],
)
def test_an_auditor_that_does_not_fit_is_refused_in_one_line(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    from worker.runtime import RuntimeConfigError, validate

    prod = tiny_checkpoint(tmp_path, size=(32, 32), name="prod.pt")
    class_names = kwargs.pop("class_names", None)
    bad = tiny_checkpoint(tmp_path, size=(32, 32), seed=5, name="bad.pt", **kwargs)  # type: ignore[arg-type]
    if class_names is not None:  # rewrite the class names of an otherwise fine checkpoint
        ck = torch.load(bad, weights_only=True)
        ck["class_names"] = class_names
        torch.save(ck, bad)
    with pytest.raises(RuntimeConfigError) as info:
        validate(Settings(model=prod, home=tmp_path, auditor_models=[bad]))
    text = str(info.value)
    assert "\n" not in text and "second opinions" in text
    if class_names is None:
        assert message in text
    else:  # the checkpoint loader refuses class names other than ok/defect first
        assert "class_names" in text


def test_recall_promise_in_calibration_is_the_closed_form() -> None:
    from worker.engine.calibration import calibrate, recall_promise

    for n in (1, 8, 36):
        p = recall_promise(n, n, 1.0)
        assert p["recall_lower_bound"] == pytest.approx(0.05 ** (1 / n), rel=1e-9)
        assert p["certified"] is False and p["misses_needed"] is None
    assert recall_promise(59, 59, 0.95)["certified"] is True  # 0.05^(1/59) = 0.9505
    assert recall_promise(58, 58, 0.95)["certified"] is False
    assert recall_promise(36, 36, 0.95)["misses_needed"] == 59
    # in a calibration: 2 misses caught of 2 -> promise sqrt(0.05)
    rows = [{"p_defect": p, "energy": -1.0} for p in (0.4, 0.3, 0.1, 0.2)]
    cal = calibrate(rows, [1, 1, 0, 0], model_version="m", engine={})
    msp = cal.methods["msp"]
    assert msp["recall_lower_bound"] == pytest.approx(math.sqrt(0.05))
    assert "2 of 2" in msp["warning"] and "100 %" in msp["warning"]


def test_train_non_square_runs_end_to_end(tmp_path: Path) -> None:
    from worker.model.checkpoint import load_checkpoint

    manifest = tiny_manifest(tmp_path, n_ok=10, n_defect=6, size=48)
    out = tmp_path / "ns.pt"
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--manifest",
            str(manifest),
            "--out",
            str(out),
            "--image-size",
            "64x32",
            "--resize",
            "pad",
            "--epochs",
            "1",
            "--threads",
            "1",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    raw = torch.load(out, weights_only=True)
    assert raw["input_size"] == [64, 32] and raw["resize"] == "pad"
    pm = load_checkpoint(out)
    assert pm.input_size == (64, 32) and pm.resize == "pad"
    assert pm.extra["recipe"]["image_size"] in ((64, 32), [64, 32])


def test_pad_resize_keeps_the_aspect_ratio() -> None:
    from worker.model.preprocess import fit_box, fit_to_input

    img = torch.zeros(1, 20, 80)
    img[:, :, 40:] = 1.0  # right half white
    x = fit_to_input(img, (32, 32), "pad")
    assert x.shape == (1, 32, 32)
    top, left, h, w = fit_box((20, 80), (32, 32), "pad")
    assert (top, left, h, w) == (12, 0, 8, 32)  # 80 -> 32 wide, 20 -> 8 high, centred
    # the border rows repeat the image's edge pixels: left half dark, right half bright
    assert float(x[0, 0, :14].max()) < 0.05 and float(x[0, 0, 18:].min()) > 0.95
    assert fit_box((20, 80), (32, 32), "squash") == (0, 0, 32, 32)


@pytest.mark.slow
def test_lab_measures_nested_second_opinions(tmp_path: Path) -> None:
    """Out of fold with an auditor recipe, snapshots, views and both bank kinds: every fold
    gets its own auditor, snapshot and banks (files named by fold), the calibration records
    them, and every second-opinion method is scored on every image."""
    manifest = tiny_manifest(tmp_path, n_ok=24, n_defect=16, size=40)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "evaluate",
            "--manifest",
            str(manifest),
            "--folds",
            "2",
            "--image-size",
            "40",
            "--epochs",
            "2",
            "--snapshot-epochs",
            "1",
            "--auditor-recipe",
            "image_size=48,seed=7,epochs=2,augment=flips",
            "--views",
            "identity,hflip,vflip,hvflip",
            "--bank",
            "own",
            "--bank",
            "imagenet",
            "--bootstrap",
            "20",
            "--threads",
            "1",
            "--out",
            str(out),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    folds = out / "folds"
    for f in (0, 1):
        for name in (f"fold{f}.pt", f"fold{f}-epoch1.pt", f"auditor0-fold{f}.pt"):
            assert (folds / name).is_file(), name
        for kind in ("own", "imagenet"):
            assert (folds / f"bank-{kind}-fold{f}.pt").is_file()
            choice = json.loads((folds / f"bank-{kind}-fold{f}.json").read_text())
            assert choice["layers"] and len(choice["val_auroc"]) == 2
    metrics = json.loads((out / "metrics.json").read_text())
    second = metrics["calibration"][0]["second_opinions"]
    assert len(second["auditor"]) == 1 and len(second["snapshot"]) == 1
    assert set(second["anomaly_banks"]) == {"own", "imagenet"}
    import csv

    with (out / "rows.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 40
    for name in (
        "auditor_mean",
        "ensemble_mean",
        "snapshot_ensemble_mean",
        "views_mean",
        "auditor_views_mean",
        "anomaly_imagenet",
        "anomaly_own",
    ):
        values = np.array([float(r[name]) for r in rows])
        assert np.isfinite(values).all(), name
    # the ensemble mean is the mean of production and auditor P(defect)
    for r in rows:
        assert float(r["ensemble_mean"]) == pytest.approx(
            (float(r["p_defect"]) + float(r["auditor_mean"])) / 2, abs=1e-6
        )


def test_an_interrupted_training_leaves_no_finished_looking_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out-of-fold evaluation reuses any fold checkpoint whose recipe matches, so a run cut
    after its first epoch must not leave one at the final path."""
    from inspection_audit.lab.dataset import read_manifest
    from inspection_audit.lab.training import Recipe, train_model
    from worker.model.checkpoint import load_checkpoint

    manifest = tiny_manifest(tmp_path, n_ok=10, n_defect=6, size=32)
    tr, va = read_manifest(manifest, "train"), read_manifest(manifest, "val")
    recipe = Recipe(arch="resnet18", image_size=32, epochs=3, batch_size=8)
    out = tmp_path / "fold0.pt"
    steps_per_epoch = math.ceil(len(tr) / recipe.batch_size)
    real_step = torch.optim.lr_scheduler.OneCycleLR.step
    calls = {"n": 0}

    def step_then_cut(self: torch.optim.lr_scheduler.OneCycleLR, *a: object) -> None:
        calls["n"] += 1
        # the constructor steps once; then one step per batch: past that, epoch 1 finished
        # (and was kept as the best so far)
        if calls["n"] > 1 + steps_per_epoch:
            raise KeyboardInterrupt
        real_step(self, *a)

    with monkeypatch.context() as m:
        m.setattr(torch.optim.lr_scheduler.OneCycleLR, "step", step_then_cut)
        with pytest.raises(KeyboardInterrupt):
            train_model(tr, va, out, recipe, show_progress=False)
    assert not out.exists()
    assert out.with_name("fold0.pt.partial").is_file()  # epoch 1's weights, kept aside
    result = train_model(tr, va, out, recipe, show_progress=False)
    assert out.is_file() and not out.with_name("fold0.pt.partial").exists()
    assert load_checkpoint(out).model_version == result.model_version
