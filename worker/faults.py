"""FAULT INJECTION FOR TESTS ONLY: never imported unless its environment variable is set.

``INSPECTION_AUDIT_TEST_FAULT_KILL_IN_ATTACK`` (comma-separated inspection ids): a pool process
that runs the engine on a batch holding one of these ids kills itself with SIGKILL inside the
FGSM step, as a native crash or the kernel's OOM killer would (tests/test_faults_loss.py sets
it in the worker's environment). It is not a setting; never set it in production.
:func:`worker.batch.fault_hook` loads this module only when the variable is set.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterable, Iterator
from typing import Any

FAULT_KILL_IN_ATTACK_ENV = "INSPECTION_AUDIT_TEST_FAULT_KILL_IN_ATTACK"

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
