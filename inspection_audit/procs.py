"""Worker subprocesses: start, wait until ready, stop (one copy for the demo, bench and tests).

A worker runs as ``python -m inspection_audit.cli worker …`` in its own process group (so a
stop reaches its prefork pool processes too), with its output in a log file, and an
environment holding only the ``INSPECTION_AUDIT_*`` variables the caller gives
(:func:`worker_env`): a worker never inherits a stray setting from its parent.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The line a worker logs once it consumes (see :func:`worker.app.create_app`).
READY = "inspection-audit worker ready"

#: OpenMP/BLAS thread variables pinned to 1 in a worker's environment (docs/design.md §7).
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class WorkerFailed(RuntimeError):
    """A worker exited, or did not become ready in time; the message holds its log's tail."""


@dataclass
class WorkerProc:
    """A worker subprocess and its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        """The whole log so far ('' before the first line)."""
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, n: int = 60) -> str:
        """The last ``n`` lines of the log."""
        return "\n".join(self.text().splitlines()[-n:])


def worker_env(values: Mapping[str, Any], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) minus every ``INSPECTION_AUDIT_*``, plus
    ``values`` as ``INSPECTION_AUDIT_<KEY>`` (lists comma-joined, ``None`` skipped), with the
    OpenMP/BLAS threads pinned to 1 unless set and Python unbuffered."""
    source = os.environ if base is None else base
    env = {k: v for k, v in source.items() if not k.startswith("INSPECTION_AUDIT_")}
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        env[f"INSPECTION_AUDIT_{key.upper()}"] = str(value)
    for var in THREAD_VARS:
        env.setdefault(var, "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def cli_command(*args: str) -> list[str]:
    """``[python, -m, inspection_audit.cli, *args]`` with this interpreter."""
    return [sys.executable, "-m", "inspection_audit.cli", *args]


def start_worker(
    env: Mapping[str, str],
    name: str,
    cwd: Path,
    *,
    concurrency: int = 1,
    extra: Sequence[str] = (),
    log_dir: Path | None = None,
) -> WorkerProc:
    """Start ``inspection-audit worker -n <name>@%h -c <concurrency> -l info [extra]``.

    Output goes to ``<log_dir or cwd>/worker-<name>.log``. The process gets its own session
    (process group), so :func:`stop_workers` reaches the pool processes too.
    """
    log = Path(log_dir or cwd) / f"worker-{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            cli_command("worker", "-n", f"{name}@%h", "-c", str(concurrency), "-l", "info", *extra),
            env=dict(env),
            cwd=cwd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return WorkerProc(name, proc, log)


def check_alive(workers: Iterable[WorkerProc]) -> None:
    """Raise :class:`WorkerFailed` (with its log) when a worker has exited."""
    for w in workers:
        if w.proc.poll() is not None:
            raise WorkerFailed(f"worker {w.name} exited with {w.proc.returncode}:\n{w.tail()}")


def wait_ready(workers: Iterable[WorkerProc], timeout: float = 90.0) -> None:
    """Wait until every worker logged :data:`READY`.

    Raises:
        WorkerFailed: a worker exited first, or one is not ready after ``timeout`` seconds.
    """
    pending = list(workers)
    deadline = time.monotonic() + timeout
    while pending:
        for w in list(pending):
            if READY in w.text():
                pending.remove(w)
            elif w.proc.poll() is not None:
                raise WorkerFailed(
                    f"worker {w.name} exited with {w.proc.returncode} before it was ready:\n"
                    f"{w.tail()}"
                )
        if not pending:
            return
        if time.monotonic() > deadline:
            raise WorkerFailed(
                f"worker(s) {[w.name for w in pending]} not ready after {timeout:.0f} s:\n"
                + "\n".join(w.tail() for w in pending)
            )
        time.sleep(0.2)


def wait_for(
    condition: Callable[[], bool],
    timeout: float,
    workers: Iterable[WorkerProc] = (),
    interval: float = 0.2,
) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds pass (False).

    Raises:
        WorkerFailed: one of ``workers`` exited meanwhile.
    """
    workers = list(workers)
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        check_alive(workers)
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop_workers(workers: Iterable[WorkerProc], timeout: float = 30.0) -> None:
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
