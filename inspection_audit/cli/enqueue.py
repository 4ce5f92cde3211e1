"""``inspection-audit enqueue``: send images to the audit queue from a shell.

One function per command; :func:`register` attaches them to the main group. Nothing here
imports torch at module level: only ``enqueue --run-model`` does, when it runs.
"""

from __future__ import annotations

import base64
import csv
import glob
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from inspection_audit.settings import Settings

console = Console(stderr=True)

_GLOB_CHARS = re.compile(r"[*?\[]")
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]+")


@dataclass(frozen=True)
class _Item:
    """One image to enqueue: its absolute path and the inspection id derived from it."""

    path: Path
    inspection_id: str


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def _sanitise_id(text: str) -> str:
    """``text`` with every run of characters outside ``[A-Za-z0-9._:-]`` replaced by ``-``."""
    return _ID_UNSAFE.sub("-", text).strip("-._:")


def _expand_paths(patterns: Sequence[str]) -> list[Path]:
    """Files named by ``patterns`` (paths or globs, ``**`` recursive), in order, deduplicated."""
    out: list[Path] = []
    seen: set[Path] = set()
    for pattern in patterns:
        if _GLOB_CHARS.search(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file()]
            if not files:
                raise click.BadParameter(f"no files match {pattern!r}", param_hint="PATH_OR_GLOB")
        else:
            p = Path(pattern)
            if not p.is_file():
                what = "is not a file" if p.exists() else "does not exist"
                raise click.BadParameter(f"{pattern!r} {what}", param_hint="PATH_OR_GLOB")
            files = [p]
        for f in files:
            a = f.absolute()
            if a not in seen:
                seen.add(a)
                out.append(a)
    return out


def _read_manifest(manifest: Path, split: str | None) -> list[tuple[Path, str]]:
    """``(absolute path, path as written)`` of the manifest's rows (optionally one split).

    A torch-free reader of the ``path`` and ``split`` columns of ``manifest.csv`` (paths
    relative to the manifest's folder); see :mod:`inspection_audit.lab.dataset` for the format.
    """
    if manifest.is_dir():
        manifest = manifest / "manifest.csv"
    if not manifest.is_file():
        raise click.BadParameter(f"manifest not found: {manifest}", param_hint="--manifest")
    folder = manifest.parent.absolute()
    rows: list[tuple[Path, str]] = []
    with manifest.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        need = {"path"} | ({"split"} if split else set())
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise click.ClickException(
                f"{manifest}: needs columns {sorted(need)}, has {reader.fieldnames}"
            )
        for i, row in enumerate(reader, start=2):
            if split and (row.get("split") or "").strip() != split:
                continue
            rel = (row.get("path") or "").strip()
            if not rel:
                raise click.ClickException(f"{manifest}:{i}: empty path")
            p = folder / rel
            if not p.is_file():
                raise click.ClickException(f"{manifest}:{i}: image not found: {p}")
            rows.append((p, rel))
    if not rows:
        raise click.ClickException(
            f"{manifest}: no rows" + (f" in split {split!r}" if split else "")
        )
    return rows


def _load_settings() -> Settings:
    """Settings from the environment, read now (not the process-wide cache)."""
    try:
        return Settings()
    except Exception as exc:  # pydantic / pydantic-settings errors: say which variable
        raise click.ClickException(
            f"invalid INSPECTION_AUDIT_* configuration: {exc}"
            + (f" ({exc.__cause__})" if exc.__cause__ else "")
        ) from None


def _with_roots(settings: Settings, default_root: Path, why: str) -> Settings:
    """``settings``, with ``image_roots = [default_root]`` if none are configured (said aloud)."""
    if settings.image_roots:
        return settings
    root = default_root.resolve()
    console.print(
        f"INSPECTION_AUDIT_IMAGE_ROOTS is empty: using {why} [bold]{root}[/] as the image root "
        "(workers must be started with the same root)"
    )
    return settings.model_copy(update={"image_roots": [root]})


def _score_with_model(
    items: list[_Item],
    checkpoint: Path,
    settings: Settings,
    device: str,
    batch_size: int,
    threshold: float,
    advance: Callable[[int], None],
) -> tuple[list[tuple[str, float]], str]:
    """``(prediction, P(defect))`` per item from the production model, and its model_version."""
    import torch

    from worker.model.checkpoint import CheckpointError, load_checkpoint, p_defect_from_logits
    from worker.model.preprocess import ImageError, ImageLimits, preprocess

    try:
        pm = load_checkpoint(checkpoint, device)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from None
    limits = ImageLimits(
        max_bytes=settings.max_image_bytes,
        max_pixels=settings.max_image_pixels,
        min_side=settings.min_image_side,
        max_aspect_ratio=settings.max_aspect_ratio,
    )
    out: list[tuple[str, float]] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        xs = []
        for it in chunk:
            try:
                xs.append(
                    preprocess(it.path, pm.input_size, pm.in_channels, limits, resize=pm.resize)
                )
            except ImageError as exc:
                raise click.ClickException(f"{it.path}: {exc}") from None
        with torch.no_grad():
            logits = pm.model(torch.stack(xs).to(device))
        probs = p_defect_from_logits(logits, pm.defect_index).float().cpu().tolist()
        out.extend(("defect" if p >= threshold else "ok", float(p)) for p in probs)
        advance(len(chunk))
    return out, pm.model_version


