"""The demo's lab side: find the dataset, train (or reuse) and calibrate the demo model, and
compute the production model's calls the way a line would send them.

The model is cached under ``<home>/models/`` keyed by the manifest's path, its content hash and
the recipe; training writes ``<model>.partial`` and moves it into place when done, so an
interrupted run is never mistaken for a finished model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
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


def model_cache_path(
    home: Path, manifest: Path, recipe: dict[str, Any], role: str = "model"
) -> Path:
    """``<home>/models/demo-<key>.pt`` (the auditor: ``<home>/models/auditors/…``), key = hash
    of the manifest path, its content and the recipe."""
    h = hashlib.sha256()
    h.update(str(manifest.resolve()).encode())
    h.update(manifest.read_bytes())
    h.update(json.dumps(recipe, sort_keys=True).encode())
    folder = home.resolve() / "models" / ("" if role == "model" else f"{role}s")
    return folder / f"demo-{h.hexdigest()[:16]}.pt"


@dataclass(frozen=True)
class DemoPlan:
    """What the demo trains and measures: the production model with the snapshots of its own
    run (what the default decision method, ``snapshot_mean``, reads), one small auditor, and
    any other second opinions (banks, views)."""

    production: Recipe = Recipe(arch="resnet18", image_size=128, epochs=15, batch_size=32)
    #: snapshots of the production run kept after these epochs (as out of fold: 6, 9, 12 of 15)
    snapshot_epochs: tuple[int, ...] = (6, 9, 12)
    auditor: Recipe | None = Recipe(
        arch="resnet18", image_size=96, epochs=8, batch_size=32, seed=1000
    )
    banks: tuple[str, ...] = ()
    views: tuple[str, ...] = ()

    @classmethod
    def sized(cls, image_size: int, epochs: int) -> DemoPlan:
        """The default plan at another production size/epochs (snapshots at 40, 60 and 80 % of
        the epochs, distinct and before the last; the auditor: three quarters of the size, half
        the epochs, at least 1)."""
        base = cls()
        assert base.auditor is not None
        snaps = sorted({max(1, round(epochs * f)) for f in (0.4, 0.6, 0.8)} - {epochs})
        return replace(
            base,
            production=replace(base.production, image_size=image_size, epochs=epochs),
            snapshot_epochs=tuple(snaps),
            auditor=replace(
                base.auditor,
                image_size=max(32, round(image_size * 0.75)),
                epochs=max(1, epochs // 2),
            ),
        )


@dataclass
class DemoModels:
    """Files the demo's workers are given."""

    production: Path
    auditors: list[Path]
    banks: list[Path]
    views: tuple[str, ...]
    snapshots: list[Path] = field(default_factory=list)

    def worker_settings(self) -> dict[str, Any]:
        """``INSPECTION_AUDIT_*`` values (lower-case keys) for the workers."""
        return {
            "model": self.production,
            "auditor_models": self.auditors or None,
            "snapshot_models": self.snapshots or None,
            "anomaly_banks": self.banks or None,
            "views": list(self.views) or None,
        }


def snapshot_paths(ckpt: Path, epochs: tuple[int, ...] | None = None) -> list[Path]:
    """The snapshots of ``ckpt``'s run: ``<stem>-epoch<N>.pt`` beside it, for ``epochs`` (all
    that exist when ``None``), in epoch order."""
    if epochs is not None:
        return [ckpt.with_name(f"{ckpt.stem}-epoch{e}{ckpt.suffix}") for e in epochs]
    pattern = re.compile(re.escape(ckpt.stem) + r"-epoch([0-9]+)" + re.escape(ckpt.suffix))
    found = [(m, p) for p in ckpt.parent.iterdir() if (m := pattern.fullmatch(p.name))]
    return [p for _e, p in sorted((int(m.group(1)), p) for m, p in found)]


