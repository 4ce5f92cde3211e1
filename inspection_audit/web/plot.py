"""The overview's plot: audited, flagged and confirmed per day, as inline SVG (no script)."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

from markupsafe import Markup

SERIES = (("audited", "#9aa5b1"), ("flagged", "#f0a030"), ("confirmed", "#c0392b"))


def day_plot(rows: Sequence[dict[str, Any]], width: int = 760, height: int = 220) -> Markup:
    """Grouped bars per day (``rows`` from :func:`inspection_audit.web.queries.overview`'s
    ``per_day``: ``key`` = ``YYYY-MM-DD``, ``audited``, ``flagged``, ``confirmed``), with a
    y axis and a legend. An empty list gives a one-line note."""
    if not rows:
        return Markup('<p class="muted">No audits in this window.</p>')
    left, bottom, top, right = 48, 36, 14, 8
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max(max(int(r[k]) for k, _ in SERIES) for r in rows) or 1
    group = plot_w / len(rows)
    bar = max(1.0, min(14.0, (group - 4) / len(SERIES)))
    parts = [
        f'<svg class="plot" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        'role="img" aria-label="audited, flagged and confirmed per day">'
    ]
    for frac in (0, 0.5, 1):
        y = top + plot_h * (1 - frac)
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">'
            f"{round(peak * frac)}</text>"
        )
    label_every = max(1, len(rows) // 10)
    for i, r in enumerate(rows):
        x0 = left + i * group + (group - bar * len(SERIES)) / 2
        for j, (key, colour) in enumerate(SERIES):
            h = plot_h * int(r[key]) / peak
            parts.append(
                f'<rect x="{x0 + j * bar:.1f}" y="{top + plot_h - h:.1f}" width="{bar - 1:.1f}" '
                f'height="{h:.1f}" fill="{colour}"><title>{escape(str(r["key"]))} {key}: '
                f"{int(r[key])}</title></rect>"
            )
        if i % label_every == 0:
            parts.append(
                f'<text x="{left + (i + 0.5) * group:.1f}" y="{height - bottom + 14}" '
                f'text-anchor="middle" font-size="11">{escape(str(r["key"])[5:])}</text>'
            )
    for j, (key, colour) in enumerate(SERIES):
        x = left + j * 110
        parts.append(
            f'<rect x="{x}" y="{height - 14}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{x + 14}" y="{height - 5}" font-size="11">{key}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))
