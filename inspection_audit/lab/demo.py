"""The demo's lab side: find the dataset, train (or reuse) and calibrate the demo model, and
compute the production model's calls the way a line would send them.

The model is cached under ``<home>/models/`` keyed by the manifest's path, its content hash and
the recipe; training writes into ``.partial`` and moves into place when done, so an interrupted
run is never mistaken for a finished model.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from inspection_audit.lab.dataset import load_tensors, read_manifest
from inspection_audit.lab.protocol import calibrate_checkpoint
from inspection_audit.lab.training import Recipe, train_model

console = Console(stderr=True)

DEFAULT_DATASET = Path("..") / "shared" / "datasets" / "magnetic-tile"


def find_dataset(given: Path | None, from_settings: Path | None) -> Path:
    """The dataset's ``manifest.csv``: ``--dataset``, else ``INSPECTION_AUDIT_DATASET``, else
    ``../shared/datasets/magnetic-tile`` relative to the current folder.

    Raises:
        click.ClickException: none of them holds a ``manifest.csv``, saying where to get one.
    """
    tried: list[str] = []
    for source, path in (
        ("--dataset", given),
        ("INSPECTION_AUDIT_DATASET", from_settings),
        ("default", DEFAULT_DATASET),
    ):
        if path is None:
            continue
        p = Path(path).expanduser()
        manifest = p if p.suffix == ".csv" else p / "manifest.csv"
        if manifest.is_file():
            return manifest.resolve()
        tried.append(f"{source}: {manifest}")
        if source != "default":  # an explicit choice that does not work is an error
            break
    raise click.ClickException(
        "no dataset found ("
        + "; ".join(tried)
        + "). Pass --dataset FOLDER or set INSPECTION_AUDIT_DATASET to a folder with a "
        "manifest.csv (columns path,label,defect_type,mask_path,split; paths relative to it; "
        "labels ok/defect; splits train/val/test; see docs/design.md §4), e.g. the Magnetic Tile "
        "surface defect dataset (Huang et al., 2020) laid out that way."
    )


def model_cache_path(home: Path, manifest: Path, recipe: dict[str, Any]) -> Path:
    """``<home>/models/demo-<key>.pt``, key = hash of the manifest path, content and recipe."""
    h = hashlib.sha256()
    h.update(str(manifest.resolve()).encode())
    h.update(manifest.read_bytes())
    h.update(json.dumps(recipe, sort_keys=True).encode())
    return home.resolve() / "models" / f"demo-{h.hexdigest()[:16]}.pt"


def ensure_model(
    manifest: Path, home: Path, model: Path | None, epochs: int, image_size: int
) -> Path:
    from worker.model.checkpoint import CheckpointError, load_checkpoint

    if model is not None:
        try:
            load_checkpoint(model)
        except CheckpointError as exc:
            raise click.ClickException(str(exc)) from None
        console.print(f"[bold]model[/] {model} (given)")
        return model.resolve()
    import torch

    recipe = Recipe(arch="resnet18", image_size=image_size, epochs=epochs, batch_size=32)
    path = model_cache_path(home, manifest, asdict(recipe))
    if path.is_file():
        try:
            load_checkpoint(path)
            console.print(f"[bold]model[/] reusing cached {path}")
            return path
        except CheckpointError as exc:
            console.print(f"cached model unusable ({exc}); training again")
    console.print(
        f"[bold]model[/] training {recipe.arch} at {image_size} px for {epochs} epochs on "
        f"{manifest.parent.name} (cached afterwards as {path})"
    )
    torch.set_num_threads(os.cpu_count() or 1)
    # Train into a side folder and move into place when done: an interrupted run (which
    # leaves its best epoch so far) is never mistaken for a finished, cached model.
    partial = path.parent / ".partial" / path.name
    res = train_model(
        read_manifest(manifest, "train"), read_manifest(manifest, "val"), partial, recipe
    )
    partial.replace(path)
    console.print(
        f"trained in {res.seconds:.0f} s: best epoch {res.best_epoch}, val accuracy "
        f"{res.val_accuracy:.3f}, val defect recall {res.val_defect_recall:.3f}"
    )
    return path


def ensure_calibration(manifest: Path, ckpt: Path, settings: Any) -> None:
    from worker.engine.calibration import CalibrationError, load_calibration, sidecar_path
    from worker.model.checkpoint import load_checkpoint

    version = load_checkpoint(ckpt).model_version
    try:
        cal = load_calibration(ckpt, version)
    except CalibrationError as exc:
        console.print(f"calibration unusable ({exc}); calibrating again")
        cal = None
    if cal is None:
        console.print(f"[bold]calibration[/] τ on the val split → {sidecar_path(ckpt)}")
        try:
            cal = calibrate_checkpoint(manifest, ckpt, split="val", config=settings.engine_config())
        except CalibrationError as exc:
            raise click.ClickException(f"cannot calibrate on val: {exc}") from None
    else:
        console.print(f"[bold]calibration[/] reusing {sidecar_path(ckpt)}")
    tau = cal.tau(settings.decision_method)
    console.print(
        f"decision method {settings.decision_method}: τ = "
        + ("none (nothing will be flagged)" if tau is None else f"{tau:.4f}")
    )


def line_calls(ckpt: Path, records: list[Any]) -> list[float]:
    """P(defect) of the production model for each record (what the line would send)."""
    import torch

    from worker.model.checkpoint import load_checkpoint, p_defect_from_logits, predict_logits

    pm = load_checkpoint(ckpt)
    x, _ = load_tensors(records, pm.input_size, pm.in_channels, "production model", True)
    with torch.no_grad():
        z = predict_logits(pm.model, x)
    return [float(p) for p in p_defect_from_logits(z, pm.defect_index).tolist()]
