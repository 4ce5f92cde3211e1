"""Full-recall decision rules over several second-opinion scores, and honest recall promises.

The audit's goal is to flag *every* false negative of the production model (a defective part
the line called ``ok``) while sending as few true negatives as possible to a human. With ``M``
scores per image (higher = more suspicious), two rules are fitted on a calibration split:

* :func:`fit_or_rule` — flag an image when *any* method's score reaches that method's
  threshold, the thresholds chosen *together* so that every calibration positive is flagged
  and as few negatives as possible are. This is a weighted set-cover-like problem; it is solved
  exactly by enumeration when small, greedily otherwise.
* :func:`fit_max_percentile_rule` — no fitted weights: each score becomes its percentile among
  the calibration true negatives, and the image's score is the largest of them (a union-bound
  style combination; one threshold on it then sets the operating point).

"All calibration positives caught" is not a promise about recall on new parts. What the data
do support is a one-sided Clopper–Pearson bound (:func:`recall_lower_bound`): with ``n`` of
``n`` caught, recall ≥ ``α^(1/n)`` at confidence ``1 − α`` (8 of 8 → 0.69 at 95 %) —
C. J. Clopper and E. S. Pearson, *The use of confidence or fiducial limits illustrated in the
case of the binomial*, Biometrika 1934.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
from numpy.typing import NDArray

#: Largest number of threshold combinations ``Π_m (P_m + 1)`` searched exhaustively by
#: :func:`fit_or_rule`; above it the greedy local search is used.
EXACT_SEARCH_CAP = 2_000_000
#: Bytes of packed flags handled per enumeration block.
_BLOCK_BYTES = 1 << 24


# -- recall bound -----------------------------------------------------------------------------


def recall_lower_bound(caught: int, n: int, confidence: float = 0.95) -> float:
    """One-sided exact (Clopper–Pearson) lower confidence bound on recall.

    ``scipy.stats.binomtest(caught, n, alternative="greater")``
    ``.proportion_ci(confidence_level=confidence, method="exact").low``; equals
    ``Beta.ppf(1 − confidence, caught, n − caught + 1)`` for ``caught ≥ 1`` (0 for
    ``caught = 0``) and ``(1 − confidence)^(1/n)`` when ``caught = n``.

    Args:
        caught: positives flagged, ``0 ≤ caught ≤ n``.
        n: positives seen, ``n ≥ 1``.
        confidence: in (0, 1).

    Returns:
        The bound in [0, 1].

    Raises:
        ValueError: ``n < 1``, ``caught`` outside ``[0, n]``, or ``confidence`` outside (0, 1).
    """
    if isinstance(n, bool) or isinstance(caught, bool) or int(n) != n or int(caught) != caught:
        raise ValueError(f"caught and n must be ints, got {caught!r} and {n!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1 (no positives, no recall to bound), got {n}")
    if not 0 <= caught <= n:
        raise ValueError(f"caught must be in [0, {n}], got {caught}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    from scipy import stats  # lazy: scipy.stats costs ~0.7 s to import, only this needs it

    res = stats.binomtest(int(caught), int(n), alternative="greater")
    return float(res.proportion_ci(confidence_level=confidence, method="exact").low)


# -- OR rule ----------------------------------------------------------------------------------


def _as_scores(scores: Any, m: int | None = None) -> NDArray[np.float64]:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"scores must be [N, M], got shape {arr.shape}")
    if m is not None and arr.shape[1] != m:
        raise ValueError(f"scores have {arr.shape[1]} methods, the rule has {m}")
    return arr


def _check_names(names: Sequence[str], m: int) -> tuple[str, ...]:
    out = tuple(str(n) for n in names)
    if len(out) != m:
        raise ValueError(f"{len(out)} names for {m} score columns")
    if len(set(out)) != len(out):
        raise ValueError(f"names repeat: {list(out)}")
    return out


@dataclass(frozen=True)
class OrRule:
    """Flag an image when ``score_m ≥ t_m`` for any used method ``m`` (NaN never flags).

    Attributes:
        names: method names, in score-column order.
        thresholds: ``t_m`` per method, None for an unused method.
        search: ``"exact"`` or ``"greedy"`` (how it was fitted).
        n_positives, n_negatives: calibration split sizes.
        negatives_flagged: calibration negatives the rule flags.
    """

    names: tuple[str, ...]
    thresholds: tuple[float | None, ...]
    search: str = "exact"
    n_positives: int = 0
    n_negatives: int = 0
    negatives_flagged: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", _check_names(self.names, len(self.names)))
        ts = tuple(None if t is None else float(t) for t in self.thresholds)
        if len(ts) != len(self.names):
            raise ValueError(f"{len(ts)} thresholds for {len(self.names)} methods")
        if any(t is not None and not math.isfinite(t) for t in ts):
            raise ValueError(f"thresholds must be finite or None, got {ts}")
        object.__setattr__(self, "thresholds", ts)

    @property
    def used(self) -> tuple[str, ...]:
        """Names of the methods with a threshold."""
        return tuple(n for n, t in zip(self.names, self.thresholds, strict=True) if t is not None)

    def flags(self, scores: Any) -> NDArray[np.bool_]:
        """``bool[N]`` for ``scores float[N, M]`` (columns in :attr:`names` order).

        Raises:
            ValueError: ``scores`` is not ``[N, len(names)]``.
        """
        arr = _as_scores(scores, len(self.names))
        out = np.zeros(arr.shape[0], dtype=bool)
        with np.errstate(invalid="ignore"):
            for j, t in enumerate(self.thresholds):
                if t is not None:
                    out |= arr[:, j] >= t
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; :meth:`from_dict` inverts it."""
        return {
            "kind": "or",
            "names": list(self.names),
            "thresholds": list(self.thresholds),
            "search": self.search,
            "n_positives": self.n_positives,
            "n_negatives": self.n_negatives,
            "negatives_flagged": self.negatives_flagged,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OrRule:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: not an OR rule, or malformed.
        """
        if d.get("kind") != "or":
            raise ValueError(f"not an OR rule: kind {d.get('kind')!r}")
        try:
            return cls(
                names=tuple(d["names"]),
                thresholds=tuple(d["thresholds"]),
                search=str(d.get("search", "exact")),
                n_positives=int(d.get("n_positives", 0)),
                n_negatives=int(d.get("n_negatives", 0)),
                negatives_flagged=int(d.get("negatives_flagged", 0)),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed OR rule: {exc!r}") from exc


def _candidates(pos: NDArray[np.float64]) -> list[NDArray[np.float64]]:
    """Per method: its distinct finite positive scores, ascending (the "unused" slot is last)."""
    return [np.unique(col[~np.isnan(col)]) for col in pos.T]


def _flag_table(col: NDArray[np.float64], cand: NDArray[np.float64]) -> NDArray[np.bool_]:
    """``bool[len(cand) + 1, N]``: candidate j flags row i (``col ≥ cand[j]``); last row unused."""
    with np.errstate(invalid="ignore"):
        table = col[None, :] >= cand[:, None]
    return np.vstack([table, np.zeros((1, col.shape[0]), dtype=bool)])


def _key(neg: int, digits: Sequence[int]) -> tuple[int, ...]:
    """Sort key: fewer negatives, then fewer methods, then larger thresholds (in method order)."""
    return (neg, sum(1 for d in digits if d >= 0), *(-d if d >= 0 else -(10**12) for d in digits))


def _exact_search(
    pos_t: list[NDArray[np.bool_]],
    neg_t: list[NDArray[np.bool_]],
    base_pos: NDArray[np.bool_] | None = None,
    base_neg: NDArray[np.bool_] | None = None,
) -> tuple[list[int], int] | None:
    """Exhaustive search over all threshold combinations, in blocks, on packed bit flags.

    ``base_pos``/``base_neg`` (``bool[P]``/``bool[N_neg]``) are rows already flagged by
    methods outside the search. Returns the best signed digits (−1 = unused) and the
    negatives flagged (base included), or None when no combination flags every positive.
    """
    sizes = [t.shape[0] for t in pos_t]
    pos_p = [np.packbits(t, axis=1) for t in pos_t]
    neg_p = [np.packbits(t, axis=1) for t in neg_t]
    n_pos, n_neg = pos_t[0].shape[1], neg_t[0].shape[1]
    full = np.packbits(np.ones(n_pos, dtype=bool))
    bp = np.packbits(np.zeros(n_pos, bool) if base_pos is None else base_pos)
    bn = np.packbits(np.zeros(n_neg, bool) if base_neg is None else base_neg)
    width = pos_p[0].shape[1] + neg_p[0].shape[1]
    block = max(1, _BLOCK_BYTES // max(1, width * len(sizes)))
    total = math.prod(sizes)
    best: tuple[int, ...] | None = None
    best_digits: list[int] = []
    for start in range(0, total, block):
        lin = np.arange(start, min(total, start + block))
        digits = np.unravel_index(lin, sizes)
        cov = bp | pos_p[0][digits[0]]
        for m in range(1, len(sizes)):
            cov |= pos_p[m][digits[m]]
        ok = np.all(cov == full, axis=1)
        if not ok.any():
            continue
        dig = [d[ok] for d in digits]
        negs = bn | neg_p[0][dig[0]]
        for m in range(1, len(sizes)):
            negs |= neg_p[m][dig[m]]
        neg_count = np.bitwise_count(negs).sum(axis=1, dtype=np.int64)
        # "digit" −1 = unused (the last slot), so larger thresholds = larger digits
        signed = [np.where(d == s - 1, -1, d) for d, s in zip(dig, sizes, strict=True)]
        used = np.sum([s >= 0 for s in signed], axis=0)
        tie = [np.where(s >= 0, -s, -(10**12)) for s in signed]
        order = np.lexsort([*reversed(tie), used, neg_count])
        i = int(order[0])
        cand_digits = [int(s[i]) for s in signed]
        key = _key(int(neg_count[i]), cand_digits)
        if best is None or key < best:
            best, best_digits = key, cand_digits
    if best is None:
        return None
    return best_digits, best[0]


def _block_size(sizes: Sequence[int], cap: int) -> int:
    """Largest ``s`` (≥ 1, < M) whose enumeration over every subset of ``s`` methods ≤ ``cap``."""
    m_count = len(sizes)
    s_best = 1
    for s in range(2, m_count):
        cost = sum(math.prod(sizes[j] for j in sub) for sub in combinations(range(m_count), s))
        if cost > cap:
            break
        s_best = s
    return s_best


def _greedy_search(
    pos_t: list[NDArray[np.bool_]], neg_t: list[NDArray[np.bool_]], cap: int
) -> tuple[list[int], int]:
    """Block coordinate descent, then single-threshold moves (see :func:`fit_or_rule`)."""
    m_count = len(pos_t)
    unused = [t.shape[0] - 1 for t in pos_t]
    s_block = _block_size([t.shape[0] for t in pos_t], cap)

    def flagged(
        tables: list[NDArray[np.bool_]], digits: Sequence[int], skip: Sequence[int] = ()
    ) -> NDArray[np.bool_]:
        f = np.zeros(tables[0].shape[1], dtype=bool)
        for m, d in enumerate(digits):
            if m not in skip:
                f |= tables[m][d]
        return f

    def key_of(digits: Sequence[int]) -> tuple[int, ...]:
        return _key(int(flagged(neg_t, digits).sum()), signed(digits))

    def signed(digits: Sequence[int]) -> list[int]:
        return [-1 if d == unused[m] else d for m, d in enumerate(digits)]

    def tighten(digits: list[int], fixed: int) -> list[int]:
        """Raise every other method's threshold as far as coverage allows, to a fixpoint."""
        changed = True
        while changed:
            changed = False
            for m in range(m_count):
                if m == fixed or digits[m] == unused[m]:
                    continue
                need = ~flagged(pos_t, digits, skip=(m,))
                if not need.any():
                    best_d = unused[m]
                else:
                    # the largest candidate that still flags every positive only m must flag
                    best_d = int(np.flatnonzero(pos_t[m][:, need].all(axis=1)).max())
                if best_d != digits[m]:
                    digits[m], changed = best_d, True
        return digits

    def descend(current: list[int]) -> tuple[list[int], tuple[int, ...]]:
        cur_key = key_of(current)
        improved = True
        while improved:
            improved = False
            # block moves: re-optimise s methods exactly, the others' thresholds fixed
            for sub in combinations(range(m_count), s_block):
                found = _exact_search(
                    [pos_t[j] for j in sub],
                    [neg_t[j] for j in sub],
                    flagged(pos_t, current, skip=sub),
                    flagged(neg_t, current, skip=sub),
                )
                if found is None:
                    continue
                trial = list(current)
                for j, d in zip(sub, found[0], strict=True):
                    trial[j] = unused[j] if d < 0 else d
                trial = tighten(trial, fixed=-1)
                key = key_of(trial)
                if key < cur_key:
                    current, cur_key, improved = trial, key, True
            # single moves: one method to one threshold, then the others raised
            for m in range(m_count):
                for d in range(pos_t[m].shape[0]):
                    if d == current[m]:
                        continue
                    trial = list(current)
                    trial[m] = d
                    if not flagged(pos_t, trial).all():
                        continue
                    trial = tighten(trial, fixed=m)
                    key = key_of(trial)
                    if key < cur_key:
                        current, cur_key, improved = trial, key, True
        return current, cur_key

    # starts: every method at its lowest positive score (flags every positive), tightened;
    # and each single method that alone flags every positive, at its lowest positive score
    starts = [tighten([0] * m_count, fixed=-1)]
    for m in range(m_count):
        if pos_t[m][0].all():
            single = list(unused)
            single[m] = 0
            starts.append(single)
    current, cur_key = min((descend(st) for st in starts), key=lambda r: r[1])
    return signed(current), cur_key[0]


def fit_or_rule(
    scores: Any,
    y: Any,
    names: Sequence[str],
    *,
    exact_cap: int = EXACT_SEARCH_CAP,
) -> OrRule:
    """Per-method thresholds whose OR flags every calibration positive and fewest negatives.

    For each method the threshold is either unused or one of that method's positive scores
    (any other value flags a superset of negatives for the same positives). When the number of
    combinations ``Π_m (P_m + 1)`` (``P_m`` = distinct finite positive scores of method ``m``)
    is at most ``exact_cap`` (default :data:`EXACT_SEARCH_CAP` = 2·10⁶), all are enumerated,
    vectorised in blocks over bit-packed flags, and the optimum is exact (about 1 s at the cap
    with 1,000 negatives). Above the cap a greedy search runs instead (a block coordinate
    descent): start with every method at its lowest positive score (which flags every
    positive) and raise each threshold as far as keeps every positive flagged; then, while
    anything improves, (1) for every subset of ``s`` methods — ``s`` the largest size whose
    subsets' enumeration stays within the cap together, at least 1 — find the exact optimum of
    those methods' thresholds with the other thresholds fixed, and (2) try every single move
    "set one method to one threshold (adding, moving or dropping it), then raise the others as
    far as possible"; keep any change that flags fewer negatives (or ties better). The descent
    also runs from each single method that alone flags every positive (at its lowest positive
    score), and the best end point wins. The result flags every positive and is never worse
    than the best single method, but is not guaranteed optimal.

    Ties are broken by fewer methods used, then by larger thresholds, compared
    lexicographically in ``names`` order (an unused method counts as the largest threshold).

    Args:
        scores: ``float64[N, M]`` calibration scores, higher = more suspicious; NaN never flags.
        y: ``int[N]`` with 1 for a positive (a false negative of the production model) and 0
            for a negative.
        names: ``M`` distinct method names.
        exact_cap: the enumeration limit.

    Returns:
        The :class:`OrRule`; ``rule.flags(scores)`` is True on every positive.

    Raises:
        ValueError: shapes do not match, ``y`` is not 0/1, a score is ±inf, there is no
            positive, or a positive has no finite score (no rule can flag it).
    """
    arr = _as_scores(scores)
    n, m = arr.shape
    names_t = _check_names(names, m)
    labels = np.asarray(y)
    if labels.shape != (n,):
        raise ValueError(f"y must have shape ({n},), got {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("y must contain only 0 (negative) and 1 (positive)")
    if np.isinf(arr).any():
        raise ValueError("scores must be finite or NaN, not ±inf")
    pos, neg = arr[labels == 1], arr[labels == 0]
    if pos.shape[0] == 0:
        raise ValueError("no positive (y == 1) to catch: the OR rule is undefined")
    hopeless = np.flatnonzero(np.isnan(pos).all(axis=1))
    if hopeless.size:
        rows = np.flatnonzero(labels == 1)[hopeless].tolist()
        raise ValueError(f"positives at rows {rows} have no finite score; no rule can flag them")
    cands = _candidates(pos)
    pos_t = [_flag_table(pos[:, j], cands[j]) for j in range(m)]
    neg_t = [_flag_table(neg[:, j], cands[j]) for j in range(m)]
    total = math.prod(len(c) + 1 for c in cands)
    found = _exact_search(pos_t, neg_t) if total <= exact_cap else None
    if found is not None:
        digits, n_flagged = found
        search = "exact"
    else:
        digits, n_flagged = _greedy_search(pos_t, neg_t, exact_cap)
        search = "greedy"
    thresholds = tuple(None if d < 0 else float(cands[j][d]) for j, d in enumerate(digits))
    return OrRule(
        names=names_t,
        thresholds=thresholds,
        search=search,
        n_positives=int(pos.shape[0]),
        n_negatives=int(neg.shape[0]),
        negatives_flagged=int(n_flagged),
    )


def best_single_method_at_full_recall(scores: Any, y: Any) -> tuple[int, int]:
    """``(method index, negatives flagged)`` of the best single method whose threshold at its
    lowest positive score flags every positive (NaN never flags); a baseline for :class:`OrRule`.

    Raises:
        ValueError: no method alone flags every positive.
    """
    arr = _as_scores(scores)
    labels = np.asarray(y)
    pos, neg = arr[labels == 1], arr[labels == 0]
    best: tuple[int, int] | None = None
    for j in range(arr.shape[1]):
        if pos.shape[0] == 0 or np.isnan(pos[:, j]).any():
            continue
        t = pos[:, j].min()
        with np.errstate(invalid="ignore"):
            count = int((neg[:, j] >= t).sum())
        if best is None or count < best[1]:
            best = (j, count)
    if best is None:
        raise ValueError("no single method flags every positive")
    return best


# -- max-percentile rule ----------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PercentileRule:
    """Max over methods of each score's percentile among calibration true negatives.

    ``percentile_m(s) = #{TN scores of m ≤ s} / n_m`` — the right-continuous empirical CDF,
    in [0, 1] — and ``score = max_m percentile_m`` (NaN scores are skipped; all NaN → NaN).
    The rule stores each method's sorted finite TN scores (``reference``), not a quantile
    grid: the ECDF is then exact (no interpolation or grid-resolution error, ties handled
    exactly), and a calibration split's true negatives number in the thousands, so storing
    them costs a few tens of kB.
    """

    names: tuple[str, ...]
    reference: tuple[NDArray[np.float64], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", _check_names(self.names, len(self.names)))
        refs = tuple(np.sort(np.asarray(r, dtype=np.float64)) for r in self.reference)
        if len(refs) != len(self.names):
            raise ValueError(f"{len(refs)} reference columns for {len(self.names)} methods")
        for name, r in zip(self.names, refs, strict=True):
            if r.ndim != 1 or r.size == 0 or not np.isfinite(r).all():
                raise ValueError(f"method {name!r} needs >= 1 finite true-negative score")
        object.__setattr__(self, "reference", refs)

    def percentiles(self, scores: Any) -> NDArray[np.float64]:
        """``float64[N, M]`` ECDF values in [0, 1]; NaN where the score is NaN."""
        arr = _as_scores(scores, len(self.names))
        out = np.full(arr.shape, np.nan)
        for j, ref in enumerate(self.reference):
            col = arr[:, j]
            ok = ~np.isnan(col)
            out[ok, j] = np.searchsorted(ref, col[ok], side="right") / ref.size
        return out

    def score(self, scores: Any) -> NDArray[np.float64]:
        """``float64[N]``: the largest per-method percentile (NaN only when all are NaN).

        Raises:
            ValueError: ``scores`` is not ``[N, len(names)]``.
        """
        pct = self.percentiles(scores)
        out = np.full(pct.shape[0], np.nan)
        some = ~np.isnan(pct).all(axis=1)
        out[some] = np.nanmax(pct[some], axis=1)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``reference`` as lists of floats); :meth:`from_dict` inverts it."""
        return {
            "kind": "max_percentile",
            "names": list(self.names),
            "reference": [r.tolist() for r in self.reference],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PercentileRule:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: not a percentile rule, or malformed.
        """
        if d.get("kind") != "max_percentile":
            raise ValueError(f"not a max-percentile rule: kind {d.get('kind')!r}")
        try:
            return cls(
                names=tuple(d["names"]), reference=tuple(np.asarray(r) for r in d["reference"])
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed max-percentile rule: {exc!r}") from exc


def fit_max_percentile_rule(scores_tn: Any, names: Sequence[str]) -> PercentileRule:
    """The :class:`PercentileRule` of the calibration split's true negatives.

    Args:
        scores_tn: ``float64[N_tn, M]`` scores of the true negatives (NaN and ±inf are
            dropped per method).
        names: ``M`` distinct method names.

    Raises:
        ValueError: shapes do not match, or a method has no finite true-negative score.
    """
    arr = _as_scores(scores_tn)
    names_t = _check_names(names, arr.shape[1])
    return PercentileRule(names=names_t, reference=tuple(col[np.isfinite(col)] for col in arr.T))
