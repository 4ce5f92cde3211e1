"""Full-recall decision rules as fitted scoring methods (no torch import).

Both are fitted on the calibration split only (nested out of fold: each fold model's inner
validation fifth) over :data:`RULE_INPUTS`, the unfitted methods whose scores are present:

* ``or_rule`` — :func:`worker.engine.full_recall.fit_or_rule`: per-method thresholds chosen
  together so that their OR catches every calibration false negative with the fewest true
  negatives. As a score it is the largest standardised margin over the used methods,
  ``max_m (s_m − t_m) / σ_m`` (``σ_m``: the standard deviation of method ``m``'s true-negative
  scores on the calibration split), so ``score ≥ 0`` is exactly the OR and the score ranks
  images for the review queue;
* ``percentile_rule`` — :func:`worker.engine.full_recall.fit_max_percentile_rule`: the largest
  percentile of an image's scores among the calibration true negatives (no fitted weights).

Population for fitting: images predicted ``ok``; positives are false negatives.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.engine.full_recall import (
    OrRule,
    PercentileRule,
    fit_max_percentile_rule,
    fit_or_rule,
)
from worker.engine.fusion import FitError

#: Unfitted methods a rule may combine (those present in the calibration rows are used).
RULE_INPUTS = (
    "msp",
    "iou_gap_adv",
    "ensemble_mean",
    "snapshot_ensemble_mean",
    "views_mean",
    "auditor_views_mean",
    "anomaly_imagenet",
    "anomaly_own",
)


def _table(
    rows: Sequence[Mapping[str, Any]], names: Sequence[str]
) -> np.ndarray[Any, np.dtype[np.float64]]:
    from worker.engine.methods import REGISTRY

    out = np.full((len(rows), len(names)), np.nan)
    for j, name in enumerate(names):
        method = REGISTRY.get(name)
        for i, r in enumerate(rows):
            v = method.score(r)
            if v is not None:
                out[i, j] = v
    return out


def _inputs(rows: Sequence[Mapping[str, Any]], y: np.ndarray[Any, Any]) -> list[str]:
    """The rule inputs registered and scored on every calibration positive."""
    from worker.engine.methods import REGISTRY

    names = [n for n in RULE_INPUTS if n in REGISTRY]
    table = _table([r for r, t in zip(rows, y, strict=True) if t == 1], names)
    return [n for j, n in enumerate(names) if table.size and np.isfinite(table[:, j]).all()]


@dataclass(frozen=True)
class OrRuleState:
    """A fitted :class:`OrRule` and the true-negative scale of each used method."""

    rule: OrRule
    scale: tuple[float, ...]

    def score(self, row: Mapping[str, Any]) -> float | None:
        """``max_m (s_m − t_m) / σ_m`` over the used methods (None when none is scored)."""
        values = _table([row], self.rule.names)[0]
        best = -math.inf
        for v, t, s in zip(values, self.rule.thresholds, self.scale, strict=True):
            if t is not None and math.isfinite(v):
                best = max(best, (v - t) / s)
        return None if best == -math.inf else best

    def to_dict(self) -> dict[str, Any]:
        return {**self.rule.to_dict(), "scale": list(self.scale)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OrRuleState:
        d = dict(d)
        scale = tuple(float(v) for v in d.pop("scale"))
        return cls(OrRule.from_dict(d), scale)


def fit_or(rows: Sequence[Mapping[str, Any]], labels: Sequence[int]) -> OrRuleState:
    """Fit ``or_rule`` (see the module docstring).

    Raises:
        FitError: no positive, or no rule input scored on every positive.
    """
    y = np.asarray(labels, dtype=np.int64)
    if not (y == 1).any() or not (y == 0).any():
        raise FitError("the OR rule needs false negatives and true negatives")
    names = _inputs(rows, y)
    if not names:
        raise FitError("no rule input is scored on every calibration false negative")
    table = _table(rows, names)
    rule = fit_or_rule(table, y, names)
    tn = table[y == 0]
    scale = []
    for j in range(len(names)):
        col = tn[:, j][np.isfinite(tn[:, j])]
        s = float(col.std()) if col.size > 1 else 0.0
        scale.append(s if s > 1e-12 else 1.0)
    return OrRuleState(rule, tuple(scale))


def fit_percentile(rows: Sequence[Mapping[str, Any]], labels: Sequence[int]) -> PercentileRule:
    """Fit ``percentile_rule`` on the calibration true negatives.

    Raises:
        FitError: no true negative, or no rule input scored on every positive.
    """
    y = np.asarray(labels, dtype=np.int64)
    if not (y == 0).any() or not (y == 1).any():
        raise FitError("the percentile rule needs false negatives and true negatives")
    names = _inputs(rows, y)
    if not names:
        raise FitError("no rule input is scored on every calibration false negative")
    try:
        return fit_max_percentile_rule(_table(rows, names)[y == 0], names)
    except ValueError as exc:
        raise FitError(str(exc)) from exc


def percentile_score(rule: PercentileRule, row: Mapping[str, Any]) -> float | None:
    """The rule's score of one row (None when no input is scored)."""
    v = float(rule.score(_table([row], rule.names))[0])
    return None if math.isnan(v) else v
