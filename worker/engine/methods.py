"""The registry of scoring methods: every method the product can decide with, declared once.

A scoring method turns an audit's *measurements* (the per-image numbers the engine and the
second opinions produce, e.g. ``p_defect``, ``iou_gap_adv``; see
:meth:`worker.engine.score.ReliabilityScores.rows`) into one score, oriented so that **higher
means more suspicious**. Each method declares:

* ``name`` and ``label`` (what it means, for reports and the review page);
* ``compute(measurements, state)`` — the function;
* ``needs_adversarial`` — whether it needs the adversarial pass (``attack != "none"``);
* ``fit`` — for a *fitted* method, how its state is fitted on the calibration split (the state
  is stored in the calibration sidecar); unfitted methods have ``fit=None``;
* ``higher_is_suspicious`` — the orientation of ``compute``'s raw value (the registry flips it
  when False, so every stored score reads the same way).

Settings validation, the CLI's choices, calibration, evaluation, reports, the database
(``audits.scores`` and the ``audit_scores`` view) and the review queue all read
:data:`REGISTRY`. Adding a method is one :class:`ScoringMethod` entry and its function. No torch
import here: the settings and the producer import this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

Measurements = Mapping[str, Any]
Family = Literal["baseline", "explanation", "second_opinion", "rule"]


class UnknownMethodError(ValueError):
    """A method name that is not in the registry."""


@dataclass(frozen=True)
class ScoringMethod:
    """One scoring method (see the module docstring).

    Attributes:
        name: unique identifier (``[a-z0-9_]+``), stored in the database and the sidecar.
        compute: ``(measurements, state) -> float | None``; ``None`` when an input is missing.
        label: one line saying what the score is.
        family: ``baseline``, ``explanation``, ``second_opinion`` or ``rule``.
        needs_adversarial: needs the adversarial pass's measurements (``*_adv``).
        fit: ``(rows, labels) -> state`` for a fitted method (rows are measurements, labels 1 =
            false negative); ``None`` for a method without fitted state.
        state_to_dict / state_from_dict: (de)serialise a fitted state for the sidecar.
        higher_is_suspicious: orientation of ``compute``'s raw value.
    """

    name: str
    compute: Callable[[Measurements, Any], float | None]
    label: str
    family: Family = "baseline"
    needs_adversarial: bool = False
    fit: Callable[[Sequence[Measurements], Sequence[int]], Any] | None = None
    state_to_dict: Callable[[Any], dict[str, Any]] | None = None
    state_from_dict: Callable[[Mapping[str, Any]], Any] | None = None
    higher_is_suspicious: bool = True

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c == "_" for c in self.name):
            raise ValueError(f"method name must be [A-Za-z0-9_]+, got {self.name!r}")
        if self.fit is not None and (self.state_to_dict is None or self.state_from_dict is None):
            raise ValueError(f"fitted method {self.name!r} needs state_to_dict and state_from_dict")

    @property
    def fitted(self) -> bool:
        """True when the method has state fitted on the calibration split."""
        return self.fit is not None

    def score(self, measurements: Measurements, state: Any = None) -> float | None:
        """The oriented score (higher = more suspicious), or ``None`` when it cannot be computed
        (a missing input, a fitted method without its state, a non-finite value)."""
        if self.fitted and state is None:
            return None
        try:
            raw = self.compute(measurements, state)
        except (KeyError, TypeError, ValueError, ArithmeticError):
            return None
        if raw is None:
            return None
        value = float(raw)
        if not math.isfinite(value):
            return None
        return value if self.higher_is_suspicious else -value


class MethodRegistry:
    """Name → :class:`ScoringMethod`, in registration order."""

    def __init__(self) -> None:
        self._methods: dict[str, ScoringMethod] = {}

    def register(self, method: ScoringMethod) -> ScoringMethod:
        """Add ``method``. Raises ValueError when the name is taken."""
        if method.name in self._methods:
            raise ValueError(f"a scoring method named {method.name!r} is already registered")
        self._methods[method.name] = method
        return method

    def unregister(self, name: str) -> None:
        """Remove a method (tests)."""
        self._methods.pop(name, None)

    @contextmanager
    def temporarily(self, method: ScoringMethod) -> Iterator[ScoringMethod]:
        """Register ``method`` for the duration of a ``with`` block (tests)."""
        self.register(method)
        try:
            yield method
        finally:
            self.unregister(method.name)

    def get(self, name: str) -> ScoringMethod:
        """The method called ``name``.

        Raises:
            UnknownMethodError: no such method; the message lists the registered names.
        """
        try:
            return self._methods[name]
        except KeyError:
            raise UnknownMethodError(
                f"unknown scoring method {name!r}; choose from {', '.join(self.names())}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._methods

    def __iter__(self) -> Iterator[ScoringMethod]:
        return iter(list(self._methods.values()))

    def names(self) -> list[str]:
        """Registered method names, in registration order."""
        return list(self._methods)

    def scores(
        self, measurements: Measurements, states: Mapping[str, Any] | None = None
    ) -> dict[str, float | None]:
        """Every registered method's score for one image (``None`` where unavailable)."""
        states = states or {}
        return {m.name: m.score(measurements, states.get(m.name)) for m in self}


#: The product's registry. Import it from here; never build a second list of methods.
REGISTRY = MethodRegistry()


def measurement(key: str) -> Callable[[Measurements, Any], float | None]:
    """A ``compute`` that reads one measurement as it is."""

    def compute(m: Measurements, _state: Any) -> float | None:
        return m.get(key)

    compute.__name__ = f"measurement_{key}"
    return compute


