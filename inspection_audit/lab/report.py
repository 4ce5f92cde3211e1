"""``report.md`` of an evaluation: counts, the method table, where the baseline wins."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from worker.engine.methods import REGISTRY


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{100 * v:.1f} %" if pct else f"{v:.3f}"


def _ci(v: Sequence[Any], pct: bool = False) -> str:
    if not v or v[0] is None:
        return ""
    return f" [{_fmt(v[0], pct)}, {_fmt(v[1], pct)}]"


def write_report(out: Path, metrics: dict[str, Any], context: dict[str, Any]) -> None:
    """``report.md``: counts, the method table (sorted by workload at full recall), the bar
    against ``msp``, the miss that blocks each method, and the pointing game."""
    c, ms = metrics["counts"], metrics["methods"]
    lines = [f"# Evaluation: {context['title']}", ""]
    lines += [f"- {k}: `{v}`" for k, v in context["facts"].items()]
    lines += [
        "",
        "## Production model on this population",
        "",
        "| images | predicted ok | false negatives | true negatives | accuracy | defect recall |",
        "|---|---|---|---|---|---|",
        f"| {c['n_images']} | {c['n_predicted_ok']} | {c['n_false_negative']} | {c['n_true_negative']} "
        f"| {_fmt(c['accuracy'], True)} | {_fmt(c['defect_recall'], True)} |",
        "",
        "## Methods (population: images predicted ok; positive = false negative)",
        "",
        "Sorted by the share of true negatives flagged at 100 % FN recall (the review workload "
        "that catches every miss). Intervals: bootstrap (AUROC, TN @ 100 %), Clopper–Pearson "
        "(recall). *Promised* is the one-sided 95 % lower bound on recall that the calibration "
        "could honestly promise at its τ (the smallest over folds).",
        "",
        "| method | AUROC [95 % CI] | TN @ 100 % FN [95 % CI] | TN @ 95 % FN | TN @ 90 % FN "
        "| FN recall at τ [95 % CI] | promised | TN flagged at τ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(
        ms,
        key=lambda m: (
            ms[m].get("tn_flag_rate_at_full_recall") is None,
            ms[m].get("tn_flag_rate_at_full_recall") or 0.0,
        ),
    )
    for m in order:
        v = ms[m]
        lines.append(
            f"| `{m}` | {_fmt(v['auroc'])}{_ci(v['auroc_ci95'])} "
            f"| {_fmt(v['tn_flag_rate_at_full_recall'], True)}"
            f"{_ci(v.get('tn_flag_rate_at_full_recall_ci95', []), True)} "
            f"| {_fmt(v.get('tn_flag_rate_at_recall_95'), True)} "
            f"| {_fmt(v.get('tn_flag_rate_at_recall_90'), True)} "
            f"| {_fmt(v['fn_recall_at_tau'], True)}{_ci(v['fn_recall_ci95'], True)} "
            f"| {_fmt(v.get('recall_lower_bound_at_tau'), True)} "
            f"| {_fmt(v['tn_flag_rate_at_tau'], True)} |"
        )
    lines += ["", "## The bar: fewer true negatives flagged than `msp`, at 100 % and at 95 %", ""]
    base = ms.get("msp")
    if base is None or base.get("tn_flag_rate_at_full_recall") is None:
        lines.append("The baseline could not be computed on this population.")
    else:
        b100, b95 = base["tn_flag_rate_at_full_recall"], base.get("tn_flag_rate_at_recall_95")
        lines.append(
            f"`msp` flags {_fmt(b100, True)} of true negatives at 100 % FN recall and "
            f"{_fmt(b95, True)} at 95 %."
        )
        for m in order:
            v = ms[m]
            if m == "msp" or v.get("tn_flag_rate_at_full_recall") is None:
                continue
            t100, t95 = v["tn_flag_rate_at_full_recall"], v.get("tn_flag_rate_at_recall_95")
            both = t100 < b100 and t95 is not None and b95 is not None and t95 < b95
            half = (
                both and t100 <= b100 / 2 and t95 is not None and b95 is not None and t95 <= b95 / 2
            )
            verdict = (
                "**beats `msp` at both**" + (" (half as many or fewer)" if half else "")
                if both
                else "does not beat `msp` at both"
            )
            lines.append(f"- `{m}`: {_fmt(t100, True)} / {_fmt(t95, True)} — {verdict}.")
    lines += [
        "",
        "## Which miss blocks each method at 100 % FN recall",
        "",
        "The false negative a method scores lowest decides its τ at full recall; every true "
        "negative scored at or above it is flagged with it.",
        "",
        "| method | blocking miss | defect type | line's P(defect) | its score | TN at or above |",
        "|---|---|---|---|---|---|",
    ]
    for m in order:
        miss = ms[m].get("blocking_miss")
        if miss is None:
            continue
        lines.append(
            f"| `{m}` | `{miss.get('path', miss['row'])}` | {miss.get('defect_type', '')} "
            f"| {_fmt(miss.get('p_defect'))} | {_fmt(miss['score'])} "
            f"| {miss['true_negatives_at_or_above']} of {ms[m]['n_true_negative']} |"
        )
    pointing = metrics.get("pointing_game") or {}
    if any(pointing.values()):
        lines += [
            "",
            "## Where the maps point (pointing game on the false negatives with a mask)",
            "",
            "A hit: the map's maximum lies inside the defect mask. Interval: Clopper–Pearson 95 %.",
            "",
            "| population | map | hits | rate [95 % CI] |",
            "|---|---|---|---|",
        ]
        for population, games in pointing.items():
            for name, g in games.items():
                lines.append(
                    f"| {population.replace('_', ' ')} | `{name}` | {g['hits']} of {g['n']} "
                    f"| {_fmt(g['rate'], True)}{_ci(g['ci95'], True)} |"
                )
    lines += ["", "## What each method is", ""]
    lines += [f"- `{m}`: {REGISTRY.get(m).label}" for m in ms if m in REGISTRY]
    lines += ["", "## Choices and splits", ""] + [f"- {n}" for n in context["notes"]]
    lines += [
        "",
        "## Files",
        "",
        "- `metrics.json`: every number above.",
        "- `roc.png`: ROC curves.",
        "- `overlay_*.png`: the image (defect mask outlined) and every map the audit made, at "
        "the image's own aspect ratio, each map's maximum marked; `overlay_blocking_miss_<m>.png` "
        "is the miss that blocks method `m` at 100 % FN recall.",
        "- `rows.csv`: every image's measurements and every method's score.",
        "",
        f"Generated by `{context['command']}` on {context['date']} ({context['machine']}).",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
