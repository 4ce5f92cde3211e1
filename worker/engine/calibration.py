"""Threshold calibration and the decision policy (docs/design.md §3.7).

Population: images the production model predicts ``ok``. Positives: false negatives (label
``defect``); negatives: true negatives. For every scoring method of the registry
(:data:`worker.engine.methods.REGISTRY`), a fitted method's state is fitted first, then ``τ``
is the largest threshold that still flags at least ``target_recall`` of the calibration false
negatives (``score ≥ τ`` flags). Everything is stored with the model version in a JSON sidecar
next to the checkpoint (``<checkpoint>.calibration.json``), with the engine configuration it
was made with: τ is only valid for that configuration.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from worker.engine.fusion import FitError
from worker.engine.methods import REGISTRY, Measurements


class CalibrationError(ValueError):
    """Calibration is impossible with these data (e.g. no positives at all)."""


def tau_for_recall(positive_scores: Sequence[float | None], target_recall: float = 1.0) -> float:
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
class Calibration:
    """τ per method for one model version, plus each fitted method's state; JSON-serialisable.

    Attributes:
        model_version: the checkpoint's ``model_version`` (the sidecar is refused for another).
        split: the calibration split's name.
        target_recall: the target false-negative recall τ was set for.
        engine: the engine configuration (``EngineConfig.to_dict()``, with ``target_layer``).
        methods: per method, ``{"tau", "n_positives", "n_true_negatives", "positives",
            "tn_flag_rate"}``.
        states: per fitted method, its fitted state (e.g. the fusion's weights).
        second_opinions: what the audit measured besides the production model when τ was set
            (:meth:`worker.measure.AuditSuite.describe`: auditor and snapshot model versions,
            views, anomaly banks); τ of a second-opinion method is valid only for them.
    """

    model_version: str
    split: str
    target_recall: float
    engine: dict[str, Any]
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    states: dict[str, Any] = field(default_factory=dict)
    second_opinions: dict[str, Any] = field(default_factory=dict)

    @property
    def fusion(self) -> Any:
        """The fitted state of the ``fusion`` method, if any."""
        return self.states.get("fusion")

    def tau(self, method: str) -> float | None:
        """τ of ``method``, or ``None`` when it was not calibrated."""
        m = self.methods.get(method)
        return None if m is None else m.get("tau")

    def score(self, method: str, row: Measurements) -> float | None:
        """The score of ``method`` for one measurement row, with its fitted state.

        Raises:
            worker.engine.methods.UnknownMethodError: unknown method.
        """
        return REGISTRY.get(method).score(row, self.states.get(method))

    def scores(self, row: Measurements) -> dict[str, float | None]:
        """Every registered method's score for one row (``None`` where unavailable)."""
        return REGISTRY.scores(row, self.states)

    def decide(self, method: str, row: Measurements) -> tuple[float | None, float | None, bool]:
        """``(score, τ, suspected_false_negative)`` for one audit row under ``method``.

        A row is flagged when its score is at least ``τ``. A missing score or τ never flags.

        Raises:
            worker.engine.methods.UnknownMethodError: unknown method.
        """
        s = self.score(method, row)
        t = self.tau(method)
        flagged = s is not None and t is not None and s >= t
        return s, t, bool(flagged)

    def to_dict(self) -> dict[str, Any]:
        """The sidecar's JSON form (fitted states under ``states``)."""
        states = {}
        for name, state in self.states.items():
            method = REGISTRY.get(name)
            assert method.state_to_dict is not None
            states[name] = method.state_to_dict(state)
        return {
            "model_version": self.model_version,
            "split": self.split,
            "target_recall": self.target_recall,
            "engine": dict(self.engine),
            "methods": {k: dict(v) for k, v in self.methods.items()},
            "states": states,
            "second_opinions": dict(self.second_opinions),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
        """Read a sidecar dict (also the first format, with the fusion at top level).

        States of methods that are not registered in this process are ignored.

        Raises:
            KeyError, TypeError, ValueError: a malformed sidecar.
        """
        raw_states = dict(d.get("states") or {})
        if d.get("fusion") and "fusion" not in raw_states:
            raw_states["fusion"] = d["fusion"]
        states: dict[str, Any] = {}
        for name, raw in raw_states.items():
            if name not in REGISTRY or raw is None:
                continue
            method = REGISTRY.get(name)
            if method.state_from_dict is not None:
                states[name] = method.state_from_dict(raw)
        return cls(
            model_version=str(d["model_version"]),
            split=str(d.get("split", "")),
            target_recall=float(d.get("target_recall", 1.0)),
            engine=dict(d.get("engine", {})),
            methods={k: dict(v) for k, v in d.get("methods", {}).items()},
            states=states,
            second_opinions=dict(d.get("second_opinions") or {}),
        )

    def save(self, path: str | Path) -> Path:
        """Write the sidecar atomically; returns ``path``."""
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
    rows: Sequence[Measurements],
    labels: Sequence[int],
    *,
    model_version: str,
    engine: Mapping[str, Any],
    split: str = "val",
    target_recall: float = 1.0,
    second_opinions: Mapping[str, Any] | None = None,
) -> Calibration:
    """Fit every fitted method and pick ``τ`` for every registered method on labelled rows.

    Args:
        rows: measurement rows (``rows()`` of :class:`~worker.engine.score.ReliabilityScores`,
            plus any second-opinion numbers), one per image.
        labels: 1 = ``defect``, 0 = ``ok``, one per row.
        model_version, engine, split, second_opinions: recorded in the result.
        target_recall: target false-negative recall in (0, 1] (default 1.0).

    The population is the rows predicted ``ok`` (``p_defect < 0.5``). If it holds no false
    negative (a model that missed nothing on this split), the labelled defects of the whole
    split stand in as positives, and ``positives`` says so. Fitted methods are fitted on the
    predicted-ok rows when they hold both classes, else on every row; a method that cannot be
    fitted (one class only) is left out.

    Raises:
        CalibrationError: the split has no defect at all.
        ValueError: ``rows`` and ``labels`` differ in length.
    """
    if len(rows) != len(labels):
        raise ValueError(f"{len(rows)} rows but {len(labels)} labels")
    y = np.asarray(labels, dtype=np.int64)
    pred_ok = np.array([(r.get("p_defect") or 0.0) < 0.5 for r in rows], dtype=bool)
    fn = pred_ok & (y == 1)
    tn = pred_ok & (y == 0)
    if fn.sum() > 0:
        pos_mask, positives = fn, "false_negatives"
    elif (y == 1).sum() > 0:
        pos_mask, positives = (y == 1), "all_defects (no false negatives on this split)"
    else:
        raise CalibrationError(f"split {split!r} has no defect images to calibrate on")
    fit_mask = pred_ok if (fn.sum() > 0 and tn.sum() > 0) else np.ones(len(rows), dtype=bool)
    fit_rows = [rows[int(i)] for i in np.flatnonzero(fit_mask)]
    fit_y = (y == 1)[fit_mask].astype(int).tolist()
    cal = Calibration(
        model_version,
        split,
        float(target_recall),
        dict(engine),
        second_opinions=dict(second_opinions or {}),
    )
    for method in REGISTRY:
        if method.fit is not None:
            try:
                cal.states[method.name] = method.fit(fit_rows, fit_y)
            except (FitError, CalibrationError):
                continue
        scores = [cal.score(method.name, r) for r in rows]
        pos = [scores[int(i)] for i in np.flatnonzero(pos_mask)]
        pos_values = [v for v in pos if v is not None]
        if not pos_values:
            continue
        tau = tau_for_recall(pos_values, target_recall)
        neg = [v for v in (scores[int(i)] for i in np.flatnonzero(tn)) if v is not None]
        caught = sum(v >= tau for v in pos_values)
        cal.methods[method.name] = {
            "tau": tau,
            "n_positives": len(pos_values),
            "n_true_negatives": len(neg),
            "positives": positives,
            "tn_flag_rate": float(np.mean([v >= tau for v in neg])) if neg else None,
            **recall_promise(caught, len(pos_values), target_recall),
        }
    return cal


def recall_promise(
    caught: int, n: int, target_recall: float, confidence: float = 0.95
) -> dict[str, Any]:
    """What a τ set on ``n`` calibration misses can honestly promise.

    ``recall_lower_bound``: the one-sided ``confidence`` Clopper–Pearson lower bound on the
    recall of new misses, having caught ``caught`` of ``n`` (all ``n`` caught: ``α^(1/n)``, so 8
    of 8 promises only ≥ 68.8 %). ``certified``: the bound reaches ``target_recall``.
    ``misses_needed``: how many misses, all caught, would certify the target (None for a target
    of 1, which no finite sample certifies). ``warning``: a sentence when not certified.

    Raises:
        ValueError: ``n < 1`` or ``caught`` outside [0, n].
    """
    from worker.engine.full_recall import recall_lower_bound

    bound = recall_lower_bound(caught, n, confidence)
    alpha = 1.0 - confidence
    needed = None if target_recall >= 1.0 else math.ceil(math.log(alpha) / math.log(target_recall))
    certified = bound >= target_recall
    warning = None
    if not certified:
        warning = (
            f"τ catches {caught} of {n} calibration misses: at {confidence:.0%} confidence that "
            f"promises recall ≥ {bound:.1%} on new misses, not the target {target_recall:.0%}"
            + (
                f"; certifying {target_recall:.0%} needs ≥ {needed} misses, all caught"
                if needed is not None
                else " (no finite number of misses certifies 100 %)"
            )
        )
    return {
        "n_false_negatives_caught": int(caught),
        "recall_lower_bound": bound,
        "confidence": confidence,
        "certified": bool(certified),
        "misses_needed": needed,
        "warning": warning,
    }
