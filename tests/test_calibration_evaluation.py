"""Calibration, metrics and the train → calibrate → evaluate commands, end to end on tiny images."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from inspection_audit.cli import main
from inspection_audit.lab.stats import clopper_pearson, compute_metrics, method_metrics
from tests.support.models import tiny_manifest
from worker.engine.calibration import (
    Calibration,
    CalibrationError,
    calibrate,
    load_calibration,
    sidecar_path,
    tau_for_recall,
)
from worker.engine.fusion import Fusion


# -- τ and the decision ---------------------------------------------------------------------------
def test_tau_for_full_recall_is_the_lowest_false_negative_score() -> None:
    assert tau_for_recall([0.3, 0.9, 0.1, 0.5], 1.0) == 0.1


def test_tau_for_partial_recall_hand_case() -> None:
    # 4 positives, target 0.75 -> at least 3 flagged -> τ = 3rd highest = 0.3
    assert tau_for_recall([0.3, 0.9, 0.1, 0.5], 0.75) == 0.3
    # target 0.5 -> 2 flagged -> τ = 0.5
    assert tau_for_recall([0.3, 0.9, 0.1, 0.5], 0.5) == 0.5


def test_tau_skips_missing_and_nan_scores() -> None:
    # NaN must not count as a positive: 3 finite scores, target 2/3 -> 2nd highest = 0.3
    assert tau_for_recall([0.3, float("nan"), 0.9, None, 0.1], 2 / 3) == 0.3  # type: ignore[list-item]


def test_tau_needs_positives_and_a_valid_target() -> None:
    with pytest.raises(CalibrationError):
        tau_for_recall([], 1.0)
    with pytest.raises(ValueError):
        tau_for_recall([0.1], 0.0)


def _row(p: float, gap: float, gap_adv: float, energy: float = -1.0) -> dict[str, float]:
    return {
        "p_defect": p,
        "energy": energy,
        "iou_gap": gap,
        "iou_gap_adv": gap_adv,
        "p_defect_adv": p,
    }


def test_calibrate_picks_tau_per_method_on_false_negatives_only() -> None:
    # predicted ok (p < 0.5): FN at rows 0, 1; TN at rows 2, 3, 4; row 5 predicted defect (ignored)
    rows = [
        _row(0.40, 0.20, 0.30),
        _row(0.30, -0.10, 0.50),
        _row(0.10, 0.00, 0.10),
        _row(0.35, 0.40, -0.20),
        _row(0.05, -0.30, 0.60),
        _row(0.90, 0.90, 0.90),
    ]
    labels = [1, 1, 0, 0, 0, 1]
    cal = calibrate(rows, labels, model_version="m1", engine={"attack": "fgsm"})
    assert cal.tau("msp") == pytest.approx(0.30)
    assert cal.tau("iou_gap") == pytest.approx(-0.10)
    assert cal.tau("iou_gap_adv") == pytest.approx(0.30)
    assert cal.methods["msp"]["n_positives"] == 2
    assert cal.methods["msp"]["positives"] == "false_negatives"
    # TN flag rates by hand: msp τ 0.30 flags TN 0.35 -> 1/3; iou_gap τ -0.1 flags 0.0, 0.4 -> 2/3
    assert cal.methods["msp"]["tn_flag_rate"] == pytest.approx(1 / 3)
    assert cal.methods["iou_gap"]["tn_flag_rate"] == pytest.approx(2 / 3)
    # the decision: score ≥ τ flags
    assert cal.decide("iou_gap_adv", _row(0.2, 0.0, 0.30)) == (0.30, pytest.approx(0.30), True)
    assert cal.decide("iou_gap_adv", _row(0.2, 0.0, 0.29))[2] is False


def test_calibrate_without_false_negatives_falls_back_to_all_defects() -> None:
    rows = [_row(0.9, 0.5, 0.5), _row(0.8, 0.2, 0.1), _row(0.1, 0.0, 0.0)]
    cal = calibrate(rows, [1, 1, 0], model_version="m", engine={})
    assert cal.methods["msp"]["positives"].startswith("all_defects")
    assert cal.tau("msp") == pytest.approx(0.8)


def test_calibrate_refuses_a_split_without_defects() -> None:
    with pytest.raises(CalibrationError, match="no defect"):
        calibrate([_row(0.1, 0, 0)], [0], model_version="m", engine={})


def test_sidecar_round_trip_and_version_check(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rows = [_row(0.4, 0.2, 0.3), _row(0.3, -0.1, 0.5), _row(0.1, 0.0, 0.1), _row(0.2, 0.4, -0.2)]
    cal = calibrate(rows, [1, 1, 0, 0], model_version="v7", engine={"theta": 0.5})
    ckpt = tmp_path / "model.pt"
    cal.save(sidecar_path(ckpt))
    assert sidecar_path(ckpt).name == "model.pt.calibration.json"
    back = load_calibration(ckpt, "v7")
    assert back is not None and back.to_dict() == cal.to_dict()
    with pytest.raises(CalibrationError, match="not 'v8'"):
        load_calibration(ckpt, "v8")
    assert load_calibration(tmp_path / "other.pt") is None


def test_fusion_is_a_standardised_logistic_model() -> None:
    fusion = Fusion(["iou_gap"], mean=[0.1], scale=[0.2], coef=[2.0], intercept=-1.0)
    # σ(-1 + 2 * (0.5 - 0.1) / 0.2) = σ(3)
    assert fusion.score({"iou_gap": 0.5}) == pytest.approx(1 / (1 + math.exp(-3.0)))
    rng = np.random.default_rng(0)
    y = np.array([0] * 40 + [1] * 10)
    rows = [{"iou_gap": float(rng.normal(1.0 if t else 0.0, 0.3)), "p_defect": 0.2} for t in y]
    fitted = Fusion.fit(rows, y.tolist(), features=["iou_gap"])
    assert fitted.coef[0] > 0  # the informative feature gets a positive weight
    assert (
        Calibration.from_dict(
            {**Calibration("m", "val", 1.0, {}, {}, {"fusion": fitted}).to_dict()}
        ).fusion
        == fitted
    )


# -- statistics -----------------------------------------------------------------------------------
def test_clopper_pearson_known_values() -> None:
    # Exact values: k=0 of n=10 -> upper 1 - 0.025^(1/10); k=n=10 -> lower 0.025^(1/10)
    lo, hi = clopper_pearson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10), abs=1e-9)
    lo, hi = clopper_pearson(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 10), abs=1e-9)
    lo, hi = clopper_pearson(5, 10)  # textbook: [0.187, 0.813]
    assert lo == pytest.approx(0.1871, abs=1e-4) and hi == pytest.approx(0.8129, abs=1e-4)


def test_method_metrics_hand_case() -> None:
    y = np.array([1, 1, 0, 0, 0, 0])
    s = np.array([0.9, 0.4, 0.5, 0.3, 0.2, 0.1])
    m = method_metrics(y, s, np.full(6, 0.45), n_boot=50)
    # pairs (pos > neg): 0.9 beats all 4, 0.4 beats 3 of 4 -> AUROC 7/8
    assert m["auroc"] == pytest.approx(7 / 8)
    # τ at full recall = 0.4 -> TN with score ≥ 0.4: only 0.5 -> 1/4
    assert m["tn_flag_rate_at_full_recall"] == pytest.approx(0.25)
    # τ = 0.45 -> flags 0.9 (FN) and 0.5 (TN)
    assert m["fn_recall_at_tau"] == pytest.approx(0.5)
    assert m["tn_flag_rate_at_tau"] == pytest.approx(0.25)
    assert m["fn_recall_ci95"] == pytest.approx(list(clopper_pearson(1, 2)))


def test_compute_metrics_counts_and_orientation() -> None:
    rows = [_row(0.4, 0.5, 0.5, energy=-1.0), _row(0.1, -0.5, -0.5, energy=-5.0), _row(0.9, 0, 0)]
    cal = Calibration("m", "val", 1.0, {}, {m: {"tau": 0.0} for m in ("msp", "iou_gap")})
    out = compute_metrics(rows, np.array([1, 0, 1]), [cal], n_boot=20)
    c = out["counts"]
    assert (c["n_images"], c["n_predicted_ok"], c["n_false_negative"], c["n_true_negative"]) == (
        3,
        2,
        1,
        1,
    )
    assert c["accuracy"] == pytest.approx(2 / 3) and c["defect_recall"] == pytest.approx(0.5)
    assert out["methods"]["msp"]["auroc"] == 1.0  # the FN has the higher p_defect
    assert out["methods"]["iou_gap"]["auroc"] == 1.0
    assert "energy" not in out["methods"]  # no τ for it in this calibration


# -- the commands, end to end on a tiny synthetic dataset ----------------------------------------------
@pytest.mark.slow
def test_train_calibrate_evaluate_end_to_end(tmp_path, single_thread) -> None:  # type: ignore[no-untyped-def]
    manifest = tiny_manifest(tmp_path, n_ok=40, n_defect=30, size=48)
    ckpt = tmp_path / "m.pt"
    runner = CliRunner()
    recipe = ["--image-size", "48", "--epochs", "3", "--batch-size", "16", "--threads", "1"]
    r = runner.invoke(
        main,
        [
            "train",
            "--manifest",
            str(manifest),
            "--out",
            str(ckpt),
            *recipe,
            "--snapshot-epochs",
            "1",
        ],
    )
    assert r.exit_code == 0, r.output
    assert ckpt.is_file() and (tmp_path / "m-epoch1.pt").is_file()
    assert "val accuracy" in r.output

    r = runner.invoke(
        main, ["calibrate", "--manifest", str(manifest), "--model", str(ckpt), "--threads", "1"]
    )
    assert r.exit_code == 0, r.output
    cal = json.loads(sidecar_path(ckpt).read_text())
    assert set(cal["methods"]) >= {"msp", "energy", "iou_gap", "iou_gap_adv"}
    assert cal["engine"]["target_layer"] == "layer4" and cal["split"] == "val"

    out = tmp_path / "eval"
    r = runner.invoke(
        main,
        [
            "evaluate",
            "--manifest",
            str(manifest),
            "--model",
            str(ckpt),
            "--out",
            str(out),
            "--bootstrap",
            "50",
            "--threads",
            "1",
        ],
    )
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    test_rows = (out / "rows.csv").read_text().strip().splitlines()[1:]
    c = metrics["counts"]
    assert (
        c["n_images"]
        == len(test_rows)
        == sum(1 for line in manifest.read_text().splitlines() if line.endswith(",test"))
    )
    assert c["n_predicted_ok"] == c["n_false_negative"] + c["n_true_negative"]
    for name in ("roc.png", "report.md"):
        assert (out / name).stat().st_size > 0
    for m in metrics["methods"].values():
        assert set(m) >= {
            "auroc",
            "auroc_ci95",
            "tn_flag_rate_at_full_recall",
            "fn_recall_at_tau",
            "fn_recall_ci95",
            "tn_flag_rate_at_tau",
            "tau",
        }

    # without the adversarial step the *_adv methods are absent and overlays fall back to iou_gap
    out_n = tmp_path / "eval-none"
    r = runner.invoke(
        main,
        [
            "evaluate",
            "--manifest",
            str(manifest),
            "--model",
            str(ckpt),
            "--out",
            str(out_n),
            "--bootstrap",
            "20",
            "--threads",
            "1",
            "--attack",
            "none",
        ],
    )
    assert r.exit_code == 0, r.output
    mn = json.loads((out_n / "metrics.json").read_text())
    assert "iou_gap_adv" not in mn["methods"] and "iou_gap" in mn["methods"]

    out_k = tmp_path / "oof"
    r = runner.invoke(
        main,
        [
            "evaluate",
            "--manifest",
            str(manifest),
            "--folds",
            "2",
            "--out",
            str(out_k),
            "--bootstrap",
            "20",
            *recipe,
            "--epochs",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output
    mk = json.loads((out_k / "metrics.json").read_text())
    assert mk["counts"]["n_images"] == 70  # every image scored once, out of fold
    assert len(mk["calibration"]) == 2 and (out_k / "folds" / "fold1.pt").is_file()