@click.command("enqueue")
@click.argument("paths", nargs=-1, metavar="[PATH_OR_GLOB]...")
@click.option(
    "--manifest",
    type=click.Path(path_type=Path, exists=True),
    help="manifest.csv (or its folder): enqueue its images instead of PATH_OR_GLOB.",
)
@click.option("--split", default=None, help="With --manifest: only this split (e.g. test).")
@click.option("--prediction", type=click.Choice(["ok", "defect"]), help="The line's call.")
@click.option("--score", type=float, help="The line's P(defect), in [0, 1].")
@click.option(
    "--run-model",
    "run_model",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="Compute prediction and score with this production checkpoint instead.",
)
@click.option("--threshold", default=0.5, show_default=True, help="--run-model: P(defect) cut.")
@click.option("--batch-size", default=32, show_default=True, help="--run-model: images per batch.")
@click.option("--device", default="cpu", show_default=True, help="--run-model: torch device.")
@click.option(
    "--model-version",
    default=None,
    help="model_version to send (default with --run-model: the checkpoint's).",
)
@click.option("--line", default="cli", show_default=True)
@click.option("--station", default="cli", show_default=True)
@click.option(
    "--id-prefix",
    default="",
    help="inspection_id = prefix + file stem (or the manifest's relative path, sanitised).",
)
@click.option("--inline", is_flag=True, help="Send the image bytes inline instead of paths.")
def enqueue(
    paths: tuple[str, ...],
    manifest: Path | None,
    split: str | None,
    prediction: str | None,
    score: float | None,
    run_model: Path | None,
    threshold: float,
    batch_size: int,
    device: str,
    model_version: str | None,
    line: str,
    station: str,
    id_prefix: str,
    inline: bool,
) -> None:
    """Send images to the audit queue (all validated before the first is sent)."""
    from producer.api import EnqueueError, enqueue_many
    from producer.schema import InspectionMessage, MessageError

    if bool(paths) == (manifest is not None):
        raise click.UsageError("give either PATH_OR_GLOB... or --manifest FILE (not both)")
    if split and manifest is None:
        raise click.UsageError("--split needs --manifest")
    given = (prediction is not None, score is not None)
    if run_model is not None and any(given):
        raise click.UsageError("--run-model computes --prediction/--score: give one or the other")
    if run_model is None and not all(given):
        raise click.UsageError("give --prediction and --score, or --run-model CKPT")
    if batch_size < 1:
        raise click.BadParameter("must be >= 1", param_hint="--batch-size")

    settings = _load_settings()
    items: list[_Item]
    if manifest is not None:
        rows = _read_manifest(manifest, split)
        folder = manifest if manifest.is_dir() else manifest.parent
        settings = _with_roots(settings, folder, "the manifest's folder")
        items = [
            _Item(p, id_prefix + _sanitise_id(str(Path(rel).with_suffix("")))) for p, rel in rows
        ]
    else:
        files = _expand_paths(paths)
        common = Path(os.path.commonpath([str(f.resolve().parent) for f in files]))
        settings = _with_roots(settings, common, "the common folder of the files,")
        items = [_Item(f, id_prefix + _sanitise_id(f.stem)) for f in files]

    captured_at = datetime.now(UTC)
    calls: list[tuple[str, float]]
    with _progress() as progress:
        if run_model is not None:
            task = progress.add_task("scoring", total=len(items))
            calls, ckpt_version = _score_with_model(
                items,
                run_model,
                settings,
                device,
                batch_size,
                threshold,
                lambda n: progress.advance(task, n),
            )
            model_version = model_version or ckpt_version
        else:
            assert prediction is not None and score is not None
            calls = [(prediction, score)] * len(items)

        messages: list[InspectionMessage] = []
        for it, (pred, p) in zip(items, calls, strict=True):
            fields: dict[str, Any] = {
                "inspection_id": it.inspection_id,
                "prediction": pred,
                "score": p,
                "line": line,
                "station": station,
                "captured_at": captured_at,
                "model_version": model_version,
            }
            if inline:
                fields["image_b64"] = base64.b64encode(it.path.read_bytes()).decode("ascii")
            else:
                fields["image_path"] = str(it.path)
            try:
                messages.append(
                    InspectionMessage.model_validate(fields, context={"settings": settings})
                )
            except ValidationError as exc:
                err = MessageError.from_validation_error(exc, it.inspection_id)
                raise click.ClickException(f"{it.path}: {err}") from None

        task = progress.add_task("sending", total=len(messages))
        try:
            sent = enqueue_many(
                messages, settings=settings, on_sent=lambda _m: progress.advance(task)
            )
        except MessageError as exc:
            raise click.ClickException(f"nothing was sent: {exc}") from None
        except EnqueueError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"enqueued {len(sent)} messages to {settings.queue}")
