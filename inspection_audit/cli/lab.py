"""Commands of the offline lab: ``train``, ``calibrate``, ``evaluate``, ``sweep``."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

MANIFEST = click.option(
    "--manifest",
    type=click.Path(path_type=Path, exists=True),
    required=True,
    help="manifest.csv (path,label,defect_type,mask_path,split) or its folder.",
)


def engine_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """One ``--option`` per exposed field of :class:`worker.engine.options.EngineConfig`
    (derived from it: choices, defaults and help come from the field)."""
    from worker.engine.options import option_fields

    for o in reversed(option_fields()):
        kind: Any = click.Choice(list(o.choices)) if o.choices else None
        if kind is None and o.default is not None:
            kind = type(o.default)
        f = click.option(
            o.cli, o.name, type=kind, default=o.default, show_default=True, help=o.help
        )(f)
    return f


def _config(kw: dict[str, Any]) -> Any:
    """The :class:`~worker.engine.options.EngineConfig` of the parsed engine options.

    Raises:
        click.BadParameter: an option the engine refuses.
    """
    from worker.engine.options import EngineConfig, option_fields

    try:
        return EngineConfig(**{o.name: kw[o.name] for o in option_fields()})
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


class MethodName(click.ParamType):
    """A scoring method name, checked against the registry when the command runs."""

    name = "method"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from worker.engine.methods import REGISTRY

        if value not in REGISTRY:
            self.fail(f"{value!r} is not one of {', '.join(REGISTRY.names())}", param, ctx)
        return str(value)


def _csv(text: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (text or "").split(",") if v.strip())


def second_opinion_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options naming the second opinions to measure (each defaults to the settings)."""
    opts = [
        click.option(
            "--auditor",
            "auditors",
            multiple=True,
            type=click.Path(path_type=Path, exists=True, dir_okay=False),
            help="An auditor checkpoint (repeat; default: INSPECTION_AUDIT_AUDITOR_MODELS).",
        ),
        click.option(
            "--snapshot",
            "snapshots",
            multiple=True,
            type=click.Path(path_type=Path, exists=True, dir_okay=False),
            help="A snapshot checkpoint (repeat; default: INSPECTION_AUDIT_SNAPSHOT_MODELS).",
        ),
        click.option(
            "--views",
            default=None,
            help="Test-time views, comma-separated (default: INSPECTION_AUDIT_VIEWS).",
        ),
        click.option(
            "--bank",
            "banks",
            multiple=True,
            help="A bank file from fit-bank (repeat; default: INSPECTION_AUDIT_ANOMALY_BANKS); "
            "with --folds: a bank kind fitted per fold, imagenet or own.",
        ),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _plan(kw: dict[str, Any], *, folds: bool = False) -> Any:
    """The :class:`~inspection_audit.lab.protocol.SecondOpinionPlan` of the options (falling
    back to the settings for what is not given, outside fold mode)."""
    from inspection_audit.lab.protocol import SecondOpinionPlan
    from inspection_audit.lab.training import Recipe

    recipes: list[Recipe] = []
    for spec in kw.get("auditor_recipes") or ():
        recipes.append(_parse_recipe(spec))
    snaps = _csv(kw.get("snapshot_epochs"))
    if folds:
        return SecondOpinionPlan(
            auditor_recipes=tuple(recipes),
            snapshot_epochs=tuple(int(e) for e in snaps),
            views=_csv(kw.get("views")),
            banks=tuple(kw.get("banks") or ()),
        )
    from inspection_audit.settings import get_settings

    s = get_settings()
    return SecondOpinionPlan(
        auditors=tuple(kw.get("auditors") or s.auditor_models),
        snapshots=tuple(kw.get("snapshots") or s.snapshot_models),
        views=_csv(kw.get("views")) if kw.get("views") is not None else tuple(s.views),
        banks=tuple(kw.get("banks") or (str(b) for b in s.anomaly_banks)),
    )


def _parse_recipe(spec: str) -> Any:
    """``arch=resnet18,image_size=160,seed=1000,augment=flips`` → a Recipe (other fields:
    defaults)."""
    from dataclasses import fields

    from inspection_audit.lab.training import Recipe, parse_image_size

    known = {f.name: f for f in fields(Recipe)}
    values: dict[str, Any] = {}
    for part in _csv(spec):
        key, _, raw = part.partition("=")
        key, raw = key.strip(), raw.strip()
        if key not in known:
            raise click.BadParameter(f"unknown recipe field {key!r} in {spec!r}")
        default = getattr(Recipe(), key)
        try:
            if key == "image_size":
                values[key] = parse_image_size(raw)
            elif isinstance(default, bool):
                flags = {
                    "1": True,
                    "true": True,
                    "yes": True,
                    "0": False,
                    "false": False,
                    "no": False,
                }
                if raw.lower() not in flags:
                    raise ValueError("must be true or false")
                values[key] = flags[raw.lower()]
            elif isinstance(default, int):
                values[key] = int(raw)
            elif isinstance(default, float):
                values[key] = float(raw)
            else:
                values[key] = raw
        except ValueError as exc:
            raise click.BadParameter(f"{key}={raw!r} in {spec!r}: {exc}") from None
        allowed = RECIPE_CHOICES.get(key)
        if allowed is not None and values[key] not in allowed:
            raise click.BadParameter(
                f"{key}={raw!r} in {spec!r}: choose from {', '.join(map(str, allowed))}"
            )
        if key in ("epochs", "batch_size") and values[key] < 1:
            raise click.BadParameter(f"{key}={raw!r} in {spec!r}: must be >= 1")
    return Recipe(**values)


#: Values a recipe field may take (the same choices as `train`'s options).
RECIPE_CHOICES: dict[str, tuple[Any, ...]] = {
    "augment": ("flips", "basic", "affine", "none"),
    "resize": ("squash", "pad"),
    "optimizer": ("adamw", "sgd"),
    "in_channels": (1, 3),
    "num_classes": (1, 2),
}


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Errors in what the user gave (a manifest, a checkpoint, a second opinion, a bank) as one
    line and exit code 1, not a traceback."""
    from inspection_audit.lab.dataset import ManifestError
    from worker.engine.anomaly import BankError
    from worker.engine.calibration import CalibrationError
    from worker.measure import SuiteError
    from worker.model.checkpoint import CheckpointError

    try:
        yield
    except (ManifestError, SuiteError, BankError, CheckpointError, CalibrationError) as exc:
        raise click.ClickException(" ".join(str(exc).split())) from None


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n or os.cpu_count() or 1)


def _recipe_options(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--arch", default="resnet18", show_default=True),
        click.option(
            "--image-size",
            default="160",
            show_default=True,
            help="Input side N, or HxW for a non-square part (e.g. 512x192).",
        ),
        click.option(
            "--resize",
            default="squash",
            show_default=True,
            type=click.Choice(["squash", "pad"]),
            help="squash: resize ignoring the aspect ratio; pad: keep it and pad with the "
            "border pixels (recorded in the checkpoint).",
        ),
        click.option("--epochs", default=30, show_default=True, type=int),
        click.option("--batch-size", default=32, show_default=True, type=int),
        click.option("--lr", default=2e-3, show_default=True, type=float),
        click.option(
            "--optimizer", default="adamw", show_default=True, type=click.Choice(["adamw", "sgd"])
        ),
        click.option("--seed", default=0, show_default=True, type=int),
        click.option(
            "--augment",
            default="none",
            show_default=True,
            type=click.Choice(["flips", "basic", "affine", "none"]),
            help="flips: h/v flips only (the views a flips-trained model is invariant to).",
        ),
        click.option(
            "--in-channels", default="1", show_default=True, type=click.Choice(["1", "3"])
        ),
        click.option(
            "--head",
            default="softmax",
            show_default=True,
            type=click.Choice(["softmax", "sigmoid"]),
            help="softmax: 2 logits; sigmoid: 1 logit.",
        ),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _recipe(kw: dict[str, Any]) -> Any:
    from inspection_audit.lab.training import Recipe, parse_image_size

    try:
        size = parse_image_size(kw["image_size"])
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--image-size") from None
    return Recipe(
        arch=kw["arch"],
        image_size=size,
        resize=kw["resize"],
        in_channels=int(kw["in_channels"]),
        num_classes=2 if kw["head"] == "softmax" else 1,
        epochs=kw["epochs"],
        batch_size=kw["batch_size"],
        lr=kw["lr"],
        seed=kw["seed"],
        augment=kw["augment"],
        optimizer=kw["optimizer"],
    )


@click.command()
@MANIFEST
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Checkpoint to write.")
@_recipe_options
@click.option(
    "--snapshot-epochs", default="", help="Also save checkpoints after these epochs, e.g. 4,8."
)
@click.option("--threads", default=0, type=int, help="torch threads (0 = all cores).")
def train(manifest: Path, out: Path, snapshot_epochs: str, threads: int, **kw: Any) -> None:
    """Train a production model on the `train` split, keeping the best epoch on `val`."""
    from inspection_audit.lab.dataset import read_manifest
    from inspection_audit.lab.training import train_model

    _threads(threads)
    snaps = tuple(int(s) for s in snapshot_epochs.split(",") if s.strip())
    with _user_errors():
        res = train_model(
            read_manifest(manifest, "train"),
            read_manifest(manifest, "val"),
            out,
            _recipe(kw),
            snapshot_epochs=snaps,
        )
    click.echo(
        f"wrote {out} (model_version {res.model_version}, best epoch {res.best_epoch}, "
        f"{res.seconds:.0f} s)"
    )
    click.echo(
        f"val accuracy {res.val_accuracy:.4f}  val defect recall {res.val_defect_recall:.4f}"
    )


@click.command()
@MANIFEST
@click.option("--model", type=click.Path(path_type=Path, exists=True), required=True)
@click.option(
    "--split", default="val", show_default=True, type=click.Choice(["train", "val", "test"])
)
@click.option("--target-recall", default=1.0, show_default=True, type=float)
@engine_options
@second_opinion_options
@click.option("--threads", default=0, type=int)
def calibrate(
    manifest: Path, model: Path, split: str, target_recall: float, threads: int, **kw: Any
) -> None:
    """Pick τ for every method on a labelled split; store it next to the checkpoint."""
    from inspection_audit.lab.protocol import calibrate_checkpoint
    from worker.engine.calibration import sidecar_path

    _threads(threads)
    with _user_errors():
        cal = calibrate_checkpoint(
            manifest,
            model,
            split=split,
            target_recall=target_recall,
            config=_config(kw),
            plan=_plan(kw),
        )
    click.echo(
        f"wrote {sidecar_path(model)} (model_version {cal.model_version}, split {split}, "
        f"target FN recall {target_recall})"
    )
    print_promises(cal, split)


def print_promises(cal: Any, split: str) -> None:
    """One line per method: τ, the misses it was set on, the recall it can honestly promise
    (one-sided 95 % Clopper–Pearson lower bound) and the TN flag rate it costs; then the
    warnings."""
    click.echo(
        f"  {'method':24s} {'τ':>9s}  {'misses':>6s}  {'promise (95 %)':>14s}  TN flagged on {split}"
    )
    warned = False
    for m, v in cal.methods.items():
        rate = "–" if v.get("tn_flag_rate") is None else f"{100 * v['tn_flag_rate']:.1f} %"
        bound = v.get("recall_lower_bound")
        promise = "–" if bound is None else f"≥ {100 * bound:.1f} %"
        click.echo(f"  {m:24s} {v['tau']:9.4f}  {v['n_positives']:6d}  {promise:>14s}  {rate}")
        warned = warned or not v.get("certified", True)
    if warned:
        first = next(v["warning"] for v in cal.methods.values() if v.get("warning"))
        click.echo(f"WARNING: the target recall cannot be certified with so few misses: {first}")


@click.command()
@MANIFEST
@click.option("--model", type=click.Path(path_type=Path, exists=True), default=None)
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--split", default="test", show_default=True)
@click.option("--calibration-split", default="val", show_default=True)
@click.option(
    "--folds", default=0, type=int, help="K ≥ 2: train K models, score every image out of fold."
)
@click.option(
    "--folds-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where fold checkpoints are kept and reused (default: OUT/folds).",
)
@click.option("--target-recall", default=1.0, show_default=True, type=float)
@click.option(
    "--snapshot-epochs",
    default="",
    help="With --folds: keep each fold model's checkpoints after these epochs (e.g. 6,9,12) "
    "and measure them as a snapshot ensemble.",
)
@click.option(
    "--auditor-recipe",
    "auditor_recipes",
    multiple=True,
    help="With --folds: train an auditor per fold with this recipe (repeat), e.g. "
    "arch=resnet18,image_size=160,seed=1000,augment=flips.",
)
@second_opinion_options
@click.option(
    "--decision-method",
    default="iou_gap_adv",
    show_default=True,
    type=MethodName(),
    help="Method whose τ decides the overlays (any name in worker.engine.methods.REGISTRY).",
)
@click.option("--bootstrap", default=1000, show_default=True, type=int)
@engine_options
@_recipe_options
@click.option("--threads", default=0, type=int)
def evaluate(
    manifest: Path,
    model: Path | None,
    out: Path,
    split: str,
    calibration_split: str,
    folds: int,
    folds_dir: Path | None,
    target_recall: float,
    decision_method: str,
    bootstrap: int,
    threads: int,
    snapshot_epochs: str,
    **kw: Any,
) -> None:
    """Evaluate every scoring method (docs/design.md §4); write metrics.json, report.md, roc.png, overlays."""
    from inspection_audit.lab.protocol import evaluate as run

    _threads(threads)
    if model is None and folds < 2:
        raise click.UsageError("give --model CKPT, or --folds K (K ≥ 2) to train K models")
    command = "inspection-audit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with _user_errors():
        metrics = run(
            manifest,
            out,
            model=model,
            split=split,
            calibration_split=calibration_split,
            folds=folds,
            recipe=_recipe(kw),
            config=_config(kw),
            target_recall=target_recall,
            decision_method=decision_method,
            n_boot=bootstrap,
            command=command,
            seed=kw["seed"],
            folds_dir=folds_dir,
            plan=_plan({**kw, "snapshot_epochs": snapshot_epochs}, folds=folds >= 2),
        )
    c = metrics["counts"]
    click.echo(
        f"{c['n_images']} images, accuracy {100 * c['accuracy']:.1f} %, predicted ok {c['n_predicted_ok']}: "
        f"{c['n_false_negative']} false negatives, {c['n_true_negative']} true negatives"
    )
    for m, v in metrics["methods"].items():
        au = "–" if v["auroc"] is None else f"{v['auroc']:.3f}"
        full = (
            "–"
            if v["tn_flag_rate_at_full_recall"] is None
            else f"{100 * v['tn_flag_rate_at_full_recall']:.1f} %"
        )
        click.echo(f"  {m:12s} AUROC {au}   TN flagged at 100 % FN recall {full}")
    click.echo(f"wrote {out}/metrics.json, report.md, roc.png")


@click.command()
@MANIFEST
@click.option("--model", type=click.Path(path_type=Path, exists=True), required=True)
@click.option("--split", default="val", show_default=True)
@click.option(
    "--out", type=click.Path(path_type=Path), required=True, help="JSON file of the results."
)
@click.option("--threads", default=0, type=int)
def sweep(manifest: Path, model: Path, split: str, out: Path, threads: int) -> None:
    """Compare engine variants (layer, map, binarisation, IoU, attack) on one split (use `val`)."""
    from inspection_audit.lab.sweep import run_sweep

    _threads(threads)
    results = run_sweep(manifest, model, split)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    best = results["ranking"][:10]
    for r in best:
        click.echo(
            f"{r['variant']:70s} AUROC {r['auroc']:.3f}  TN@100% {100 * r['tn_flag_rate_at_full_recall']:.1f} %"
        )
    click.echo(f"wrote {out}")


@click.command("fit-bank")
@MANIFEST
@click.option(
    "--model",
    type=click.Path(path_type=Path, exists=True),
    required=True,
    help="The production checkpoint (an 'own' bank is tied to its model_version).",
)
@click.option(
    "--kind", type=click.Choice(["imagenet", "own"]), default="imagenet", show_default=True
)
@click.option(
    "--out", type=click.Path(path_type=Path), default=None, help="Default: next to the model."
)
@click.option(
    "--layers",
    default=None,
    help="Comma-separated layer names (finest first); default: chosen on the val split.",
)
@click.option("--coreset", default=4000, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--threads", default=0, type=int)
def fit_bank(
    manifest: Path,
    model: Path,
    kind: str,
    out: Path | None,
    layers: str | None,
    coreset: int,
    seed: int,
    threads: int,
) -> None:
    """Build a PatchCore bank from the `train` split's ok images (layers chosen on `val`)."""
    import json

    from inspection_audit.lab.banks import build_bank, choose_layers
    from inspection_audit.lab.dataset import read_manifest
    from worker.model.checkpoint import load_checkpoint
    from worker.model.preprocess import load_image

    _threads(threads)
    with _user_errors():
        pm = load_checkpoint(model)
        train_records = read_manifest(manifest, "train")
    if layers:
        ok = [load_image(r.path, pm.in_channels) for r in train_records if r.label == "ok"]
        bank = build_bank(kind, pm, ok, _csv(layers), coreset_size=coreset, seed=seed)
        chosen, candidates = _csv(layers), {}
    else:
        fit = choose_layers(
            kind, pm, train_records, read_manifest(manifest, "val"), coreset_size=coreset, seed=seed
        )
        bank, chosen, candidates = fit.bank, fit.layers, fit.candidates
    out = out or model.with_name(f"{model.name}.bank-{kind}.pt")
    bank.save(out)
    out.with_suffix(".json").write_text(
        json.dumps({"layers": list(chosen), "val_auroc": candidates}, indent=2)
    )
    click.echo(
        f"wrote {out} ({kind}, {len(bank)} patches of {bank.n_patches} from {bank.n_images} ok "
        f"images, layers {', '.join(chosen)}, model_version {bank.model_version})"
    )
    for name, auc in candidates.items():
        click.echo(f"  val AUROC (defects vs ok) {name}: {'–' if auc is None else f'{auc:.3f}'}")
