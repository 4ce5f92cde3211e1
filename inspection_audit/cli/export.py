"""``inspection-audit export``: reviewed inspections as a dataset for ``train``."""

from __future__ import annotations

from pathlib import Path

import click

from inspection_audit.cli.common import console, resolve_url, url_option


@click.command("export")
@click.option(
    "--verdict",
    "verdicts",
    multiple=True,
    default=("confirmed",),
    show_default=True,
    type=click.Choice(["confirmed", "cleared"]),
    help="Which reviewed inspections: confirmed misses (label defect) and/or cleared flags "
    "(label ok). Repeat to take both.",
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="A new folder.")
@click.option(
    "--val-fraction",
    default=0.2,
    show_default=True,
    type=click.FloatRange(0.0, 1.0, max_open=True),
    help="Share of each label put in the val split (by a hash of the inspection_id).",
)
@url_option
def export(verdicts: tuple[str, ...], out: Path, val_fraction: float, url: str | None) -> None:
    """Write reviewed inspections as manifest.csv + images/ (the dataset format `train` reads)."""
    from inspection_audit.settings import get_settings
    from inspection_audit.web.export import ExportError, export_dataset

    try:
        result = export_dataset(
            resolve_url(url), get_settings(), out, list(verdicts), val_fraction=val_fraction
        )
    except ExportError as exc:
        raise click.ClickException(str(exc)) from exc
    counts = ", ".join(f"{k} {v}" for k, v in sorted(result.counts().items())) or "nothing"
    click.echo(f"wrote {result.manifest} ({len(result.rows)} images: {counts})")
    for iid, why in result.skipped:
        console.print(f"[yellow]skipped[/] {iid}: {why}")
    labels = {r["label"] for r in result.rows}
    if len(labels) < 2:
        console.print(
            "note: `inspection-audit train` needs both labels; export `--verdict confirmed "
            "--verdict cleared`, or add these rows to your training manifest"
        )
