"""``inspection-audit health``: exit non-zero when the audit does not keep up.

Exit 0: the database and the broker answer, and either nothing waits or an audit row was
written within the stall threshold. Exit 1: inspections wait and no row has been written for
longer than ``--stall-s`` (``INSPECTION_AUDIT_HEALTH_STALL_S``): a worker that answers pings
but consumes nothing. Exit 2: the database or the broker does not answer.
"""

from __future__ import annotations

import json

import click


@click.command("health")
@click.option(
    "--stall-s",
    type=click.FloatRange(min=0.0),
    default=None,
    help="Seconds without a written row, while messages wait, that count as stalled "
    "(default: INSPECTION_AUDIT_HEALTH_STALL_S, 300).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON.")
def health(stall_s: float | None, as_json: bool) -> None:
    """Check that workers keep up: exit 1 when inspections wait and nothing is written."""
    from inspection_audit.settings import get_settings
    from inspection_audit.web.health import check

    h = check(get_settings(), stall_s)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "ok": h.ok,
                    "stalled": h.stalled,
                    "waiting": h.waiting,
                    "last_write": h.last_write.isoformat() if h.last_write else None,
                    "idle_s": h.idle_s,
                    "stall_s": h.stall_s,
                    "database_error": h.database_error,
                    "broker_error": h.broker_error,
                }
            )
        )
    else:
        click.echo(h.describe())
    if h.database_error or h.broker_error:
        raise SystemExit(2)
    if h.stalled:
        raise SystemExit(1)
