"""Full-recall rules and recall bounds (worker/engine/full_recall.py): hand tables and oracles."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from scipy import stats

from worker.engine.full_recall import (
    OrRule,
    PercentileRule,
    best_single_method_at_full_recall,
    fit_max_percentile_rule,
    fit_or_rule,
    recall_lower_bound,
)

NAN = float("nan")

# -- recall lower bound -----------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 8, 36])
def test_all_caught_bound_is_alpha_to_the_one_over_n(n):
    assert recall_lower_bound(n, n, 0.95) == pytest.approx(0.05 ** (1 / n), abs=1e-9)


def test_recall_bound_hand_values():
    assert recall_lower_bound(8, 8) == pytest.approx(0.68766, abs=1e-5)
    assert recall_lower_bound(1, 1) == pytest.approx(0.05, abs=1e-9)
    assert recall_lower_bound(36, 36) == pytest.approx(0.92015, abs=1e-5)
    # caught < n: the Beta quantile
    for caught, n in [(7, 8), (30, 36), (1, 5)]:
        ref = stats.beta.ppf(0.05, caught, n - caught + 1)
        assert recall_lower_bound(caught, n) == pytest.approx(ref, abs=1e-9)
    assert recall_lower_bound(7, 8) == pytest.approx(0.52932, abs=1e-5)
    assert recall_lower_bound(0, 5) == 0.0
    # 99 % confidence is more cautious than 95 %
    assert recall_lower_bound(8, 8, 0.99) == pytest.approx(0.01 ** (1 / 8), abs=1e-9)


def test_recall_bound_rejects_bad_input():
    with pytest.raises(ValueError, match="n must be"):
        recall_lower_bound(0, 0)
    with pytest.raises(ValueError, match="caught must be"):
        recall_lower_bound(9, 8)
    with pytest.raises(ValueError, match="caught must be"):
        recall_lower_bound(-1, 8)
    with pytest.raises(ValueError, match="confidence"):
        recall_lower_bound(8, 8, 1.0)


# -- OR rule ----------------------------------------------------------------------------------

#: 4 positives then 10 negatives; methods A, B, C. No single method isolates the positives:
#: A catches P1, P2 high, B catches P3, P4 high, C is mediocre for all.
_TABLE = np.array(
    [
        # A     B     C
        [0.90, 0.10, 0.50],  # P1
        [0.80, 0.20, 0.40],  # P2
        [0.15, 0.85, 0.45],  # P3
        [0.05, 0.95, 0.55],  # P4
        [0.82, 0.30, 0.60],  # N1  (A ≥ 0.80)
        [0.70, 0.50, 0.30],  # N2
        [0.60, 0.80, 0.20],  # N3
        [0.50, 0.70, 0.70],  # N4
        [0.40, 0.60, 0.10],  # N5
        [0.30, 0.40, 0.65],  # N6
        [0.20, 0.10, 0.35],  # N7
        [0.10, 0.20, 0.42],  # N8
        [0.00, 0.90, 0.05],  # N9  (B ≥ 0.85)
        [0.25, 0.30, 0.58],  # N10
    ]
)
_Y = np.array([1] * 4 + [0] * 10)
_NAMES = ["A", "B", "C"]


def _brute_force(scores: np.ndarray, y: np.ndarray) -> tuple[int, tuple[float | None, ...]]:
    """Every combination of (positive score or unused) per method, by plain loops; returns the
    fewest negatives flagged and the tie-broken thresholds (fewer methods, larger thresholds)."""
    pos, neg = scores[y == 1], scores[y == 0]
    options = [sorted({v for v in pos[:, j] if not math.isnan(v)}) for j in range(scores.shape[1])]
    best_key, best_t = None, None
    for combo in itertools.product(*[[*opts, None] for opts in options]):

        def flagged(row: np.ndarray, combo: tuple[float | None, ...] = combo) -> bool:
            return any(t is not None and row[j] >= t for j, t in enumerate(combo))

        if not all(flagged(r) for r in pos):
            continue
        n_neg = sum(flagged(r) for r in neg)
        used = sum(t is not None for t in combo)
        key = (n_neg, used, *(-math.inf if t is None else -t for t in combo))
        if best_key is None or key < best_key:
            best_key, best_t = key, combo
    assert best_key is not None and best_t is not None
    return int(best_key[0]), best_t


def test_or_rule_catches_every_positive_with_fewer_negatives_than_any_single_method():
    rule = fit_or_rule(_TABLE, _Y, _NAMES)
    assert rule.search == "exact"
    assert rule.thresholds == (0.80, 0.85, None) and rule.used == ("A", "B")
    flags = rule.flags(_TABLE)
    assert flags[:4].all()
    assert flags[4:].tolist() == [True] + [False] * 7 + [True, False]  # N1 and N9
    assert rule.negatives_flagged == 2 and rule.n_positives == 4 and rule.n_negatives == 10
    # single methods at full recall, by hand: A ≥ 0.05 flags 9, B ≥ 0.10 flags 10,
    # C ≥ 0.40 flags N1, N4, N6, N8, N10 = 5
    single = [int((_TABLE[4:, j] >= _TABLE[:4, j].min()).sum()) for j in range(3)]
    assert single == [9, 10, 5]
    assert rule.negatives_flagged <= min(single)
    assert best_single_method_at_full_recall(_TABLE, _Y) == (2, 5)
    assert (rule.negatives_flagged, rule.thresholds) == _brute_force(_TABLE, _Y)


def test_or_rule_returns_a_single_method_when_it_is_optimal():
    table = _TABLE.copy()
    table[:4, 1] = [0.81, 0.83, 0.85, 0.95]  # B now separates the positives …
    table[12, 1] = 0.30  # … once N9 is lowered: every negative B ≤ 0.80
    rule = fit_or_rule(table, _Y, _NAMES)
    assert rule.thresholds == (None, 0.81, None) and rule.used == ("B",)
    assert rule.negatives_flagged == 0
    assert rule.flags(table).tolist() == [True] * 4 + [False] * 10


def test_or_rule_nan_scores_never_flag():
    table = _TABLE.copy()
    table[0, 0] = NAN  # P1 has no A score: it must be caught another way
    table[4, 0] = NAN  # N1 no longer flagged by A
    table[5, :] = NAN  # N2 has no score at all
    rule = fit_or_rule(table, _Y, _NAMES)
    assert rule.flags(table)[:4].all()
    assert not rule.flags(table)[5]
    n_neg, thresholds = _brute_force(table, _Y)
    assert (rule.negatives_flagged, rule.thresholds) == (n_neg, thresholds)
    assert rule.flags(np.full((2, 3), NAN)).tolist() == [False, False]
    hopeless = _TABLE.copy()
    hopeless[2, :] = NAN
    with pytest.raises(ValueError, match=r"rows \[2\] have no finite score"):
        fit_or_rule(hopeless, _Y, _NAMES)


@pytest.mark.parametrize("seed", range(6))
def test_or_rule_exact_search_matches_brute_force_on_random_tables(seed):
    rng = np.random.default_rng(seed)
    n_pos, n_neg, m = 5, 25, 3
    scores = rng.random((n_pos + n_neg, m)).round(2)
    scores[:n_pos] += 0.2 * rng.random((n_pos, m))  # positives a bit higher, with overlap
    scores[rng.random(scores.shape) < 0.1] = NAN
    scores[:n_pos, 0] = np.where(np.isnan(scores[:n_pos]).all(axis=1), 0.5, scores[:n_pos, 0])
    y = np.array([1] * n_pos + [0] * n_neg)
    rule = fit_or_rule(scores, y, ["a", "b", "c"])
    assert rule.flags(scores)[y == 1].all()
    assert int(rule.flags(scores)[y == 0].sum()) == rule.negatives_flagged
    assert (rule.negatives_flagged, rule.thresholds) == _brute_force(scores, y)
    greedy = fit_or_rule(scores, y, ["a", "b", "c"], exact_cap=1)
    assert greedy.search == "greedy" and greedy.flags(scores)[y == 1].all()
    assert rule.negatives_flagged <= greedy.negatives_flagged
    try:
        _, single = best_single_method_at_full_recall(scores, y)
    except ValueError:
        return  # no single method catches every positive
    assert greedy.negatives_flagged <= single


def test_or_rule_greedy_finds_the_hand_table_optimum():
    rule = fit_or_rule(_TABLE, _Y, _NAMES, exact_cap=1)
    assert rule.search == "greedy"
    assert rule.thresholds == (0.80, 0.85, None) and rule.negatives_flagged == 2


def test_or_rule_serialises_and_validates():
    rule = fit_or_rule(_TABLE, _Y, _NAMES)
    back = OrRule.from_dict(json.loads(json.dumps(rule.to_dict())))
    assert back == rule
    assert back.flags(_TABLE).tolist() == rule.flags(_TABLE).tolist()
    with pytest.raises(ValueError, match="not an OR rule"):
        OrRule.from_dict({"kind": "max_percentile"})
    with pytest.raises(ValueError, match="methods"):
        rule.flags(_TABLE[:, :2])
    with pytest.raises(ValueError, match="no positive"):
        fit_or_rule(_TABLE[4:], _Y[4:], _NAMES)
    with pytest.raises(ValueError, match="0 \\(negative\\) and 1"):
        fit_or_rule(_TABLE, _Y * 2, _NAMES)
    with pytest.raises(ValueError, match="names"):
        fit_or_rule(_TABLE, _Y, ["A", "B"])
    with pytest.raises(ValueError, match="inf"):
        fit_or_rule(np.where(_TABLE == 0.9, np.inf, _TABLE), _Y, _NAMES)
    with pytest.raises(ValueError, match="finite or None"):
        OrRule(names=("A",), thresholds=(math.inf,))


# -- max-percentile rule ----------------------------------------------------------------------


def test_percentile_rule_hand_case():
    """TN scores: A = 1, 2, 2, 3 (n = 4); B = 10, NaN, 30, 20 (n = 3 finite).
    ECDF_A(2) = 3/4, ECDF_A(0.5) = 0, ECDF_A(3) = 1, ECDF_A(2.5) = 3/4; ECDF_B(20) = 2/3."""
    tn = np.array([[1.0, 10.0], [2.0, NAN], [2.0, 30.0], [3.0, 20.0]])
    rule = fit_max_percentile_rule(tn, ["A", "B"])
    q = np.array([[2.0, 20.0], [0.5, 25.0], [3.0, NAN], [NAN, NAN], [2.5, 5.0]])
    np.testing.assert_allclose(
        rule.percentiles(q),
        np.array([[0.75, 2 / 3], [0.0, 2 / 3], [1.0, NAN], [NAN, NAN], [0.75, 0.0]]),
    )
    np.testing.assert_allclose(rule.score(q), [0.75, 2 / 3, 1.0, NAN, 0.75])
    # every calibration TN scores at most 1, the highest exactly 1
    s = rule.score(tn)
    assert np.nanmax(s) == 1.0 and (s <= 1.0).all()


def test_percentile_rule_serialises_and_validates():
    tn = np.array([[1.0, 10.0], [2.0, NAN], [2.0, 30.0], [3.0, 20.0]])
    rule = fit_max_percentile_rule(tn, ["A", "B"])
    back = PercentileRule.from_dict(json.loads(json.dumps(rule.to_dict())))
    assert back.names == ("A", "B")
    assert [r.tolist() for r in back.reference] == [[1.0, 2.0, 2.0, 3.0], [10.0, 20.0, 30.0]]
    q = np.array([[2.0, 20.0], [0.5, 25.0]])
    np.testing.assert_array_equal(back.score(q), rule.score(q))
    with pytest.raises(ValueError, match="finite true-negative"):
        fit_max_percentile_rule(np.array([[1.0, NAN], [2.0, NAN]]), ["A", "B"])
    with pytest.raises(ValueError, match="methods"):
        rule.score(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="max-percentile"):
        PercentileRule.from_dict({"kind": "or"})