def ensure_model(
    manifest: Path,
    home: Path,
    recipe: Recipe,
    role: str = "model",
    given: Path | None = None,
    snapshot_epochs: tuple[int, ...] = (),
) -> Path:
    """A checkpoint trained with ``recipe`` on ``manifest``'s train split (best epoch on val),
    cached under ``<home>/models/`` with the snapshots after ``snapshot_epochs`` beside it
    (:func:`snapshot_paths`) — or the ``given`` one, checked.

    Raises:
        click.ClickException: the given checkpoint is unusable.
    """
    from worker.model.checkpoint import CheckpointError, load_checkpoint

    if given is not None:
        try:
            load_checkpoint(given)
        except CheckpointError as exc:
            raise click.ClickException(str(exc)) from None
        console.print(f"[bold]{role}[/] {given} (given)")
        return given.resolve()
    import torch

    path = model_cache_path(home, manifest, asdict(recipe), role)
    if path.is_file() and all(p.is_file() for p in snapshot_paths(path, snapshot_epochs)):
        try:
            load_checkpoint(path)
            console.print(f"[bold]{role}[/] reusing cached {path}")
            return path
        except CheckpointError as exc:
            console.print(f"cached {role} unusable ({exc}); training again")
    h, w = recipe.input_size
    console.print(
        f"[bold]{role}[/] training {recipe.arch} at {h}x{w} px for {recipe.epochs} epochs on "
        f"{manifest.parent.name} (cached afterwards as {path})"
    )
    torch.set_num_threads(os.cpu_count() or 1)
    # train_model keeps the best epoch in <path>.partial and moves it to <path> only after the
    # last epoch: an interrupted run is never mistaken for a finished, cached model (its
    # snapshots, written beside it as they come, are trained again with it).
    res = train_model(
        read_manifest(manifest, "train"),
        read_manifest(manifest, "val"),
        path,
        recipe,
        snapshot_epochs=snapshot_epochs,
    )
    console.print(
        f"trained in {res.seconds:.0f} s: best epoch {res.best_epoch}, val accuracy "
        f"{res.val_accuracy:.3f}, val defect recall {res.val_defect_recall:.3f}"
    )
    return path


def ensure_bank(manifest: Path, ckpt: Path, kind: str) -> Path:
    """A PatchCore bank of ``kind`` from the train split's ok images (the default layers, chosen
    on validation data out of fold; see docs/results), cached beside the checkpoint."""
    from inspection_audit.lab.banks import CANDIDATE_LAYERS, build_bank
    from worker.engine.anomaly import BankError
    from worker.measure import load_bank_scorer
    from worker.model.checkpoint import load_checkpoint
    from worker.model.preprocess import load_image

    pm = load_checkpoint(ckpt)
    path = ckpt.parent / "banks" / f"{ckpt.stem}.bank-{kind}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        load_bank_scorer(path, pm)
        console.print(f"[bold]bank[/] reusing {path}")
        return path
    except (BankError, OSError):
        pass
    console.print(f"[bold]bank[/] {kind}: ok patches of the train split → {path}")
    ok = [
        load_image(r.path, pm.in_channels)
        for r in read_manifest(manifest, "train")
        if r.label == "ok"
    ]
    build_bank(kind, pm, ok, CANDIDATE_LAYERS[kind][0]).save(path)
    return path


def ensure_models(
    manifest: Path, home: Path, plan: DemoPlan, given: Path | None = None
) -> DemoModels:
    """The production model with its snapshots, the auditor and the banks of ``plan`` (trained
    or reused; a ``given`` model brings the snapshots found beside it)."""
    ckpt = ensure_model(manifest, home, plan.production, "model", given, plan.snapshot_epochs)
    snapshots = snapshot_paths(ckpt, None if given is not None else plan.snapshot_epochs)
    auditors = (
        [] if plan.auditor is None else [ensure_model(manifest, home, plan.auditor, "auditor")]
    )
    banks = [ensure_bank(manifest, ckpt, kind) for kind in plan.banks]
    return DemoModels(ckpt, auditors, banks, plan.views, snapshots)


