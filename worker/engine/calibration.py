"""Threshold calibration and the decision policy (DESIGN.md §3.7).

Population: images the production model predicts ``ok``. Positives: false negatives (label
``defect``); negatives: true negatives. For every scoring method, ``τ`` is the largest
threshold that still flags at least ``target_recall`` of the calibration false negatives
(``score ≥ τ`` flags). It is stored with the model version in a JSON sidecar next to the
checkpoint (``<checkpoint>.calibration.json``), with the engine configuration it was made with.

Methods, all oriented so that higher = more suspicious:

* ``msp`` — ``p_defect`` (maximum-softmax baseline; same as lowering the decision threshold);
* ``energy`` — ``−logsumexp(z)`` (W. Liu et al., *Energy-based Out-of-distribution Detection*,
  NeurIPS 2020);
* ``iou_gap`` / ``iou_gap_adv`` — the reliability score ``r`` and ``r_adv``;
* ``iou_defect`` / ``iou_defect_adv`` — the defect term ``IoU(S_defect, S_agn)`` alone (the
  "defect-only" variant of the sweep);
* ``fusion`` — an L2-regularised logistic regression on standardised features, fitted on the
  calibration split only (class-balanced).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

METHODS = ("msp", "energy", "iou_gap", "iou_gap_adv", "iou_defect", "iou_defect_adv", "fusion")
FUSION_FEATURES = ("iou_gap", "iou_gap_adv", "logit_p_defect", "energy", "logit_p_defect_adv")


class CalibrationError(ValueError):
    """Calibration is impossible with these data (e.g. no positives at all)."""


def _logit(p: float | None) -> float:
    if p is None or not math.isfinite(p):
        return 0.0
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def feature_value(row: Mapping[str, Any], name: str) -> float:
    """One fusion feature of an audit row (missing values count as 0)."""
    if name == "logit_p_defect":
        return _logit(row.get("p_defect"))
    if name == "logit_p_defect_adv":
        return _logit(row.get("p_defect_adv"))
    v = row.get(name)
    return float(v) if v is not None and math.isfinite(float(v)) else 0.0


def method_score(row: Mapping[str, Any], method: str, fusion: Fusion | None = None) -> float | None:
    """The score of ``method`` for one row (higher = more suspicious); ``None`` if unavailable.

    Raises:
        ValueError: unknown method.
    """
    if method == "msp":
        return row.get("p_defect")
    if method == "energy":
        return row.get("energy")
    if method == "iou_gap":
        return row.get("iou_gap")
    if method == "iou_gap_adv":
        return row.get("iou_gap_adv")
    if method in ("iou_defect", "iou_defect_adv"):
        return row.get(method)
    if method == "fusion":
        return None if fusion is None else fusion.score(row)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def tau_for_recall(positive_scores: Sequence[float], target_recall: float = 1.0) -> float:
    """Largest ``τ`` such that ``score ≥ τ`` flags at least ``target_recall`` of the positives.

    Args:
        positive_scores: scores of the calibration false negatives (``None``/NaN are skipped).
        target_recall: in (0, 1].

    Returns:
        ``τ`` (the ``⌈target·n⌉``-th highest positive score).

    Raises:
        CalibrationError: no positive scores; ValueError: target outside (0, 1].
    """
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    s = np.sort(
        np.asarray(
            [v for v in positive_scores if v is not None and math.isfinite(v)], dtype=np.float64
        )
    )[::-1]
    if s.size == 0:
        raise CalibrationError("no positive scores to calibrate on")
    k = max(1, math.ceil(target_recall * s.size - 1e-9))
    return float(s[k - 1])


@dataclass
class Fusion:
    """Logistic fusion ``σ(b + Σ_i c_i (f_i − μ_i) / s_i)`` of audit-row features."""

    features: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    C: float = 0.1

    def score(self, row: Mapping[str, Any]) -> float:
        t = self.intercept + sum(
            c * (feature_value(row, f) - m) / s
            for f, m, s, c in zip(self.features, self.mean, self.scale, self.coef, strict=True)
        )
        return 1.0 / (1.0 + math.exp(-max(min(t, 50.0), -50.0)))

    @classmethod
    def fit(
        cls,
        rows: Sequence[Mapping[str, Any]],
        y: Sequence[int],
        features: Sequence[str] = FUSION_FEATURES,
        C: float = 0.1,
    ) -> Fusion:
        """Fit on rows with labels ``y`` (1 = false negative). Uses scikit-learn.

        Raises:
            CalibrationError: only one class present.
        """
        from sklearn.linear_model import LogisticRegression

        yv = np.asarray(y, dtype=np.int64)
        if len(set(yv.tolist())) < 2:
            raise CalibrationError("fusion needs both false negatives and true negatives")
        feats = [
            f for f in features if any(r.get(f.removeprefix("logit_")) is not None for r in rows)
        ]
        x = np.array([[feature_value(r, f) for f in feats] for r in rows], dtype=np.float64)
        mean = x.mean(axis=0)
        scale = x.std(axis=0)
        scale[scale < 1e-12] = 1.0
        clf = LogisticRegression(C=C, class_weight="balanced", max_iter=1000)
        clf.fit((x - mean) / scale, yv)
        return cls(
            feats, mean.tolist(), scale.tolist(), clf.coef_[0].tolist(), float(clf.intercept_[0]), C
        )


@dataclass
class Calibration:
    """τ per method for one model version, plus the fusion model; JSON-serialisable."""

    model_version: str
    split: str
    target_recall: float
    engine: dict[str, Any]
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    fusion: Fusion | None = None

    def tau(self, method: str) -> float | None:
        m = self.methods.get(method)
        return None if m is None else m.get("tau")

    def decide(
        self, method: str, row: Mapping[str, Any]
    ) -> tuple[float | None, float | None, bool]:
        """``(score, τ, suspected_false_negative)`` for one audit row under ``method``.

        A row is flagged when its score is at least ``τ``. A missing score or τ never flags.

        Raises:
            ValueError: unknown method.
        """
        s = method_score(row, method, self.fusion)
        t = self.tau(method)
        flagged = s is not None and t is not None and s >= t
        return s, t, bool(flagged)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fusion"] = None if self.fusion is None else asdict(self.fusion)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
        fusion = Fusion(**d["fusion"]) if d.get("fusion") else None
        return cls(
            model_version=str(d["model_version"]),
            split=str(d.get("split", "")),
            target_recall=float(d.get("target_recall", 1.0)),
            engine=dict(d.get("engine", {})),
            methods={k: dict(v) for k, v in d.get("methods", {}).items()},
            fusion=fusion,
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))
        tmp.replace(path)
        return path


def sidecar_path(checkpoint: str | Path) -> Path:
    """``<checkpoint>.calibration.json`` next to the checkpoint."""
    p = Path(checkpoint)
    return p.with_name(p.name + ".calibration.json")


def load_calibration(
    checkpoint: str | Path, model_version: str | None = None
) -> Calibration | None:
    """The sidecar of ``checkpoint``, or ``None`` when there is none.

    Raises:
        CalibrationError: the sidecar is unreadable, or made for another ``model_version``.
    """
    p = sidecar_path(checkpoint)
    if not p.is_file():
        return None
    try:
        cal = Calibration.from_dict(json.loads(p.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CalibrationError(f"calibration {p}: unreadable ({exc})") from exc
    if model_version is not None and cal.model_version != model_version:
        raise CalibrationError(
            f"calibration {p} is for model_version {cal.model_version!r}, not {model_version!r}"
        )
    return cal


def calibrate(
    rows: Sequence[Mapping[str, Any]],
    labels: Sequence[int],
    *,
    model_version: str,
    engine: Mapping[str, Any],
    split: str = "val",
    target_recall: float = 1.0,
    fusion_C: float = 0.1,
) -> Calibration:
    """Pick ``τ`` for every method on labelled rows.

    Args:
        rows: audit rows (``rows()`` of :class:`~worker.engine.score.ReliabilityScores`), one per image.
        labels: 1 = ``defect``, 0 = ``ok``, one per row.
        model_version, engine, split: recorded in the result.
        target_recall: target false-negative recall in (0, 1] (default 1.0).

    The population is the rows predicted ``ok`` (``p_defect < 0.5``). If it holds no false
    negative (a model that missed nothing on this split), the labelled defects of the whole
    split stand in as positives, and ``positives`` says so.

    Raises:
        CalibrationError: the split has no defect at all.
    """
    if len(rows) != len(labels):
        raise ValueError(f"{len(rows)} rows but {len(labels)} labels")
    y = np.asarray(labels, dtype=np.int64)
    pred_ok = np.array([(r.get("p_defect") or 0.0) < 0.5 for r in rows])
    fn = pred_ok & (y == 1)
    tn = pred_ok & (y == 0)
    if fn.sum() > 0:
        pos_mask, positives = fn, "false_negatives"
    elif (y == 1).sum() > 0:
        pos_mask, positives = (y == 1), "all_defects (no false negatives on this split)"
    else:
        raise CalibrationError(f"split {split!r} has no defect images to calibrate on")
    fusion: Fusion | None = None
    fit_mask = pred_ok if (fn.sum() > 0 and tn.sum() > 0) else np.ones(len(rows), dtype=bool)
    fit_y = (y == 1)[fit_mask]
    try:
        fusion = Fusion.fit(
            [rows[int(i)] for i in np.flatnonzero(fit_mask)], fit_y.astype(int).tolist(), C=fusion_C
        )
    except CalibrationError:
        fusion = None
    cal = Calibration(model_version, split, float(target_recall), dict(engine), {}, fusion)
    for method in METHODS:
        scores = [method_score(rows[i], method, fusion) for i in range(len(rows))]
        pos = [scores[i] for i in np.flatnonzero(pos_mask) if scores[i] is not None]
        if not pos:
            continue
        tau = tau_for_recall(pos, target_recall)  # type: ignore[arg-type]
        neg = [scores[i] for i in np.flatnonzero(tn) if scores[i] is not None]
        cal.methods[method] = {
            "tau": tau,
            "n_positives": len(pos),
            "n_true_negatives": len(neg),
            "positives": positives,
            "tn_flag_rate": float(np.mean([s >= tau for s in neg])) if neg else None,  # type: ignore[operator]
        }
    return cal
