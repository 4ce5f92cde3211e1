"""FAULT INJECTION FOR TESTS ONLY: never imported unless its environment variable is set.

``INSPECTION_AUDIT_TEST_FAULT_KILL_IN_ATTACK`` (comma-separated inspection ids): a pool process
that runs the engine on a batch holding one of these ids kills itself with SIGKILL inside the
FGSM step, as a native crash or the kernel's OOM killer would (tests/test_faults_loss.py sets
it in the worker's environment).

``INSPECTION_AUDIT_TEST_FAULT_HOLD_IN_ATTACK`` (``<ids>@<file>``): such a pool process waits
inside the FGSM step until ``<file>`` exists (at most 120 s), so that a test can cut the
database off while an attempt is open (tests/test_faults_cap.py).

Neither is a setting; never set them in production. :func:`worker.batch.fault_hook` loads this
module only when one of the variables is set.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

FAULT_KILL_IN_ATTACK_ENV = "INSPECTION_AUDIT_TEST_FAULT_KILL_IN_ATTACK"
FAULT_HOLD_IN_ATTACK_ENV = "INSPECTION_AUDIT_TEST_FAULT_HOLD_IN_ATTACK"

log = logging.getLogger("inspection_audit.worker")


@contextlib.contextmanager
def kill_in_attack(inspection_ids: Iterable[str]) -> Iterator[None]:
    """While active, SIGKILL this process inside FGSM when the batch holds a targeted id."""
    targets = {t for t in os.environ.get(FAULT_KILL_IN_ATTACK_ENV, "").split(",") if t}
    if not targets & set(inspection_ids):
        yield
        return
    import worker.engine.score as score_module
    from worker.engine import adversarial

    real_step = adversarial.fgsm_step

    def killing_fgsm_step(*args: Any, **kwargs: Any) -> Any:
        log.critical("FAULT INJECTION: pool process %d kills itself during FGSM", os.getpid())
        os.kill(os.getpid(), signal.SIGKILL)
        return real_step(*args, **kwargs)  # pragma: no cover - never reached

    score_module.fgsm_step = killing_fgsm_step  # type: ignore[attr-defined]
    try:
        yield
    finally:
        score_module.fgsm_step = real_step  # type: ignore[attr-defined]


def _targets(env: str) -> set[str]:
    return {t for t in os.environ.get(env, "").split("@", 1)[0].split(",") if t}


@contextlib.contextmanager
def _patched_fgsm(action: Callable[[], None]) -> Iterator[None]:
    import worker.engine.score as score_module
    from worker.engine import adversarial

    real_step = adversarial.fgsm_step

    def fgsm_step(*args: Any, **kwargs: Any) -> Any:
        action()
        return real_step(*args, **kwargs)

    score_module.fgsm_step = fgsm_step  # type: ignore[attr-defined]
    try:
        yield
    finally:
        score_module.fgsm_step = real_step  # type: ignore[attr-defined]


@contextlib.contextmanager
def hold_in_attack(inspection_ids: Iterable[str]) -> Iterator[None]:
    """While active, wait inside FGSM until the release file exists, when the batch holds a
    targeted id (``INSPECTION_AUDIT_TEST_FAULT_HOLD_IN_ATTACK=<ids>@<file>``)."""
    ids = set(inspection_ids)
    if not _targets(FAULT_HOLD_IN_ATTACK_ENV) & ids:
        yield
        return
    release = Path(os.environ[FAULT_HOLD_IN_ATTACK_ENV].split("@", 1)[1])

    def hold() -> None:
        log.critical("FAULT INJECTION: pool process %d holds in FGSM", os.getpid())
        deadline = time.monotonic() + 120
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        log.critical("FAULT INJECTION: pool process %d goes on", os.getpid())

    with _patched_fgsm(hold):
        yield


@contextlib.contextmanager
def any_fault(inspection_ids: Iterable[str]) -> Iterator[None]:
    """Every fault whose variable is set, for one engine call."""
    ids = list(inspection_ids)
    with contextlib.ExitStack() as stack:
        if os.environ.get(FAULT_KILL_IN_ATTACK_ENV):
            stack.enter_context(kill_in_attack(ids))
        if os.environ.get(FAULT_HOLD_IN_ATTACK_ENV):
            stack.enter_context(hold_in_attack(ids))
        yield
