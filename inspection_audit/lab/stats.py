"""Statistics of the evaluation protocol (docs/design.md §4): AUROC with a bootstrap interval,
the TN flag rate at full FN recall, FN recall at τ with a Clopper–Pearson interval.

Population: images the production model predicts ``ok``; positives are false negatives,
negatives true negatives. scikit-learn computes AUROC, scipy the exact binomial intervals.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from worker.engine.calibration import Calibration
from worker.engine.methods import REGISTRY


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact two-sided binomial (Clopper–Pearson) interval for ``k`` successes in ``n`` trials.

    Computed by ``scipy.stats.binomtest(k, n).proportion_ci(1 - alpha, method="exact")``;
    ``(nan, nan)`` when ``n == 0``.
    """
    from scipy.stats import binomtest

    if n == 0:
        return (float("nan"), float("nan"))
    ci = binomtest(k, n).proportion_ci(confidence_level=1 - alpha, method="exact")
    return float(ci.low), float(ci.high)


def bootstrap_auroc(
    y: np.ndarray, s: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Percentile 95 % interval of AUROC, resampling positives and negatives separately."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if len(pos) == 0 or len(neg) == 0:
        return (float("nan"), float("nan"))
    vals = []
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        vals.append(roc_auc_score(y[idx], s[idx]))
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def tn_rate_at_recall(y: np.ndarray, s: np.ndarray, recall: float) -> float | None:
    """Share of true negatives flagged by the largest threshold that flags at least ``recall``
    of the false negatives (``score ≥ τ`` flags; τ = the ⌈recall·n⌉-th highest FN score)."""
    pos, neg = s[y == 1], s[y == 0]
    if pos.size == 0 or neg.size == 0:
        return None
    k = max(1, math.ceil(recall * pos.size - 1e-9))
    tau = float(np.sort(pos)[::-1][k - 1])
    return float((neg >= tau).mean())


def bootstrap_tn_rate_at_full_recall(
    y: np.ndarray, s: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Percentile 95 % interval of the TN flag rate at 100 % FN recall, resampling false
    negatives and true negatives separately (the lowest-scored miss decides each replicate)."""
    rng = np.random.default_rng(seed)
    pos, neg = s[y == 1], s[y == 0]
    if pos.size == 0 or neg.size == 0:
        return (float("nan"), float("nan"))
    vals = np.empty(n_boot)
    for b in range(n_boot):
        tau = rng.choice(pos, pos.size).min()
        vals[b] = (rng.choice(neg, neg.size) >= tau).mean()
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def method_metrics(
    y: np.ndarray,
    scores: np.ndarray,
    taus: np.ndarray,
    n_boot: int = 1000,
    promised: Sequence[float] = (),
) -> dict[str, Any]:
    """Metrics of one method on the predicted-ok population.

    Args:
        y: ``int[N]``, 1 = false negative, 0 = true negative.
        scores: ``float[N]`` (higher = more suspicious).
        taus: ``float[N]`` the τ each row is judged with (one value, or one per fold).
        n_boot: bootstrap replicates for the intervals.
        promised: the recall lower bound each calibration promised at its τ (one per fold).

    Returns:
        ``auroc`` (+ ``auroc_ci95``), ``tn_flag_rate_at_full_recall`` (+ bootstrap
        ``…_ci95``), ``tn_flag_rate_at_recall_95``, ``tn_flag_rate_at_recall_90``,
        ``fn_recall_at_tau`` (+ Clopper–Pearson ``fn_recall_ci95``),
        ``recall_lower_bound_at_tau`` (the smallest promise), ``tn_flag_rate_at_tau``, ``tau``
        and, at 100 % recall, ``blocking_miss`` (the row index of the lowest-scored false
        negative: the one that decides τ) with its score's rank among the true negatives.
    """
    from sklearn.metrics import roc_auc_score

    pos, neg = y == 1, y == 0
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    out: dict[str, Any] = {"n_false_negative": n_pos, "n_true_negative": n_neg}
    if n_pos and n_neg:
        out["auroc"] = float(roc_auc_score(y, scores))
        out["auroc_ci95"] = list(bootstrap_auroc(y, scores, n_boot))
        tau_full = float(scores[pos].min())
        out["tn_flag_rate_at_full_recall"] = float((scores[neg] >= tau_full).mean())
        out["tn_flag_rate_at_full_recall_ci95"] = list(
            bootstrap_tn_rate_at_full_recall(y, scores, n_boot)
        )
        out["tn_flag_rate_at_recall_95"] = tn_rate_at_recall(y, scores, 0.95)
        out["tn_flag_rate_at_recall_90"] = tn_rate_at_recall(y, scores, 0.90)
        idx = np.flatnonzero(pos)
        worst = int(idx[np.argmin(scores[idx])])
        out["blocking_miss"] = {
            "row": worst,
            "score": float(scores[worst]),
            "true_negatives_at_or_above": int((scores[neg] >= scores[worst]).sum()),
        }
    else:
        out["auroc"] = None
        out["auroc_ci95"] = [None, None]
        out["tn_flag_rate_at_full_recall"] = None
        out["tn_flag_rate_at_full_recall_ci95"] = [None, None]
        out["tn_flag_rate_at_recall_95"] = None
        out["tn_flag_rate_at_recall_90"] = None
    flagged = scores >= taus
    k = int((flagged & pos).sum())
    out["fn_recall_at_tau"] = k / n_pos if n_pos else None
    out["fn_recall_ci95"] = list(clopper_pearson(k, n_pos)) if n_pos else [None, None]
    out["recall_lower_bound_at_tau"] = float(min(promised)) if promised else None
    out["tn_flag_rate_at_tau"] = float((flagged & neg).sum() / n_neg) if n_neg else None
    unique = np.unique(taus)
    out["tau"] = (
        float(unique[0]) if len(unique) == 1 else (float(np.mean(taus)) if len(unique) else None)
    )
    if len(unique) > 1:
        out["tau_note"] = "mean of per-fold τ; each image judged with its own fold's τ"
    return out


def pointing_game(
    maps: Sequence[Mapping[str, Any]], masks: Sequence[Any], alpha: float = 0.05
) -> dict[str, Any]:
    """How often each map's maximum lies inside the defect mask (the pointing game; J. Zhang et
    al., *Top-down Neural Attention by Excitation Backprop*, ECCV 2016).

    Args:
        maps: per image, map name → ``float[h, w]`` (any size; the mask is resized to it).
        masks: per image, ``bool[H, W]`` defect mask (None: image skipped).
        alpha: 1 − confidence of the Clopper–Pearson interval.

    Returns:
        map name → ``{"hits", "n", "rate", "ci95"}``; a map counts a hit when any of its
        maximal pixels falls inside the mask (resized with nearest neighbour), so a flat map
        hits only if the mask covers it all.
    """
    import torch
    import torch.nn.functional as F

    hits: dict[str, list[bool]] = {}
    for mp, mask in zip(maps, masks, strict=True):
        if mask is None:
            continue
        m = torch.as_tensor(np.asarray(mask, dtype=np.float32))
        for name, value in mp.items():
            t = torch.as_tensor(value).float()
            mk = F.interpolate(m[None, None], size=tuple(t.shape), mode="nearest")[0, 0] > 0.5
            at_max = t >= t.max()
            hits.setdefault(name, []).append(bool((at_max & mk).any()))
    out: dict[str, Any] = {}
    for name, h in hits.items():
        k, n = int(sum(h)), len(h)
        out[name] = {
            "hits": k,
            "n": n,
            "rate": k / n if n else None,
            "ci95": list(clopper_pearson(k, n, alpha)),
        }
    return out


def compute_metrics(
    rows: Sequence[Mapping[str, Any]],
    labels: np.ndarray,
    calibrations: Sequence[Calibration],
    row_cal: np.ndarray | None = None,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """``counts`` and per-method metrics (docs/design.md §4) for rows judged by ``calibrations``.

    Every method of the registry that every calibration has a τ for is reported.
    ``row_cal[i]`` is the index of the calibration that judges row ``i`` (default: 0).
    """
    row_cal = np.zeros(len(rows), dtype=np.int64) if row_cal is None else row_cal
    p = np.array([r["p_defect"] for r in rows])
    pred_def = p >= 0.5
    y = np.asarray(labels)
    pred_ok = ~pred_def
    counts = {
        "n_images": int(len(rows)),
        "n_defect": int((y == 1).sum()),
        "n_ok": int((y == 0).sum()),
        "n_predicted_ok": int(pred_ok.sum()),
        "n_false_negative": int((pred_ok & (y == 1)).sum()),
        "n_true_negative": int((pred_ok & (y == 0)).sum()),
        "accuracy": float((pred_def == (y == 1)).mean()),
        "defect_recall": float((pred_def & (y == 1)).sum() / max(int((y == 1).sum()), 1)),
    }
    idx = np.flatnonzero(pred_ok)
    yy = y[idx]
    methods: dict[str, Any] = {}
    for m in REGISTRY.names():
        s = [calibrations[row_cal[i]].score(m, rows[int(i)]) for i in idx]
        t = [calibrations[row_cal[i]].tau(m) for i in idx]
        cal_taus = [c.tau(m) for c in calibrations]
        if any(v is None for v in s) or any(v is None for v in t) or None in cal_taus:
            continue
        promised = [
            c.methods[m]["recall_lower_bound"]
            for c in calibrations
            if c.methods.get(m, {}).get("recall_lower_bound") is not None
        ]
        methods[m] = method_metrics(
            yy, np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64), n_boot, promised
        )
        if "blocking_miss" in methods[m]:
            methods[m]["blocking_miss"]["row"] = int(idx[methods[m]["blocking_miss"]["row"]])
        if methods[m]["tau"] is None:  # nothing predicted ok: report the calibrated τ itself
            methods[m]["tau"] = float(np.mean(np.asarray(cal_taus, dtype=np.float64)))
    return {"counts": counts, "methods": methods}