# --- the methods -----------------------------------------------------------------------------
def _fit_fusion(rows: Sequence[Measurements], labels: Sequence[int]) -> Any:
    from worker.engine.fusion import Fusion

    return Fusion.fit(rows, labels)


def _state_score(m: Measurements, state: Any) -> float | None:
    return float(state.score(m))


def _fusion_to_dict(state: Any) -> dict[str, Any]:
    return dict(state.to_dict())


def _fusion_from_dict(d: Mapping[str, Any]) -> Any:
    from worker.engine.fusion import Fusion

    return Fusion.from_dict(d)


def _fit_or_rule(rows: Sequence[Measurements], labels: Sequence[int]) -> Any:
    from worker.engine.rules import fit_or

    return fit_or(rows, labels)


def _or_rule_from_dict(d: Mapping[str, Any]) -> Any:
    from worker.engine.rules import OrRuleState

    return OrRuleState.from_dict(d)


def _fit_percentile_rule(rows: Sequence[Measurements], labels: Sequence[int]) -> Any:
    from worker.engine.rules import fit_percentile

    return fit_percentile(rows, labels)


def _percentile_score(m: Measurements, state: Any) -> float | None:
    from worker.engine.rules import percentile_score

    return percentile_score(state, m)


def _percentile_from_dict(d: Mapping[str, Any]) -> Any:
    from worker.engine.full_recall import PercentileRule

    return PercentileRule.from_dict(dict(d))


def _state_dict(state: Any) -> dict[str, Any]:
    return dict(state.to_dict())


def _second_opinion(name: str, label: str) -> ScoringMethod:
    return ScoringMethod(name, measurement(name), label, family="second_opinion")


BUILTIN_METHODS = (
    ScoringMethod(
        "msp",
        measurement("p_defect"),
        "max-softmax P(defect) of the production model (baseline; the same as lowering the "
        "line's threshold)",
    ),
    ScoringMethod(
        "energy",
        measurement("energy"),
        "energy score −logsumexp(z) of the production model's logits (Liu et al., 2020)",
    ),
    ScoringMethod(
        "iou_gap",
        measurement("iou_gap"),
        "IoU gap r = IoU(S_defect, S_agn) − IoU(S_ok, S_agn) (Dong et al., 2026)",
        family="explanation",
    ),
    ScoringMethod(
        "iou_gap_adv",
        measurement("iou_gap_adv"),
        "IoU gap r_adv after one adversarial step toward defect (the paper's score)",
        family="explanation",
        needs_adversarial=True,
    ),
    ScoringMethod(
        "iou_defect",
        measurement("iou_defect"),
        "IoU(S_defect, S_agn) alone (the defect-only variant)",
        family="explanation",
    ),
    ScoringMethod(
        "iou_defect_adv",
        measurement("iou_defect_adv"),
        "IoU(S_defect, S_agn) alone, after the adversarial step",
        family="explanation",
        needs_adversarial=True,
    ),
    ScoringMethod(
        "fusion",
        _state_score,
        "logistic fusion of r, r_adv, logit p_defect, logit p_defect(x') and energy, fitted on "
        "the calibration split",
        family="explanation",
        fit=_fit_fusion,
        state_to_dict=_fusion_to_dict,
        state_from_dict=_fusion_from_dict,
    ),
    # second opinions (worker/measure.py computes the measurements when a site turns them on)
    _second_opinion("auditor_mean", "mean P(defect) of the auditor models"),
    _second_opinion("auditor_max", "largest P(defect) among the auditor models"),
    _second_opinion(
        "ensemble_mean", "mean P(defect) of the production model and the auditors (deep ensemble)"
    ),
    _second_opinion(
        "ensemble_disagreement",
        "largest auditor P(defect) minus the production model's: how strongly an auditor "
        "disputes the line's call",
    ),
    _second_opinion("snapshot_mean", "mean P(defect) of the training run's snapshots"),
    _second_opinion(
        "snapshot_ensemble_mean",
        "mean P(defect) of the production model and its snapshots (a cheap ensemble)",
    ),
    _second_opinion("views_mean", "mean P(defect) of the production model over test-time views"),
    _second_opinion("views_max", "largest P(defect) of the production model over the views"),
    _second_opinion(
        "views_disagreement", "spread (max − min) of P(defect) over the test-time views"
    ),
    _second_opinion(
        "auditor_views_mean", "mean P(defect) of the auditors over the test-time views"
    ),
    _second_opinion(
        "anomaly_imagenet",
        "PatchCore distance of the image's patches to ok training patches (ImageNet "
        "EfficientNet-Lite0 features)",
    ),
    _second_opinion(
        "anomaly_own",
        "PatchCore distance of the image's patches to ok training patches (the production "
        "model's own features)",
    ),
    # full-recall rules over the methods above, fitted on the calibration split
    ScoringMethod(
        "or_rule",
        _state_score,
        "OR of per-method thresholds chosen together to catch every calibration miss; score = "
        "largest standardised margin over its methods",
        family="rule",
        fit=_fit_or_rule,
        state_to_dict=_state_dict,
        state_from_dict=_or_rule_from_dict,
    ),
    ScoringMethod(
        "percentile_rule",
        _percentile_score,
        "largest percentile of the image's scores among the calibration true negatives",
        family="rule",
        fit=_fit_percentile_rule,
        state_to_dict=_state_dict,
        state_from_dict=_percentile_from_dict,
    ),
)
for _method in BUILTIN_METHODS:
    REGISTRY.register(_method)
