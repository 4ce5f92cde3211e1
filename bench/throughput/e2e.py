"""(e) end to end: producer → Redis → Celery worker subprocesses → PostgreSQL, with memory peaks.

Workers are started and stopped with :mod:`inspection_audit.procs`; each configuration gets a
throwaway database from :mod:`db.testing` and a fresh queue on Redis, both removed afterwards.
:class:`MemoryMonitor` samples each worker's process tree meanwhile.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.throughput.config import BenchConfig
from inspection_audit.procs import (
    WorkerProc,
    start_worker,
    stop_workers,
    wait_for,
    wait_ready,
    worker_env,
)

#: Database name prefix; :func:`db.testing.create_database` adds random hex.
DB_PREFIX = "inspection_audit_bench_"


@dataclass
class MemoryPeaks:
    """One worker's memory peaks so far, in MB (decimal: 1 MB = 1e6 bytes).

    Attributes:
        rss_tree_mb: RSS summed over the worker's process tree (main + pool processes).
        rss_proc_mb: RSS of the largest single process of the tree.
        pss_tree_mb: PSS summed over the tree (shared pages split between their processes).
        pids: every pid seen in the tree.
    """

    rss_tree_mb: float = 0.0
    rss_proc_mb: float = 0.0
    pss_tree_mb: float = 0.0
    pids: set[int] = field(default_factory=set)


class MemoryMonitor(threading.Thread):
    """Samples each worker's process tree (psutil): RSS every ``interval`` s, PSS every 10th.

    The peaks are in :attr:`peaks`, keyed by :attr:`WorkerProc.name`.
    """

    def __init__(self, workers: Sequence[WorkerProc], interval: float = 0.2) -> None:
        super().__init__(daemon=True, name="bench-memory-monitor")
        self.workers = list(workers)
        self.interval = interval
        self.peaks: dict[str, MemoryPeaks] = {w.name: MemoryPeaks() for w in self.workers}
        self._halt = threading.Event()

    def stop(self) -> None:
        """Stop sampling (waits up to 5 s for the thread)."""
        self._halt.set()
        self.join(timeout=5)

    def sample(self, with_pss: bool) -> None:
        """Read every worker's tree once and raise the peaks (PSS too when ``with_pss``)."""
        import psutil

        for w in self.workers:
            peak = self.peaks[w.name]
            try:
                root = psutil.Process(w.proc.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            rss_total, rss_max, pss_total = 0, 0, 0
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    if with_pss:
                        pss_total += getattr(p.memory_full_info(), "pss", 0)
                except psutil.Error:
                    continue
                peak.pids.add(p.pid)
                rss_total += rss
                rss_max = max(rss_max, rss)
            peak.rss_tree_mb = max(peak.rss_tree_mb, rss_total / 1e6)
            peak.rss_proc_mb = max(peak.rss_proc_mb, rss_max / 1e6)
            if with_pss:
                peak.pss_tree_mb = max(peak.pss_tree_mb, pss_total / 1e6)

    def run(self) -> None:
        """The sampling loop (the thread's body)."""
        i = 0
        while not self._halt.is_set():
            self.sample(with_pss=i % 10 == 0)
            i += 1
            self._halt.wait(self.interval)


@dataclass
class E2EContext:
    """Servers and files the end-to-end runs share.

    Attributes:
        redis_url: the broker.
        pg_admin_url: a PostgreSQL database to CREATE/DROP the run's databases from.
        checkpoint: the model file the workers load.
        image_root: the folder the images lie under (``INSPECTION_AUDIT_IMAGE_ROOTS``).
        images: image files the messages point at (cycled).
        workdir: the workers' working directory (logs, ``home``).
    """

    redis_url: str
    pg_admin_url: str
    checkpoint: Path
    image_root: Path
    images: list[Path]
    workdir: Path


def cleanup_queue(redis_url: str, queue: str) -> None:
    """Delete the benchmark's queue and kombu's binding keys for it (names hold a random tag)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = [queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"]
        keys += [k for k in client.scan_iter(match=f"*{queue}*") if k not in keys]
        client.delete(*keys)
    finally:
        client.close()


def _rows(url: str, prefix: str) -> list[dict[str, Any]]:
    """The audit rows of inspections whose id starts with ``prefix`` (timing columns only)."""
    import sqlalchemy as sa

    from db.models import Audit
    from db.session import session_scope

    t = Audit.__table__
    stmt = sa.select(
        t.c.inspection_id, t.c.status, t.c.error, t.c.worker_host, t.c.decode_ms, t.c.score_ms
    ).where(t.c.inspection_id.like(f"{prefix}%"))
    with session_scope(url) as session:
        return [dict(r) for r in session.execute(stmt).mappings()]


def _count_rows(url: str, prefix: str) -> int:
    """How many audit rows exist for inspections whose id starts with ``prefix``."""
    import sqlalchemy as sa

    from db.models import Audit
    from db.session import session_scope

    t = Audit.__table__
    stmt = sa.select(sa.func.count()).select_from(t).where(t.c.inspection_id.like(f"{prefix}%"))
    with session_scope(url) as session:
        return int(session.execute(stmt).scalar_one())


def _messages(prefix: str, images: Sequence[Path], n: int) -> list[dict[str, Any]]:
    """``n`` wire-form messages ``<prefix>00000`` …, all ``prediction="ok"`` (full audit)."""
    now = datetime.now(UTC).isoformat()
    return [
        {
            "inspection_id": f"{prefix}{i:05d}",
            "image_path": str(images[i % len(images)]),
            "prediction": "ok",  # every image gets the full audit
            "score": 0.1,
            "line": "bench",
            "station": "bench",
            "captured_at": now,
        }
        for i in range(n)
    ]


def wait_rows(
    url: str,
    prefix: str,
    n: int,
    workers: Sequence[WorkerProc],
    timeout: float,
    on_count: Callable[[int], None] | None = None,
    poll: float = 0.1,
) -> float:
    """Poll every ``poll`` s until ``n`` rows with ``prefix`` exist.

    Returns the ``time.perf_counter()`` reading taken right after the count that reached ``n``.
    ``on_count`` is called whenever the count changes.

    Raises:
        inspection_audit.procs.WorkerFailed: a worker exited meanwhile.
        RuntimeError: fewer than ``n`` rows after ``timeout`` seconds (with the workers' logs).
    """
    seen = {"count": -1, "at": 0.0}

    def reached() -> bool:
        count = _count_rows(url, prefix)
        seen["at"] = time.perf_counter()
        if count != seen["count"] and on_count is not None:
            on_count(count)
        seen["count"] = count
        return count >= n

    if not wait_for(reached, timeout, workers, interval=poll):
        raise RuntimeError(
            f"{seen['count']} of {n} rows after {timeout:.0f} s\n"
            + "\n".join(w.tail(20) for w in workers)
        )
    return seen["at"]


def median_or_none(values: Sequence[Any]) -> float | None:
    """Median of the values that are not ``None`` (``None`` when there are none)."""
    vals = [float(v) for v in values if v is not None]
    return statistics.median(vals) if vals else None


def run_e2e(
    ctx: E2EContext,
    b: int,
    n_workers: int,
    cfg: BenchConfig,
    *,
    on_status: Callable[[str], None] | None = None,
    ready_timeout: float = 300.0,
) -> dict[str, Any]:
    """(e) at batch size ``b`` with ``n_workers`` worker processes, in images per second.

    Creates and migrates a database, starts the workers (``--concurrency 1``, one torch thread,
    FGSM, no overlays) on a fresh queue, warms up until every worker's pool process has scored,
    then runs ``cfg.e2e_reps`` repetitions of ``cfg.e2e_images`` images: each is timed from the
    ``enqueue_many`` call to the last audit row visible (polled every 0.1 s). Everything is
    removed afterwards, even on failure.

    Returns ``batch_size``, ``workers``, ``images_per_rep``, ``images_per_s`` (median),
    ``reps_images_per_s``, ``reps`` (per-repetition details), ``errors`` (rows with status
    ``error``), ``warmup_rounds``, per-worker ``peak_rss_tree_mb``,
    ``peak_rss_pool_process_mb``, ``peak_pss_tree_mb`` (MB), and the medians of the rows'
    ``decode_ms``/``score_ms`` (the worker's own timers, ms per image).
    """
    from db.migrate import upgrade
    from db.testing import create_database, drop_database
    from inspection_audit.settings import Settings
    from producer.api import enqueue_many, reset_apps

    def status(msg: str) -> None:
        if on_status is not None:
            on_status(f"(e) B={b}, {n_workers} worker(s): {msg}")

    tag = uuid.uuid4().hex[:10]
    queue = f"inspection-audit-bench-{tag}"
    status("creating the database")
    url = create_database(ctx.pg_admin_url, prefix=DB_PREFIX)
    workers: list[WorkerProc] = []
    monitor: MemoryMonitor | None = None
    home = ctx.workdir / f"home-{tag}"
    home.mkdir(parents=True, exist_ok=True)
    try:
        upgrade(url)
        env = worker_env(
            {
                "broker_url": ctx.redis_url,
                "database_url": url,
                "model": ctx.checkpoint,
                "image_roots": ctx.image_root,
                "queue": queue,
                "batch_size": b,
                "torch_threads": 1,
                "device": "cpu",
                "attack": "fgsm",
                # (e) times the audit (c) through the pipeline: the paper's score decides, so
                # no second opinion is needed (the default, snapshot_mean, reads snapshots)
                "decision_method": "iou_gap_adv",
                "home": home,
                "save_overlays": "false",
            }
        )
        status("starting worker(s)")
        for i in range(n_workers):
            workers.append(start_worker(env, f"bench{i + 1}-{tag}", ctx.workdir, concurrency=1))
        monitor = MemoryMonitor(workers)
        monitor.start()
        wait_ready(workers, ready_timeout)
        settings = Settings(
            broker_url=ctx.redis_url,
            database_url=url,
            image_roots=[ctx.image_root],
            queue=queue,
            batch_size=b,
        )
        # Warm-up: until every worker's pool process has scored (loaded its model).
        warm_rounds = 0
        while True:
            warm_rounds += 1
            prefix = f"warm{warm_rounds}-"
            n_warm = 2 * b * n_workers
            status(f"warm-up round {warm_rounds} ({n_warm} images)")
            enqueue_many(_messages(prefix, ctx.images, n_warm), settings=settings)
            wait_rows(url, prefix, n_warm, workers, timeout=600)
            hosts = {r["worker_host"] for r in _rows(url, "warm")}
            pids = {int(h.rsplit(":", 1)[1]) for h in hosts if h and ":" in h}
            if all(monitor.peaks[w.name].pids & pids for w in workers) or warm_rounds >= 4:
                break
        reps: list[dict[str, Any]] = []
        n = cfg.e2e_images
        for rep in range(cfg.e2e_reps):
            prefix = f"run{rep}-"
            msgs = _messages(prefix, ctx.images, n)
            status(f"rep {rep + 1}/{cfg.e2e_reps}: enqueueing {n} images")
            t0 = time.perf_counter()
            enqueue_many(msgs, settings=settings)
            t_enq = time.perf_counter()

            def progress(c: int, rep: int = rep) -> None:
                status(f"rep {rep + 1}/{cfg.e2e_reps}: {c}/{n} rows")

            t_end = wait_rows(
                url, prefix, n, workers, timeout=max(600.0, 5.0 * n), on_count=progress
            )
            rows = _rows(url, prefix)
            errors = [r for r in rows if r["status"] != "done"]
            by_host: dict[str, int] = {}
            for r in rows:
                by_host[str(r["worker_host"])] = by_host.get(str(r["worker_host"]), 0) + 1
            reps.append(
                {
                    "images_per_s": n / (t_end - t0),
                    "seconds": t_end - t0,
                    "enqueue_s": t_enq - t0,
                    "errors": len(errors),
                    "first_error": errors[0]["error"] if errors else None,
                    "rows_per_worker_process": by_host,
                    "median_decode_ms": median_or_none([r["decode_ms"] for r in rows]),
                    "median_score_ms": median_or_none([r["score_ms"] for r in rows]),
                }
            )
        monitor.sample(with_pss=True)
        rates = [r["images_per_s"] for r in reps]
        peaks = [monitor.peaks[w.name] for w in workers]
        return {
            "batch_size": b,
            "workers": n_workers,
            "images_per_rep": n,
            "images_per_s": statistics.median(rates),
            "reps_images_per_s": rates,
            "reps": reps,
            "errors": sum(r["errors"] for r in reps),
            "warmup_rounds": warm_rounds,
            "peak_rss_tree_mb": [round(p.rss_tree_mb, 1) for p in peaks],
            "peak_rss_pool_process_mb": [round(p.rss_proc_mb, 1) for p in peaks],
            "peak_pss_tree_mb": [round(p.pss_tree_mb, 1) for p in peaks],
            "median_decode_ms": median_or_none([r["median_decode_ms"] for r in reps]),
            "median_score_ms": median_or_none([r["median_score_ms"] for r in reps]),
        }
    finally:
        status("stopping worker(s)")
        # Every step runs even when an earlier one fails, and none masks the real error.
        cleanup: list[tuple[str, Callable[[], None]]] = [
            ("stop the memory monitor", monitor.stop if monitor is not None else lambda: None),
            ("stop the workers", lambda: stop_workers(workers)),
            ("close the producer", reset_apps),
            (f"delete queue {queue}", lambda: cleanup_queue(ctx.redis_url, queue)),
            (f"drop database {url}", lambda: drop_database(url, ctx.pg_admin_url)),
        ]
        for what, fn in cleanup:
            try:
                fn()
            except Exception as exc:  # pragma: no cover - best effort, reported
                print(f"warning: could not {what}: {type(exc).__name__}: {exc}", file=sys.stderr)
