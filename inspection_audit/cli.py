"""The ``inspection-audit`` command line."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from rich.console import Console

console = Console(stderr=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Audit an ok/defect classifier's `ok` calls for false negatives."""


@main.command()
@click.option("--manifest", type=click.Path(path_type=Path, exists=True), required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Checkpoint to write.")
@click.option("--arch", default="resnet18", show_default=True)
@click.option("--image-size", default=160, show_default=True, type=int)
@click.option("--epochs", default=30, show_default=True, type=int)
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option("--lr", default=2e-3, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--in-channels", default=1, show_default=True, type=click.Choice(["1", "3"]))
@click.option(
    "--head",
    default="softmax",
    show_default=True,
    type=click.Choice(["softmax", "sigmoid"]),
    help="softmax: 2 logits; sigmoid: 1 logit.",
)
@click.option(
    "--snapshot-epochs", default="", help="Also save checkpoints after these epochs, e.g. 4,8."
)
@click.option("--threads", default=0, type=int, help="torch threads (0 = all cores).")
def train(
    manifest: Path,
    out: Path,
    arch: str,
    image_size: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    in_channels: str,
    head: str,
    snapshot_epochs: str,
    threads: int,
) -> None:
    """Train a production model on the manifest's `train` split, keeping the best epoch on `val`."""
    import torch

    from worker.dataset import read_manifest
    from worker.training import Recipe, train_model

    torch.set_num_threads(threads or os.cpu_count() or 1)
    recipe = Recipe(
        arch=arch,
        image_size=image_size,
        in_channels=int(in_channels),
        num_classes=2 if head == "softmax" else 1,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
    )
    snaps = tuple(int(s) for s in snapshot_epochs.split(",") if s.strip())
    res = train_model(
        read_manifest(manifest, "train"),
        read_manifest(manifest, "val"),
        out,
        recipe,
        snapshot_epochs=snaps,
    )
    click.echo(
        f"wrote {out} (model_version {res.model_version}, best epoch {res.best_epoch}, "
        f"{res.seconds:.0f} s)"
    )
    click.echo(
        f"val accuracy {res.val_accuracy:.4f}  val defect recall {res.val_defect_recall:.4f}"
    )


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
