"""``inspection-audit review`` and ``review verdict``: the review queue in a terminal.

Every command takes ``--url``; the default is the configured database
(``INSPECTION_AUDIT_DATABASE_URL``, else the SQLite file under ``INSPECTION_AUDIT_HOME``).
"""

from __future__ import annotations

import getpass
import json
from datetime import datetime
from typing import Any

import click

from inspection_audit.cli.common import resolve_url, safe_url, url_option

VERDICT_ALIASES = {"confirmed": "confirmed_defect", "cleared": "cleared"}


def _not_migrated(url: str, exc: Exception) -> click.ClickException:
    return click.ClickException(
        f"cannot read the review queue of {safe_url(url)} ({type(exc).__name__}); "
        "is the database migrated? Run `inspection-audit db upgrade`."
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


#: Columns of the table, most important first: at a narrow width the last ones are left out,
#: never the inspection_id (it is what a reviewer copies into `review verdict`).
COLUMNS: tuple[tuple[str, str], ...] = (
    ("#", "right"),
    ("inspection_id", "left"),
    ("score", "right"),
    ("tau", "right"),
    ("p_defect", "right"),
    ("line/station", "left"),
    ("captured_at", "left"),
    ("method", "left"),
    ("iou_gap", "right"),
    ("iou_gap_adv", "right"),
    ("overlay", "left"),
)


def _cells(n: int, r: dict[str, Any]) -> list[str]:
    return [
        str(n),
        r["inspection_id"],
        _fmt(r["decision_score"]),
        _fmt(r["tau"]),
        _fmt(r["p_defect"]),
        f"{_fmt(r['line'])}/{_fmt(r['station'])}",
        _fmt(r["captured_at"]),
        f"{r['method']}@{r['model_version']}",
        _fmt(r["iou_gap"]),
        _fmt(r["iou_gap_adv"]),
        _fmt(r["overlay_path"]),
    ]


def _widths(cells: list[list[str]]) -> list[int]:
    """The longest text of each column (header included)."""
    return [
        max([len(header), *(len(row[k]) for row in cells)]) for k, (header, _) in enumerate(COLUMNS)
    ]


def _fitting(widths: list[int], width: int | None) -> int:
    """How many of :data:`COLUMNS` fit in ``width`` (None: all); at least # and the id."""
    if width is None:
        return len(COLUMNS)
    used = 1  # the left border
    for k, w in enumerate(widths):
        if k >= 2 and used + w + 3 > width:
            return k
        used += w + 3  # padding and a border
    return len(COLUMNS)


def _print_table(rows: list[dict[str, Any]], total: int, console: Any = None) -> None:
    """The queue as a table that never cuts an ``inspection_id``: on a terminal, columns are
    left out from the right until the rest fits; off a terminal (a pipe, a log) all columns
    are printed at their full width."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    cells = [_cells(n, r) for n, r in enumerate(rows, 1)]
    widths = _widths(cells)
    width = console.width if console.is_terminal else None
    keep = _fitting(widths, width)
    dropped = [h for h, _ in COLUMNS[keep:]]
    title = f"review queue: {len(rows)} of {total} waiting, most suspicious first"
    if len(rows) < total:
        title += " (--limit to see more)"
    caption = (
        f"left out to fit {width} columns: {', '.join(dropped)} (--json has all)"
        if dropped
        else None
    )
    table = Table(title=title, caption=caption, title_justify="left")
    for (header, justify), w in zip(COLUMNS[:keep], widths, strict=False):
        table.add_column(header, justify=justify, no_wrap=True, min_width=w)  # type: ignore[arg-type]
    for row in cells:
        table.add_row(*row[:keep])
    if width is None:
        # Off a terminal rich would cut to 80 columns: give the table the width it needs.
        needed = sum(widths[:keep]) + 3 * keep + 1
        console = Console(file=console.file, width=max(80, needed), color_system=None)
    console.print(table)


def _database_missing(url: str) -> str | None:
    """Why the configured database cannot hold a queue yet (a SQLite file that does not
    exist), without creating anything; None when it may."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if (
        parsed.get_backend_name() != "sqlite"
        or not parsed.database
        or parsed.database == ":memory:"
    ):
        return None
    from pathlib import Path

    path = Path(parsed.database).expanduser()
    if path.is_file():
        return None
    return (
        f"no database at {path}: nothing has been audited with these settings. Run "
        "`inspection-audit demo`, or point INSPECTION_AUDIT_DATABASE_URL (or "
        "INSPECTION_AUDIT_HOME) at the audit database"
    )