def ensure_calibration(manifest: Path, models: DemoModels, settings: Any) -> Any:
    """The sidecar of the production model, made on the val split with the demo's second
    opinions (made again when missing, unreadable, or made with other second opinions).

    Returns:
        The :class:`~worker.engine.calibration.Calibration`.
    """
    from inspection_audit.lab.protocol import SecondOpinionPlan
    from worker.engine.calibration import CalibrationError, load_calibration, sidecar_path
    from worker.measure import load_suite
    from worker.model.checkpoint import load_checkpoint

    ckpt = models.production
    pm = load_checkpoint(ckpt)
    plan = SecondOpinionPlan(
        auditors=tuple(models.auditors),
        snapshots=tuple(models.snapshots),
        views=models.views,
        banks=tuple(str(b) for b in models.banks),
    )
    from inspection_audit.lab.scoring import make_engine

    wanted = load_suite(
        pm,
        make_engine(pm, settings.engine_config()),
        auditor_models=models.auditors,
        snapshot_models=models.snapshots,
        views=models.views,
        anomaly_banks=models.banks,
    ).describe()
    try:
        cal = load_calibration(ckpt, pm.model_version)
    except CalibrationError as exc:
        console.print(f"calibration unusable ({exc}); calibrating again")
        cal = None
    if cal is not None and cal.second_opinions != wanted:
        cal = None
    if cal is None:
        console.print(f"[bold]calibration[/] τ on the val split → {sidecar_path(ckpt)}")
        try:
            cal = calibrate_checkpoint(
                manifest, ckpt, split="val", config=settings.engine_config(), plan=plan
            )
        except CalibrationError as exc:
            raise click.ClickException(f"cannot calibrate on val: {exc}") from None
    else:
        console.print(f"[bold]calibration[/] reusing {sidecar_path(ckpt)}")
    return cal


def line_calls(ckpt: Path, records: list[Any]) -> list[float]:
    """P(defect) of the production model for each record (what the line would send)."""
    import torch

    from worker.model.checkpoint import load_checkpoint, p_defect_from_logits, predict_logits

    pm = load_checkpoint(ckpt)
    x, _ = load_tensors(records, pm.input_size, pm.in_channels, "production model", True, pm.resize)
    with torch.no_grad():
        z = predict_logits(pm.model, x)
    return [float(p) for p in p_defect_from_logits(z, pm.defect_index).tolist()]


PAPER_METHOD = "iou_gap_adv"


def summarize(
    rows: list[dict[str, Any]],
    labels: dict[str, str],
    predictions: dict[str, str],
    cal: Any,
    methods: list[str],
) -> dict[str, dict[str, Any]]:
    """Per method, on the same audit rows: τ, what τ promised, false negatives caught and true
    negatives flagged among the images the line called ``ok`` (flag: the row's stored score of
    that method ≥ its τ)."""
    ok = [r for r in rows if predictions[r["inspection_id"]] == "ok" and r["status"] == "done"]
    fn = [r for r in ok if labels[r["inspection_id"]] == "defect"]
    tn = [r for r in ok if labels[r["inspection_id"]] == "ok"]
    out: dict[str, dict[str, Any]] = {}
    for m in methods:
        tau = cal.tau(m)

        def flagged(r: dict[str, Any], m: str = m, tau: float | None = tau) -> bool:
            v = (r.get("scores") or {}).get(m)
            return v is not None and tau is not None and v >= tau

        out[m] = {
            "tau": tau,
            "promise": (cal.methods.get(m) or {}).get("recall_lower_bound"),
            "caught": sum(flagged(r) for r in fn),
            "n_fn": len(fn),
            "tn_flagged": sum(flagged(r) for r in tn),
            "n_tn": len(tn),
        }
    return out
