"""Helpers for pipeline tests: real worker subprocesses, synthetic images, waiting for rows.

Workers run as ``python -m inspection_audit.cli worker ...`` in their own process group (so a
stop reaches the prefork pool processes too), with an environment that holds only the
``INSPECTION_AUDIT_*`` variables the test sets, and the test's folder as working directory (so
no ``.env`` of the repository is read). Always stop them in ``finally`` (:func:`stop_workers`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

READY = "inspection-audit worker ready"


@dataclass
class WorkerProc:
    """A worker subprocess and its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.text().splitlines()[-n:])


def worker_env(values: dict[str, Any]) -> dict[str, str]:
    """The process environment minus every ``INSPECTION_AUDIT_*``, plus ``values`` (prefixed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTION_AUDIT_")}
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        env[f"INSPECTION_AUDIT_{key.upper()}"] = str(value)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "inspection_audit.cli", *args]


def start_worker(
    env: dict[str, str],
    name: str,
    cwd: Path,
    *,
    concurrency: int = 1,
    extra: Sequence[str] = (),
) -> WorkerProc:
    """Start ``inspection-audit worker -n <name>@%h -c <concurrency>``; output goes to a log."""
    log = Path(cwd) / f"worker-{name}.log"
    fh = log.open("wb")
    try:
        proc = subprocess.Popen(
            cli_command("worker", "-n", f"{name}@%h", "-c", str(concurrency), "-l", "info", *extra),
            env=env,
            cwd=cwd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        fh.close()
    return WorkerProc(name, proc, log)


def wait_ready(workers: Iterable[WorkerProc], timeout: float = 90.0) -> None:
    """Wait until every worker logged that it is ready; fail with its log if it exits first."""
    pending = list(workers)
    deadline = time.monotonic() + timeout
    while pending:
        for w in list(pending):
            if READY in w.text():
                pending.remove(w)
            elif w.proc.poll() is not None:
                raise AssertionError(
                    f"worker {w.name} exited with {w.proc.returncode} before it was ready:\n"
                    f"{w.tail()}"
                )
        if not pending:
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"worker(s) {[w.name for w in pending]} not ready after {timeout:.0f} s:\n"
                + "\n".join(w.tail() for w in pending)
            )
        time.sleep(0.2)


def stop_workers(workers: Iterable[WorkerProc], timeout: float = 20.0) -> None:
    """Warm shutdown (SIGTERM to each worker's process group), SIGKILL after ``timeout``."""
    workers = list(workers)
    for w in workers:
        if w.proc.poll() is None:
            _signal_group(w.proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for w in workers:
        try:
            w.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(w.proc, signal.SIGKILL)
            w.proc.wait(10)
        # Pool processes that outlived their parent (they should not).
        _signal_group(w.proc, signal.SIGKILL)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    # the process group this test created (start_new_session)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


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
    """A hand-written calibration sidecar with ``tau`` for ``method`` (DESIGN: <ckpt>.calibration.json)."""
    from worker.checkpoint import load_checkpoint

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

    from worker.checkpoint import load_checkpoint
    from worker.engine.calibration import method_score
    from worker.engine.score import EngineConfig, ReliabilityEngine
    from worker.preprocess import preprocess

    pm = load_checkpoint(checkpoint)
    engine = ReliabilityEngine.from_production_model(pm, EngineConfig())
    out = []
    for p in images:
        x = preprocess(p, pm.input_size, pm.in_channels)[None]
        with torch.no_grad():
            row = engine.score(x).rows()[0]
        out.append(float(method_score(row, method)))
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
    """Every audit row (optionally only for ``ids``) as dicts."""
    import sqlalchemy as sa

    from db.models import Audit
    from db.session import session_scope

    table = Audit.__table__
    stmt = sa.select(table)
    if ids is not None:
        stmt = stmt.where(table.c.inspection_id.in_(list(ids)))
    with session_scope(url) as session:
        return [dict(r) for r in session.execute(stmt).mappings()]


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
