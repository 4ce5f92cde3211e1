"""Helpers for pipeline tests: real worker subprocesses, synthetic images, waiting for rows.

Workers come from :mod:`inspection_audit.procs` (their own process group, an environment that
holds only the ``INSPECTION_AUDIT_*`` variables the test sets, the test's folder as working
directory so no ``.env`` of the repository is read). Always stop them in ``finally``
(:func:`stop_workers`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# One copy of the worker-subprocess helpers: inspection_audit.procs (also used by demo and bench).
from inspection_audit.procs import (
    READY,
    WorkerProc,
    cli_command,
    start_worker,
    stop_workers,
    wait_ready,
)
from inspection_audit.procs import worker_env as _procs_worker_env

#: The decision method of the pipeline tests' workers. The product's default (``snapshot_mean``)
#: reads snapshots of the production run, which the tiny test checkpoints do not have (a worker
#: refuses to start without them), so the tests that are not about the decision method pin the
#: paper's score, which every checkpoint can compute. A test names another one in ``values``.
TEST_DECISION_METHOD = "iou_gap_adv"

__all__ = [
    "READY",
    "WorkerProc",
    "audit_rows",
    "cli_command",
    "engine_scores",
    "make_images",
    "start_worker",
    "stop_workers",
    "tau_between",
    "wait_ready",
    "wait_rows",
    "worker_env",
    "write_sidecar",
]


def worker_env(values: Mapping[str, Any], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """:func:`inspection_audit.procs.worker_env` with ``decision_method`` =
    :data:`TEST_DECISION_METHOD` unless ``values`` names one."""
    return _procs_worker_env({"decision_method": TEST_DECISION_METHOD, **values}, base)


def make_images(folder: Path, n: int, *, size: int = 40, seed: int = 0) -> list[Path]:
    """``n`` small grayscale PNGs with a random blob each (some variety for the maps)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    paths = []
    for i in range(n):
        base = rng.normal(0.5, 0.08, (size, size))
        cy, cx = rng.uniform(0.2 * size, 0.8 * size, 2)
        r = rng.uniform(0.06, 0.25) * size
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        img = np.clip(base + rng.choice([-0.4, 0.4]) * blob, 0, 1)
        path = folder / f"img-{i:03d}.png"
        Image.fromarray((img * 255).astype(np.uint8), mode="L").save(path)
        paths.append(path)
    return paths


def write_sidecar(
    checkpoint: Path, method: str, tau: float, engine: dict[str, Any] | None = None
) -> Path:
    """A hand-written calibration sidecar with ``tau`` for ``method`` (docs/design.md §3.7: <ckpt>.calibration.json)."""
    from worker.model.checkpoint import load_checkpoint

    version = load_checkpoint(checkpoint).model_version
    data = {
        "model_version": version,
        "split": "hand-written",
        "target_recall": 1.0,
        "engine": engine or {},
        "methods": {method: {"tau": float(tau)}},
        "fusion": None,
    }
    path = checkpoint.with_name(checkpoint.name + ".calibration.json")
    path.write_text(json.dumps(data, indent=2))
    return path


def engine_scores(checkpoint: Path, images: Sequence[Path], method: str) -> list[float]:
    """The decision scores the worker will compute, computed here (one image at a time)."""
    import torch

    from worker.engine.methods import REGISTRY
    from worker.engine.score import EngineConfig, ReliabilityEngine
    from worker.model.checkpoint import load_checkpoint
    from worker.model.preprocess import preprocess

    pm = load_checkpoint(checkpoint)
    engine = ReliabilityEngine.from_production_model(pm, EngineConfig())
    out = []
    for p in images:
        x = preprocess(p, pm.input_size, pm.in_channels)[None]
        with torch.no_grad():
            row = engine.score(x).rows()[0]
        out.append(float(REGISTRY.get(method).score(row)))  # type: ignore[arg-type]
    return out


def tau_between(scores: Sequence[float]) -> float:
    """A τ in the widest gap between sorted scores near the middle (some, not all, flagged)."""
    s = sorted(scores)
    n = len(s)
    best, tau = -1.0, s[n // 2]
    for i in range(max(1, n // 4), min(n - 1, 3 * n // 4) + 1):
        gap = s[i] - s[i - 1]
        if gap > best:
            best, tau = gap, (s[i] + s[i - 1]) / 2
    if best <= 0:
        raise AssertionError(f"scores have no gap to put tau in: {s}")
    return tau


def audit_rows(url: str, ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Every audit row (optionally only for ``ids``) as dicts: its columns, plus every scoring
    method's value (``scores``) and every other measurement (``details``) under its own name."""
    import sqlalchemy as sa

    from db.models import Audit
    from db.session import session_scope

    table = Audit.__table__
    stmt = sa.select(table)
    if ids is not None:
        stmt = stmt.where(table.c.inspection_id.in_(list(ids)))
    with session_scope(url) as session:
        rows = [dict(r) for r in session.execute(stmt).mappings()]
    for r in rows:
        for part in ("details", "scores"):
            for k, v in (r.get(part) or {}).items():
                r.setdefault(k, v)
        for k in ("energy", "iou_defect", "iou_ok", "iou_gap", "p_defect_adv", "iou_defect_adv"):
            r.setdefault(k, None)
        for k in ("iou_ok_adv", "iou_gap_adv", "flipped"):
            r.setdefault(k, None)
    return rows


def wait_rows(
    url: str,
    ids: Sequence[str],
    workers: Sequence[WorkerProc],
    timeout: float = 90.0,
) -> list[dict[str, Any]]:
    """Wait until every id in ``ids`` has an audit row; fail with the worker logs otherwise."""
    deadline = time.monotonic() + timeout
    want = set(ids)
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        rows = audit_rows(url, want)
        if {r["inspection_id"] for r in rows} >= want:
            return rows
        dead = [w for w in workers if w.proc.poll() is not None]
        if dead:
            raise AssertionError(
                f"worker {dead[0].name} exited with {dead[0].proc.returncode}:\n{dead[0].tail()}"
            )
        time.sleep(0.3)
    missing = sorted(want - {r["inspection_id"] for r in rows})
    raise AssertionError(
        f"{len(missing)} of {len(want)} rows missing after {timeout:.0f} s: {missing[:10]}\n"
        + "\n".join(w.tail(30) for w in workers)
    )