@click.group("review", invoke_without_command=True)
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=0))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
@url_option
@click.pass_context
def review(ctx: click.Context, limit: int, as_json: bool, url: str | None) -> None:
    """Show suspected false negatives awaiting a verdict, most suspicious first."""
    ctx.ensure_object(dict)
    ctx.obj["url"] = url
    if ctx.invoked_subcommand is not None:
        return
    import sqlalchemy as sa

    from db.repository import audit_summary, review_queue
    from db.session import session_scope

    resolved = resolve_url(url)
    missing = _database_missing(resolved)
    if missing:
        raise click.ClickException(missing)
    try:
        with session_scope(resolved) as session:
            rows = review_queue(session, limit=limit)
            total = audit_summary(session)["pending_review"] if not as_json else len(rows)
            promises = _promises(session, rows)
    except (sa.exc.OperationalError, sa.exc.ProgrammingError) as exc:
        raise _not_migrated(resolved, exc) from exc
    if as_json:
        click.echo(json.dumps([{k: _jsonable(v) for k, v in r.items()} for r in rows]))
    else:
        _print_table(rows, total)
        for line in promises:
            click.echo(line)


def _promises(session: Any, rows: list[dict[str, Any]]) -> list[str]:
    """One line per (method, model version) in ``rows``: τ and the recall it promises."""
    from db.repository import get_audit

    out, seen = [], set()
    for r in rows:
        key = (r["method"], r["model_version"])
        if key in seen:
            continue
        seen.add(key)
        audit = get_audit(session, r["inspection_id"], r["model_version"], r["method"]) or {}
        promise = (audit.get("params") or {}).get("recall_promise")
        if promise:
            out.append(
                f"{key[0]}@{key[1]}: τ {_fmt(r['tau'], 4)} set on {promise['n_false_negatives']} "
                f"missed defects of {promise.get('split') or 'the calibration split'} promises "
                f"recall ≥ {100 * promise['recall_lower_bound']:.1f} % of new misses (95 % "
                "confidence)"
            )
        else:
            out.append(f"{key[0]}@{key[1]}: τ {_fmt(r['tau'], 4)} (no recall promise recorded)")
    return out


@review.command("verdict")
@click.argument("inspection_id")
@click.argument("verdict", type=click.Choice(sorted(VERDICT_ALIASES)))
@click.option("--note", default=None, help="Free text kept with the verdict.")
@click.option("--reviewer", default=None, help="Who decided (default: the current user name).")
@url_option
@click.pass_context
def review_verdict(
    ctx: click.Context,
    inspection_id: str,
    verdict: str,
    note: str | None,
    reviewer: str | None,
    url: str | None,
) -> None:
    """Record a verdict: `confirmed` (a real defect, an escape) or `cleared` (a good part)."""
    from db.repository import record_verdict
    from db.session import session_scope

    resolved = resolve_url(url or (ctx.obj or {}).get("url"))
    missing = _database_missing(resolved)
    if missing:
        raise click.ClickException(missing)
    if reviewer is None:
        try:
            reviewer = getpass.getuser()
        except Exception:  # no user name in this environment
            reviewer = None
    stored = VERDICT_ALIASES[verdict]
    try:
        with session_scope(resolved) as session:
            review_id = record_verdict(session, inspection_id, stored, reviewer=reviewer, note=note)
    except LookupError as exc:
        raise click.ClickException(str(exc.args[0])) from exc
    click.echo(f"recorded {stored} for {inspection_id} (review #{review_id})")
