"""The ``inspection-audit`` command line."""

from __future__ import annotations

import sys

import click
from rich.console import Console

console = Console(stderr=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Audit an ok/defect classifier's `ok` calls for false negatives."""


def _register() -> None:
    """Attach the sub-commands that live in ``cli_*`` modules (each area owns its own)."""
    import importlib

    for name in ("cli_engine", "cli_db", "cli_pipeline"):
        try:
            module = importlib.import_module(f"inspection_audit.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"inspection_audit.{name}":
                raise
            continue
        module.register(main)


_register()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
