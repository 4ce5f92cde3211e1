"""``inspection-audit demo`` (stub, being written)."""

from __future__ import annotations

import click


@click.command("demo")
def demo() -> None:
    """Run the whole pipeline on a dataset."""
    raise click.ClickException("not yet")
