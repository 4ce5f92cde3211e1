"""``inspection-audit demo``: the whole pipeline on a labelled dataset, on the embedded default.

1. a production model (``--model CKPT``, or trained here and cached under ``<home>/models/``),
   one small auditor, and the second opinions the decision method needs
   (:class:`inspection_audit.lab.demo.DemoPlan`);
2. τ of every method calibrated on the ``val`` split (the sidecar next to the checkpoint);
3. ``db upgrade``;
4. the ``test`` split enqueued through :func:`producer.api.enqueue_many`, each image with the
   prediction and P(defect) the production model gives it (as a line would send them);
5. ``--workers`` worker subprocesses audit the queue, with a progress bar;
6. the outcome, the paper's score and the decision method side by side on the same images,
   and the head of the review queue.

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
from inspection_audit.cli.web import how_to_review

STALL_TIMEOUT_S = 180.0


@click.command("demo")
@click.option("--dataset", type=click.Path(path_type=Path), default=None,
              help="Dataset folder with manifest.csv (default: INSPECTION_AUDIT_DATASET, else "
              "../shared/datasets/magnetic-tile).")  # fmt: skip
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--model", type=click.Path(path_type=Path), default=None,
              help="Use this checkpoint instead of training (or reusing) the demo model.")  # fmt: skip
@click.option("--epochs", type=click.IntRange(min=1), default=15, show_default=True,
              help="Epochs of the demo's production model (its auditor trains half as many).")  # fmt: skip
@click.option("--image-size", type=click.IntRange(min=32), default=128, show_default=True,
              help="Input side of the production model (its auditor: three quarters).")  # fmt: skip
@click.option("--show", type=click.IntRange(min=0), default=10, show_default=True,
              help="Review queue rows shown.")  # fmt: skip
def demo(dataset: Path | None, workers: int, model: Path | None, epochs: int, image_size: int,
         show: int) -> None:  # fmt: skip
    """Train (or reuse) the models, calibrate τ, enqueue the test split, audit it with
    workers, and report what the audit caught."""
    from db.migrate import upgrade
    from db.session import dispose_engines
    from inspection_audit.lab.dataset import read_manifest
    from inspection_audit.lab.demo import (
        DemoPlan,
        ensure_calibration,
        ensure_models,
        find_dataset,
        line_calls,
    )
    from inspection_audit.procs import start_worker, stop_workers, wait_for, worker_env
    from inspection_audit.settings import get_settings
    from producer.api import enqueue_many, reset_apps
    from worker.measure import SuiteError
    from worker.model.checkpoint import CheckpointError, load_checkpoint

    settings = get_settings()
    manifest = find_dataset(dataset, settings.dataset)
    root, home = manifest.parent, settings.home.resolve()
    console.print(f"[bold]dataset[/] {manifest}")
    console.print(f"[bold]broker[/] {settings.resolved_broker_url}   [bold]database[/] "
                  f"{settings.resolved_database_url.split('@')[-1]}")  # fmt: skip
    plan = DemoPlan.sized(image_size, epochs)
    if (
        settings.decision_method.startswith("snapshot_")
        and model is None
        and not plan.snapshot_epochs
    ):
        raise click.ClickException(
            f"decision method {settings.decision_method} reads snapshots of the training run, "
            f"and {epochs} epoch(s) leave none: use --epochs 2 or more, or set "
            "INSPECTION_AUDIT_DECISION_METHOD to another method (e.g. msp)"
        )
    try:
        models = ensure_models(manifest, home, plan, model)
        cal = ensure_calibration(manifest, models, settings)
    except (CheckpointError, SuiteError) as exc:  # e.g. a snapshot beside --model that is unusable
        raise click.ClickException(str(exc)) from None
    version, method = load_checkpoint(models.production).model_version, settings.decision_method
    if method not in cal.methods:
        raise click.ClickException(
            f"decision method {method} has no τ: it reads a second opinion this demo does not "
            f"measure ({cal.second_opinions or 'none'}); with --model, put its run's snapshots "
            "(<stem>-epoch<N>.pt, from `train --snapshot-epochs`) beside it, or set "
            "INSPECTION_AUDIT_DECISION_METHOD to another method (e.g. msp)"
        )
    url = settings.resolved_database_url
    upgrade(url)
    dispose_engines()
    console.print("[bold]database[/] migrated")
    records = read_manifest(manifest, "test")
    prefix, now = f"demo-{uuid.uuid4().hex[:8]}-", datetime.now(UTC).isoformat()
    labels: dict[str, str] = {}
    predictions: dict[str, str] = {}
    messages = []
    for i, (rec, p) in enumerate(zip(records, line_calls(models.production, records), strict=True)):
        iid = f"{prefix}{i:04d}"
        labels[iid], predictions[iid] = rec.label, "defect" if p >= 0.5 else "ok"
        messages.append({"inspection_id": iid, "image_path": rec.rel_path,
                         "prediction": predictions[iid], "score": min(max(p, 0.0), 1.0),
                         "line": "demo", "station": "S1", "captured_at": now,
                         "model_version": version})  # fmt: skip
    with progress() as bar:
        task = bar.add_task("enqueue", total=len(messages))
        ids = enqueue_many(messages, settings=settings.model_copy(update={"image_roots": [root]}),
                           on_sent=lambda _m: bar.advance(task))  # fmt: skip
    reset_apps()
    # The workers get this command's settings, with the models, image root and home fixed.
    given = {k.removeprefix("INSPECTION_AUDIT_"): v for k, v in os.environ.items()
             if k.startswith("INSPECTION_AUDIT_")}  # fmt: skip
    env = worker_env({**given, **models.worker_settings(), "image_roots": root, "home": home})
    logs = home / "logs"
    procs = [start_worker(env, f"demo{i + 1}", Path.cwd(), log_dir=logs) for i in range(workers)]
    console.print(f"[bold]workers[/] {workers} started (logs in {logs})")
    try:
        with progress() as bar:
            task = bar.add_task("audit rows", total=len(ids))
            state = {"done": 0, "changed": time.monotonic()}

            def all_written() -> bool:
                done = len(_rows(url, prefix, version, method))
                if done != state["done"]:
                    state.update(done=done, changed=time.monotonic())
                bar.update(task, completed=done)
                if time.monotonic() - state["changed"] > STALL_TIMEOUT_S:
                    raise click.ClickException(f"no progress for {STALL_TIMEOUT_S:.0f} s; "
                                               f"worker log:\n{procs[0].tail(25)}")  # fmt: skip
                return done >= len(ids)

            wait_for(all_written, timeout=float("inf"), workers=procs, interval=0.5)
    finally:
        stop_workers(procs)
        dispose_engines()
    _report(_rows(url, prefix, version, method), labels, predictions, cal, method, url, show)
    how_to_review(settings, root)


def _rows(url: str, prefix: str, version: str, method: str) -> list[dict[str, Any]]:
    import sqlalchemy as sa

    from db.models import Audit
    from db.session import session_scope

    a = Audit.__table__.c
    with session_scope(url) as s:
        stmt = sa.select(Audit.__table__).where(
            a.inspection_id.like(f"{prefix}%"), a.model_version == version, a.method == method
        )
        return [dict(r) for r in s.execute(stmt).mappings()]


def _report(rows: list[dict[str, Any]], labels: dict[str, str], predictions: dict[str, str],
            cal: Any, method: str, url: str, show: int) -> None:  # fmt: skip
    from db.repository import review_queue
    from db.session import session_scope
    from inspection_audit.lab.demo import PAPER_METHOD, summarize

    methods = [PAPER_METHOD] + ([method] if method != PAPER_METHOD else [])
    summary = summarize(rows, labels, predictions, cal, methods)
    errors = [r for r in rows if r["status"] == "error"]
    n_ok = sum(predictions[r["inspection_id"]] == "ok" for r in rows)
    out = wide_console()
    c = Table(title=f"audit of the test split (decision method {method})")
    c.add_column("")
    c.add_column("count", justify="right")
    for label, n in (("images audited", len(rows)), ("  called ok by the line (audited in full)", n_ok),
                     ("  called defect (cheap row)", len(rows) - n_ok), ("errors", len(errors))):  # fmt: skip
        c.add_row(label, str(n))
    out.print(c)
    t = Table(title="the paper's score and the decision method, on the same images")
    t.add_column("")
    for m in methods:
        t.add_column(("the paper's " if m == PAPER_METHOD else "decision: ") + m, justify="right")
    for label, fmt in (
        ("τ (set on val)", lambda v: "–" if v["tau"] is None else f"{v['tau']:.4f}"),
        ("promised recall (95 %)", lambda v: "–" if v["promise"] is None else f"≥ {100 * v['promise']:.1f} %"),
        ("false negatives caught", lambda v: f"{v['caught']} of {v['n_fn']}"),
        ("true negatives flagged", lambda v: f"{v['tn_flagged']} of {v['n_tn']}"
         + (f" ({100 * v['tn_flagged'] / v['n_tn']:.1f} %)" if v["n_tn"] else "")),
    ):  # fmt: skip
        t.add_row(label, *(fmt(summary[m]) for m in methods))
    out.print(t)
    for r in errors[:5]:
        out.print(f"  error {r['inspection_id']}: {r['error']}")
    if show:
        with session_scope(url) as s:
            queue = review_queue(s, limit=show)
        q = Table(title=f"review queue (head, {len(queue)} shown)")
        for col in ("inspection_id", "decision_score", "tau", "p_defect", "label", "overlay"):
            q.add_column(col)
        for r in queue:
            q.add_row(r["inspection_id"], f"{r['decision_score']:.4f}", f"{r['tau']:.4f}",
                      f"{r['p_defect']:.3f}", labels.get(r["inspection_id"], "?"),
                      r["overlay_path"] or "")  # fmt: skip
        out.print(q)
