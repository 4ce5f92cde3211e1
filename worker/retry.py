"""Database retries for the worker (tenacity), and the fault classification they rest on.

A transaction that fails with a *transient* database fault (lost connection, server down,
lock timeout) is run again with exponential backoff and jitter, ``Settings.task_max_retries``
times at most, each wait capped at ``Settings.retry_backoff_max_s``; then
:class:`DatabaseUnavailable` says what was being done and why it failed. Anything else (a
constraint violation, a bug) is raised at once, unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random_exponential,
)

from inspection_audit.settings import Settings

log = logging.getLogger("inspection_audit.worker")

T = TypeVar("T")

#: The first backoff's upper bound, in seconds (then 2x per retry, up to the cap).
BACKOFF_BASE_S = 0.5


class DatabaseUnavailable(RuntimeError):
    """The database kept failing after every retry."""


def is_transient_db_error(exc: BaseException) -> bool:
    """A database fault worth retrying: lost connection, server down, lock timeout."""
    from sqlalchemy import exc as sa_exc

    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(
        exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)
    ) or (isinstance(exc, sa_exc.DBAPIError) and isinstance(exc.orig, ConnectionError))


def one_line(exc: BaseException, limit: int = 500) -> str:
    """``str(exc)`` on one line, at most ``limit`` characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def with_db_retries(fn: Callable[[], T], what: str, s: Settings) -> T:
    """Run ``fn`` (one whole transaction), retrying transient database faults with backoff.

    Waits are ``uniform(0.5, 1) · min(cap, 0.5 · 2^i)`` seconds, ``i`` the retry number (0 for
    the first), ``cap = s.retry_backoff_max_s``: tenacity's exponential wait (half of it) plus
    its random exponential wait (the other half, jittered), so waits grow and never collide.

    Raises:
        DatabaseUnavailable: still failing after ``s.task_max_retries`` retries.
        Exception: a non-transient error from ``fn``, unchanged.
    """
    retries = s.task_max_retries
    half_cap = float(s.retry_backoff_max_s) / 2

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "%s: database fault (%s: %s); retry %d/%d in %.1f s",
            what,
            type(exc).__name__,
            one_line(exc) if exc else "",
            state.attempt_number,
            retries,
            state.next_action.sleep if state.next_action else 0.0,
        )

    retrying = Retrying(
        stop=stop_after_attempt(retries + 1),
        wait=wait_exponential(multiplier=BACKOFF_BASE_S / 2, max=half_cap)
        + wait_random_exponential(multiplier=BACKOFF_BASE_S / 2, max=half_cap),
        retry=retry_if_exception(is_transient_db_error),
        before_sleep=before_sleep,
        sleep=lambda seconds: time.sleep(seconds),
        reraise=False,
    )
    try:
        return retrying(fn)
    except RetryError as err:
        exc = err.last_attempt.exception()
        assert exc is not None
        raise DatabaseUnavailable(
            f"{what}: database still failing after {retries} retries: "
            f"{type(exc).__name__}: {one_line(exc)}"
        ) from exc
