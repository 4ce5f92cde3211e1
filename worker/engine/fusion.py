"""Logistic fusion of an audit's measurements (a fitted scoring method; no torch import).

``σ(b + Σ_i c_i (f_i − μ_i) / s_i)``: an L2-regularised, class-balanced logistic regression
(scikit-learn) on standardised features, fitted on the calibration split only. Features are
measurement names (``iou_gap``, ``energy`` …) or ``logit_<name>`` for the logit of a
probability measurement (``logit_p_defect``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

FUSION_FEATURES = ("iou_gap", "iou_gap_adv", "logit_p_defect", "energy", "logit_p_defect_adv")


class FitError(ValueError):
    """A fitted method cannot be fitted on these data (e.g. only one class present)."""


def _logit(p: float | None) -> float:
    if p is None or not math.isfinite(p):
        return 0.0
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def feature_value(row: Mapping[str, Any], name: str) -> float:
    """One fusion feature of a measurement row; a missing or non-finite value counts as 0.

    ``logit_<m>`` is the logit of probability ``m`` clipped to [1e-6, 1 − 1e-6].
    """
    if name.startswith("logit_"):
        return _logit(row.get(name.removeprefix("logit_")))
    v = row.get(name)
    return float(v) if v is not None and math.isfinite(float(v)) else 0.0


@dataclass
class Fusion:
    """Logistic fusion ``σ(b + Σ_i c_i (f_i − μ_i) / s_i)`` of measurement-row features."""

    features: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    C: float = 0.1

    def score(self, row: Mapping[str, Any]) -> float:
        """The fused probability-like score in (0, 1) (higher = more suspicious)."""
        t = self.intercept + sum(
            c * (feature_value(row, f) - m) / s
            for f, m, s, c in zip(self.features, self.mean, self.scale, self.coef, strict=True)
        )
        return 1.0 / (1.0 + math.exp(-max(min(t, 50.0), -50.0)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Fusion:
        return cls(**dict(d))

    @classmethod
    def fit(
        cls,
        rows: Sequence[Mapping[str, Any]],
        y: Sequence[int],
        features: Sequence[str] = FUSION_FEATURES,
        C: float = 0.1,
    ) -> Fusion:
        """Fit on rows with labels ``y`` (1 = false negative). Uses scikit-learn.

        Features absent from every row are dropped.

        Raises:
            FitError: only one class present.
        """
        from sklearn.linear_model import LogisticRegression

        yv = np.asarray(y, dtype=np.int64)
        if len(set(yv.tolist())) < 2:
            raise FitError("fusion needs both false negatives and true negatives")
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
