"""``inspection-audit demo``: the whole pipeline on a labelled dataset, in a few minutes.

1. a production model: ``--model CKPT``, or one trained here with a small recipe and cached
   under ``<home>/models/`` (keyed by the manifest's path, its content hash and the recipe);
2. τ calibrated on the ``val`` split (the sidecar next to the checkpoint), unless present;
3. ``db upgrade``;
4. the ``test`` split enqueued through :func:`producer.api.enqueue_many`, each image with the
   prediction and P(defect) the production model gives it (as the line would send them);
5. ``--workers`` worker subprocesses (``inspection-audit worker``) audit the queue, with a
   progress bar of rows written against messages enqueued;
6. the workers are stopped and the outcome printed: images audited, flagged, false negatives
   caught (from the manifest's labels), true negatives flagged, errors, and the head of the
   review queue.

With no ``INSPECTION_AUDIT_*`` set it runs on the embedded default (SQLite and the filesystem
broker under ``INSPECTION_AUDIT_HOME``); with Redis/PostgreSQL URLs set it uses those.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=True)
_probe = Console()
# Off a terminal rich would cut the tables to 80 characters: keep ids and paths whole.
out = Console(width=None if _probe.is_terminal else max(_probe.width, 200))

DEFAULT_DATASET = Path("..") / "shared" / "datasets" / "magnetic-tile"
STALL_TIMEOUT_S = 180.0


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
        "labels ok/defect; splits train/val/test; see DESIGN.md §4), e.g. the Magnetic Tile "
        "surface defect dataset (Huang et al., 2020) laid out that way."
    )


def model_cache_path(home: Path, manifest: Path, recipe: dict[str, Any]) -> Path:
    """``<home>/models/demo-<key>.pt``, key = hash of the manifest path, content and recipe."""
    h = hashlib.sha256()
    h.update(str(manifest.resolve()).encode())
    h.update(manifest.read_bytes())
    h.update(json.dumps(recipe, sort_keys=True).encode())
    return home.resolve() / "models" / f"demo-{h.hexdigest()[:16]}.pt"


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def _ensure_model(
    manifest: Path, home: Path, model: Path | None, epochs: int, image_size: int
) -> Path:
    from worker.checkpoint import CheckpointError, load_checkpoint

    if model is not None:
        try:
            load_checkpoint(model)
        except CheckpointError as exc:
            raise click.ClickException(str(exc)) from None
        console.print(f"[bold]model[/] {model} (given)")
        return model.resolve()
    import torch

    from worker.dataset import read_manifest
    from worker.training import Recipe, train_model

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


def _ensure_calibration(manifest: Path, ckpt: Path, settings: Any) -> None:
    from worker.checkpoint import load_checkpoint
    from worker.engine.calibration import CalibrationError, load_calibration, sidecar_path
    from worker.evaluation import calibrate_checkpoint
    from worker.runtime import engine_config_for

    version = load_checkpoint(ckpt).model_version
    try:
        cal = load_calibration(ckpt, version)
    except CalibrationError as exc:
        console.print(f"calibration unusable ({exc}); calibrating again")
        cal = None
    if cal is None:
        console.print(f"[bold]calibration[/] τ on the val split → {sidecar_path(ckpt)}")
        try:
            cal = calibrate_checkpoint(
                manifest, ckpt, split="val", config=engine_config_for(settings, None)
            )
        except CalibrationError as exc:
            raise click.ClickException(f"cannot calibrate on val: {exc}") from None
    else:
        console.print(f"[bold]calibration[/] reusing {sidecar_path(ckpt)}")
    tau = cal.tau(settings.decision_method)
    console.print(
        f"decision method {settings.decision_method}: τ = "
        + ("none (nothing will be flagged)" if tau is None else f"{tau:.4f}")
    )


def _predict(ckpt: Path, records: list[Any]) -> list[float]:
    """P(defect) of the production model for each record (what the line would send)."""
    import torch

    from worker.checkpoint import load_checkpoint
    from worker.dataset import load_tensors
    from worker.training import p_defect_from_logits, predict_logits

    pm = load_checkpoint(ckpt)
    x, _ = load_tensors(records, pm.input_size, pm.in_channels, "production model", True)
    with torch.no_grad():
        z = predict_logits(pm.model, x)
    return [float(p) for p in p_defect_from_logits(z, pm.defect_index).tolist()]


def _start_workers(
    n: int, env: dict[str, str], logs: Path
) -> list[tuple[subprocess.Popen[bytes], Path]]:
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(n):
        log = logs / f"demo-worker-{i + 1}.log"
        with log.open("wb") as fh:
            p = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "inspection_audit.cli",
                    "worker",
                    "-n",
                    f"demo{i + 1}@%h",
                    "-c",
                    "1",
                ],
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        procs.append((p, log))
    return procs


def _stop_workers(procs: list[tuple[subprocess.Popen[bytes], Path]], timeout: float = 30) -> None:
    for p, _ in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p, _ in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _count_rows(url: str, prefix: str, version: str, method: str) -> int:
    import sqlalchemy as sa

    from db.models import Audit
    from db.session import session_scope

    a = Audit.__table__.c
    with session_scope(url) as s:
        return int(
            s.execute(
                sa.select(sa.func.count()).where(
                    a.inspection_id.like(f"{prefix}%"),
                    a.model_version == version,
                    a.method == method,
                )
            ).scalar_one()
        )


@click.command("demo")
@click.option(
    "--dataset",
    type=click.Path(path_type=Path),
    default=None,
    help="Dataset folder with manifest.csv (default: INSPECTION_AUDIT_DATASET, else "
    "../shared/datasets/magnetic-tile).",
)
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True)
@click.option(
    "--model",
    type=click.Path(path_type=Path),
    default=None,
    help="Use this checkpoint instead of training (or reusing) the demo model.",
)
@click.option("--epochs", type=click.IntRange(min=1), default=15, show_default=True)
@click.option("--image-size", type=click.IntRange(min=32), default=128, show_default=True)
@click.option(
    "--show",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help="Review queue rows shown.",
)
def demo(
    dataset: Path | None,
    workers: int,
    model: Path | None,
    epochs: int,
    image_size: int,
    show: int,
) -> None:
    """Train (or reuse) a model, calibrate τ, enqueue the test split, audit it with workers,
    and report what the audit caught."""
    from db.migrate import upgrade
    from db.repository import review_queue
    from db.session import dispose_engines, session_scope
    from inspection_audit.settings import get_settings
    from producer.api import enqueue_many, reset_apps
    from worker.checkpoint import load_checkpoint
    from worker.dataset import read_manifest

    settings = get_settings()
    manifest = find_dataset(dataset, settings.dataset)
    root = manifest.parent
    home = settings.home.resolve()
    console.print(f"[bold]dataset[/] {manifest}")
    console.print(
        f"[bold]broker[/] {settings.resolved_broker_url}   [bold]database[/] "
        f"{settings.resolved_database_url.split('@')[-1]}"
    )

    # 1-2. model and calibration
    ckpt = _ensure_model(manifest, home, model, epochs, image_size)
    _ensure_calibration(manifest, ckpt, settings)
    version = load_checkpoint(ckpt).model_version
    method = settings.decision_method

    # 3. database
    url = settings.resolved_database_url
    upgrade(url)
    dispose_engines()
    console.print("[bold]database[/] migrated")

    # 4. enqueue the test split with the production model's calls
    records = read_manifest(manifest, "test")
    if not records:
        raise click.ClickException(f"{manifest} has no test split")
    probs = _predict(ckpt, records)
    run = uuid.uuid4().hex[:8]
    prefix = f"demo-{run}-"
    now = datetime.now(UTC).isoformat()
    labels: dict[str, str] = {}
    predictions: dict[str, str] = {}
    messages = []
    for i, (rec, p) in enumerate(zip(records, probs, strict=True)):
        iid = f"{prefix}{i:04d}"
        labels[iid] = rec.label
        predictions[iid] = "defect" if p >= 0.5 else "ok"
        messages.append(
            {
                "inspection_id": iid,
                "image_path": rec.rel_path,
                "prediction": predictions[iid],
                "score": min(max(p, 0.0), 1.0),
                "line": "demo",
                "station": "S1",
                "captured_at": now,
                "model_version": version,
            }
        )
    psettings = settings.model_copy(update={"image_roots": [root]})
    with _progress() as progress:
        task = progress.add_task("enqueue", total=len(messages))
        ids = enqueue_many(messages, settings=psettings, on_sent=lambda _m: progress.advance(task))
    reset_apps()

    # 5. workers
    env = dict(os.environ)
    env.update(
        {
            "INSPECTION_AUDIT_MODEL": str(ckpt),
            "INSPECTION_AUDIT_IMAGE_ROOTS": str(root),
            "INSPECTION_AUDIT_HOME": str(home),
        }
    )
    procs = _start_workers(workers, env, home / "logs")
    console.print(f"[bold]workers[/] {workers} started (logs in {home / 'logs'})")
    try:
        with _progress() as progress:
            task = progress.add_task("audit rows", total=len(ids))
            done, last, last_change = 0, -1, time.monotonic()
            while done < len(ids):
                done = _count_rows(url, prefix, version, method)
                progress.update(task, completed=done)
                if done != last:
                    last, last_change = done, time.monotonic()
                dead = [(p, log) for p, log in procs if p.poll() is not None]
                if dead:
                    p, log = dead[0]
                    raise click.ClickException(
                        f"a worker exited with code {p.returncode}:\n{_tail(log)}"
                    )
                if time.monotonic() - last_change > STALL_TIMEOUT_S:
                    raise click.ClickException(
                        f"no progress for {STALL_TIMEOUT_S:.0f} s; worker log:\n{_tail(procs[0][1])}"
                    )
                time.sleep(0.5)
    finally:
        _stop_workers(procs)
        dispose_engines()

    # 6. report
    _report(url, prefix, version, method, labels, predictions, show, review_queue, session_scope)


def _report(
    url: str,
    prefix: str,
    version: str,
    method: str,
    labels: dict[str, str],
    predictions: dict[str, str],
    show: int,
    review_queue: Any,
    session_scope: Any,
) -> None:
    import sqlalchemy as sa

    from db.models import Audit

    a = Audit.__table__.c
    with session_scope(url) as s:
        rows = [
            dict(r)
            for r in s.execute(
                sa.select(Audit.__table__).where(
                    a.inspection_id.like(f"{prefix}%"),
                    a.model_version == version,
                    a.method == method,
                )
            ).mappings()
        ]
        queue = review_queue(s, limit=show) if show else []
    pred_ok = [r for r in rows if predictions[r["inspection_id"]] == "ok"]
    fn = [r for r in pred_ok if labels[r["inspection_id"]] == "defect"]
    tn = [r for r in pred_ok if labels[r["inspection_id"]] == "ok"]
    flagged = [r for r in rows if r["suspected_false_negative"]]
    errors = [r for r in rows if r["status"] == "error"]
    caught = [r for r in fn if r["suspected_false_negative"]]
    tn_flagged = [r for r in tn if r["suspected_false_negative"]]

    t = Table(title=f"audit of the test split (model {version}, method {method})")
    t.add_column("")
    t.add_column("count", justify="right")
    t.add_row("images audited", str(len(rows)))
    t.add_row("  predicted ok by the line (audited in full)", str(len(pred_ok)))
    t.add_row("  predicted defect (cheap row)", str(len(rows) - len(pred_ok)))
    t.add_row("flagged as suspected false negatives", str(len(flagged)))
    t.add_row("false negatives caught", f"{len(caught)} of {len(fn)}")
    t.add_row(
        "true negatives flagged (review workload)",
        f"{len(tn_flagged)} of {len(tn)}"
        + (f" ({100 * len(tn_flagged) / len(tn):.1f} %)" if tn else ""),
    )
    t.add_row("errors", str(len(errors)))
    out.print(t)
    for r in errors[:5]:
        out.print(f"  error {r['inspection_id']}: {r['error']}")
    if show:
        q = Table(title=f"review queue (head, {len(queue)} shown)")
        for col in ("inspection_id", "decision_score", "tau", "p_defect", "label", "overlay"):
            q.add_column(col)
        for r in queue:
            q.add_row(
                r["inspection_id"],
                f"{r['decision_score']:.4f}" if r["decision_score"] is not None else "",
                f"{r['tau']:.4f}" if r["tau"] is not None else "",
                f"{r['p_defect']:.3f}" if r["p_defect"] is not None else "",
                labels.get(r["inspection_id"], "?"),
                r["overlay_path"] or "",
            )
        out.print(q)
