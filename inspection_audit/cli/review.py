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


def _print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"review queue: {len(rows)} most suspicious (--limit to see more)")
    for header, justify in (
        ("#", "right"),
        ("inspection_id", "left"),
        ("line/station", "left"),
        ("captured_at", "left"),
        ("method", "left"),
        ("score", "right"),
        ("tau", "right"),
        ("p_defect", "right"),
        ("iou_gap", "right"),
        ("iou_gap_adv", "right"),
        ("overlay", "left"),
    ):
        table.add_column(header, justify=justify)  # type: ignore[arg-type]
    for n, r in enumerate(rows, 1):
        table.add_row(
            str(n),
            r["inspection_id"],
            f"{_fmt(r['line'])}/{_fmt(r['station'])}",
            _fmt(r["captured_at"]),
            f"{r['method']}@{r['model_version']}",
            _fmt(r["decision_score"]),
            _fmt(r["tau"]),
            _fmt(r["p_defect"]),
            _fmt(r["iou_gap"]),
            _fmt(r["iou_gap_adv"]),
            _fmt(r["overlay_path"]),
        )
    # Off a terminal (pipes, logs) rich would cut columns to 80 characters: keep ids whole.
    console = Console()
    Console(width=max(console.width, 200) if not console.is_terminal else None).print(table)


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

    from db.repository import review_queue
    from db.session import session_scope

    resolved = resolve_url(url)
    try:
        with session_scope(resolved) as session:
            rows = review_queue(session, limit=limit)
    except (sa.exc.OperationalError, sa.exc.ProgrammingError) as exc:
        raise _not_migrated(resolved, exc) from exc
    if as_json:
        click.echo(json.dumps([{k: _jsonable(v) for k, v in r.items()} for r in rows]))
    else:
        _print_table(rows)


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
