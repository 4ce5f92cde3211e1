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

import os
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from inspection_audit.cli.common import console, progress, wide_console

STALL_TIMEOUT_S = 180.0


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
    "--show", type=click.IntRange(min=0), default=10, show_default=True, help="Queue rows shown."
)
def demo(
    dataset: Path | None, workers: int, model: Path | None, epochs: int, image_size: int, show: int
) -> None:
    """Train (or reuse) a model, calibrate τ, enqueue the test split, audit it with workers,
    and report what the audit caught."""
    from db.migrate import upgrade
    from db.repository import review_queue
    from db.session import dispose_engines, session_scope
    from inspection_audit.lab.dataset import read_manifest
    from inspection_audit.lab.demo import ensure_calibration, ensure_model, find_dataset, line_calls
    from inspection_audit.procs import start_worker, stop_workers, wait_for, worker_env
    from inspection_audit.settings import get_settings
    from producer.api import enqueue_many, reset_apps
    from worker.model.checkpoint import load_checkpoint

    settings = get_settings()
    manifest = find_dataset(dataset, settings.dataset)
    root, home = manifest.parent, settings.home.resolve()
    console.print(f"[bold]dataset[/] {manifest}")
    console.print(
        f"[bold]broker[/] {settings.resolved_broker_url}   [bold]database[/] "
        f"{settings.resolved_database_url.split('@')[-1]}"
    )
    # 1-2. the production model and its calibration
    ckpt = ensure_model(manifest, home, model, epochs, image_size)
    ensure_calibration(manifest, ckpt, settings)
    version, method = load_checkpoint(ckpt).model_version, settings.decision_method
    # 3. the database, migrated as its own step
    url = settings.resolved_database_url
    upgrade(url)
    dispose_engines()
    console.print("[bold]database[/] migrated")
    # 4. the test split, enqueued with the production model's calls as a line would send them
    records = read_manifest(manifest, "test")
    prefix, now = f"demo-{uuid.uuid4().hex[:8]}-", datetime.now(UTC).isoformat()
    labels: dict[str, str] = {}
    predictions: dict[str, str] = {}
    messages = []
    for i, (rec, p) in enumerate(zip(records, line_calls(ckpt, records), strict=True)):
        iid = f"{prefix}{i:04d}"
        labels[iid], predictions[iid] = rec.label, "defect" if p >= 0.5 else "ok"
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
    with progress() as bar:
        task = bar.add_task("enqueue", total=len(messages))
        ids = enqueue_many(messages, settings=psettings, on_sent=lambda _m: bar.advance(task))
    reset_apps()
    # 5. worker subprocesses audit the queue
    # The workers get this command's settings, with the model, image root and home fixed.
    given = {
        k.removeprefix("INSPECTION_AUDIT_"): v
        for k, v in os.environ.items()
        if k.startswith("INSPECTION_AUDIT_")
    }
    env = worker_env({**given, "model": ckpt, "image_roots": root, "home": home})
    logs = home / "logs"
    procs = [start_worker(env, f"demo{i + 1}", Path.cwd(), log_dir=logs) for i in range(workers)]
    console.print(f"[bold]workers[/] {workers} started (logs in {logs})")
    try:
        with progress() as bar:
            task = bar.add_task("audit rows", total=len(ids))
            state = {"done": 0, "changed": time.monotonic()}

            def all_written() -> bool:
                done = _count_rows(url, prefix, version, method)
                if done != state["done"]:
                    state.update(done=done, changed=time.monotonic())
                bar.update(task, completed=done)
                if time.monotonic() - state["changed"] > STALL_TIMEOUT_S:
                    raise click.ClickException(
                        f"no progress for {STALL_TIMEOUT_S:.0f} s; worker log:\n"
                        + procs[0].tail(25)
                    )
                return done >= len(ids)

            wait_for(all_written, timeout=float("inf"), workers=procs, interval=0.5)
    finally:
        stop_workers(procs)
        dispose_engines()
    # 6. what the audit caught, and where to review it
    _report(url, prefix, version, method, labels, predictions, show, review_queue, session_scope)
    _how_to_review(settings, root)


def _how_to_review(settings: Any, image_root: Path) -> None:
    """Tell the user how to open the review page on the results just written."""
    import shlex
    import sys

    from inspection_audit.web.auth import AccountsError, load_accounts, users_file

    exe = Path(sys.argv[0])
    cmd = os.path.relpath(exe) if exe.name == "inspection-audit" else "inspection-audit"
    if len(cmd) > len(str(exe)):
        cmd = str(exe)
    try:
        has_users = bool(load_accounts(settings).users)
    except AccountsError:
        has_users = False
    out = wide_console()
    out.print("[bold]Review these results in a browser:[/]")
    if not has_users:
        out.print(
            f"  {cmd} web add-user reviewer        # once: asks for a password, kept hashed in "
            f"{users_file(settings)}"
        )
    root = shlex.quote(str(image_root))
    out.print(f"  INSPECTION_AUDIT_IMAGE_ROOTS={root} {cmd} serve")
    out.print("  then open http://127.0.0.1:8000/queue?line=demo and log in")


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
    out = wide_console()
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
