"""``inspection-audit reconcile``: resend inspections a broker lost (the producer's outbox).

Producers with the outbox on (``INSPECTION_AUDIT_OUTBOX=true``; the HTTP ingest always) record
each inspection as queued before sending it. This command lists the ones that still have no
audit row ``--older-than`` seconds after their last send (default
``INSPECTION_AUDIT_RECONCILE_AFTER_S``) and sends them again to the queue they went to. Run it
from cron or a timer; ``--dry-run`` only lists. It needs the broker and the database of the
settings (``--url`` overrides the database).
"""

from __future__ import annotations

import json
from datetime import timedelta

import click

from inspection_audit.cli.common import safe_url, url_option


@click.command("reconcile")
@click.option(
    "--older-than",
    type=click.FloatRange(min=0),
    default=None,
    metavar="SECONDS",
    help="Age since the last send (default: INSPECTION_AUDIT_RECONCILE_AFTER_S).",
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Resend at most N.")
@click.option("--dry-run", is_flag=True, help="List what would be resent; send nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@url_option
def reconcile(
    older_than: float | None, limit: int | None, dry_run: bool, as_json: bool, url: str | None
) -> None:
    """Resend outbox entries that still have no audit row (lost by the broker)."""
    from inspection_audit.settings import Settings
    from producer.api import EnqueueError, reset_apps
    from producer.outbox import OutboxError, describe
    from producer.outbox import reconcile as run

    settings = Settings(**({"database_url": url} if url else {}))
    age = timedelta(seconds=older_than) if older_than is not None else None
    try:
        result = run(settings, age, limit=limit, dry_run=dry_run)
    except (OutboxError, EnqueueError) as exc:
        raise click.ClickException(str(exc)) from exc
    except Exception as exc:  # e.g. a database without the outbox table
        raise click.ClickException(
            f"cannot reconcile with {safe_url(settings.resolved_database_url)} "
            f"({type(exc).__name__}: {exc}); is the database migrated? "
            "Run `inspection-audit db upgrade`."
        ) from exc
    finally:
        reset_apps()
    if as_json:
        click.echo(
            json.dumps(
                {
                    "audited": result.audited,
                    "overdue": [describe(r) for r in result.overdue],
                    "resent": result.resent,
                    "unsendable": result.unsendable,
                    "dry_run": dry_run,
                },
                indent=2,
            )
        )
        return
    after = age if age is not None else timedelta(seconds=settings.reconcile_after_s)
    click.echo(
        f"{len(result.overdue)} inspection(s) without an audit row {after} after their last "
        f"send; {result.audited} newly audited"
    )
    for row in result.overdue:
        d = describe(row)
        click.echo(
            f"  {d['inspection_id']}  queue {d['queue']}  queued {d['queued_at']}  "
            f"last sent {d['last_sent_at'] or 'never'}  sends {d['sends']}"
        )
    if dry_run:
        click.echo("dry run: nothing sent")
    else:
        click.echo(f"sent again: {len(result.resent)}")
    for iid, why in result.unsendable.items():
        click.echo(f"  cannot resend {iid}: {why}", err=True)
