"""``inspection-audit worker``: start a Celery worker that audits the queue.

One :class:`~inspection_audit.settings.Settings` is built from the environment and the
command's options, and the Celery app is built from it (:func:`worker.app.create_app`); nothing
is passed through ``os.environ``. The checkpoint and its calibration sidecar are validated
here, in the main process, on the CPU, before Celery starts: a missing or wrong checkpoint
stops the worker with one clear line and exit code 2. Each pool process then loads its own
copy lazily (:mod:`worker.runtime`).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import NoReturn

import click

LOG_FORMAT = "[%(asctime)s %(levelname)s %(processName)s/%(process)d] %(name)s: %(message)s"

EXIT_CONFIG = 2


def _fail(message: str) -> NoReturn:
    one_line = " ".join(message.split())
    click.echo(f"inspection-audit worker: cannot start: {one_line}", err=True)
    sys.exit(EXIT_CONFIG)


def check_database(url: str) -> str | None:
    """``None`` when the database at ``url`` is migrated to head; otherwise why not.

    An unreachable database is not a reason to refuse to start (workers retry); it is logged.
    """
    from db.migrate import current, head
    from db.session import dispose_engines

    log = logging.getLogger("inspection_audit.worker")
    try:
        rev, want = current(url), head()
    except Exception as exc:
        log.warning("database not reachable yet (%s: %s); starting anyway", type(exc).__name__, exc)
        return None
    finally:
        dispose_engines()
    if rev != want:
        from sqlalchemy.engine import make_url

        safe = make_url(url).render_as_string(hide_password=True)
        return (
            f"database {safe} is at revision {rev or 'none'}, this worker needs {want}: "
            "run `inspection-audit db upgrade`"
        )
    return None


@click.command("worker")
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(min=1),
    default=None,
    help="Pool processes (CPU). Default: 1. Ignored with --device cuda (one process per GPU).",
)
@click.option(
    "--queues", "-Q", default=None, help="Comma-separated queues to consume. Default: the setting."
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda", "auto"]),
    default=None,
    help="cpu: prefork pool; cuda: solo pool, one process per GPU; auto: cuda when available.",
)
@click.option("--loglevel", "-l", default="info", show_default=True)
@click.option("--hostname", "-n", default=None, help="Celery node name, e.g. w1@%h.")
@click.option(
    "--model",
    type=click.Path(path_type=Path),
    default=None,
    help="Checkpoint to audit with (default: INSPECTION_AUDIT_MODEL).",
)
@click.option(
    "--pool",
    type=click.Choice(["prefork", "solo"]),
    default=None,
    help="Override the pool (default: prefork on cpu, solo on cuda; cuda always runs solo).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Micro-batch size B.")
@click.option(
    "--batch-wait-ms", type=click.IntRange(min=0), default=None, help="Micro-batch wait T (ms)."
)
def worker(
    concurrency: int | None,
    queues: str | None,
    device: str | None,
    loglevel: str,
    hostname: str | None,
    model: Path | None,
    pool: str | None,
    batch_size: int | None,
    batch_wait_ms: int | None,
) -> None:
    """Start a worker: scores queued inspections and writes one audit row per image."""
    from inspection_audit.settings import Settings, pin_threads

    level = getattr(logging, loglevel.upper(), None)
    if not isinstance(level, int):
        raise click.BadParameter(f"unknown log level {loglevel!r}", param_hint="--loglevel")
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr, force=True)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    log = logging.getLogger("inspection_audit.worker")

    overrides: dict[str, object] = {
        "model": model.resolve() if model is not None else None,
        "device": device,
        "batch_size": batch_size,
        "batch_wait_ms": batch_wait_ms,
    }
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except Exception as exc:  # pydantic ValidationError: a bad INSPECTION_AUDIT_* value
        _fail(f"bad settings: {exc}")

    # Pool and device. CUDA does not survive fork: one solo-pool process per GPU.
    if settings.device == "auto":
        import torch

        resolved = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        resolved = settings.device
    if resolved == "cuda":
        if pool == "prefork" or concurrency not in (None, 1):
            log.warning(
                "--device cuda runs one solo-pool process per GPU (CUDA does not survive "
                "fork); ignoring --pool/--concurrency"
            )
        pool, n = "solo", 1
    elif pool == "solo":
        n = 1
    else:
        pool, n = "prefork", concurrency or 1
    settings = settings.model_copy(update={"device": resolved})

    # Threads: OMP/BLAS variables are inherited by the pool processes (pinned again after fork).
    pin_threads(settings.torch_threads)

    from worker.runtime import RuntimeConfigError, validate

    if resolved == "cuda":
        try:
            from worker.runtime import resolve_device

            resolve_device("cuda")
        except RuntimeConfigError as exc:
            _fail(str(exc))
    try:
        summary = validate(settings)
    except RuntimeConfigError as exc:
        _fail(str(exc))
    problem = check_database(settings.resolved_database_url)
    if problem:
        _fail(problem)
    log.info("%s", summary.describe())
    log.info(
        "device %s, pool %s x %d, batch %d / %d ms, prefetch %d per process",
        resolved,
        pool,
        n,
        settings.batch_size,
        settings.batch_wait_ms,
        max(settings.prefetch_multiplier, settings.batch_size),
    )

    from celery.utils.nodenames import default_nodename, host_format

    from worker.app import consumed_queues, create_app

    app = create_app(settings)
    w = app.Worker(
        hostname=host_format(default_nodename(hostname)),
        pool_cls=pool,
        concurrency=n,
        queues=queues or ",".join(consumed_queues(settings)),
        loglevel=level,
        optimization="fair",
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
        quiet=True,
    )
    w.start()
    sys.exit(w.exitcode or 0)
