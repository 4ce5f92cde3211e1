"""Is the audit keeping up? The facts behind ``GET /healthz``, ``/metrics`` and
``inspection-audit health``.

A worker that answers pings but consumes nothing shows up as messages *waiting* in the broker
while *no audit row has been written* for longer than ``Settings.health_stall_s``:
:func:`check` calls that **stalled**.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa

from inspection_audit.settings import Settings


@dataclass
class Health:
    """One look at the database and the broker.

    Attributes:
        database_error / broker_error: None when it answered, else why not.
        waiting: messages waiting in the broker (None: broker down).
        last_write: when the newest audit row was written or updated (None: no row yet).
        stall_s: the threshold used.
    """

    database_error: str | None
    broker_error: str | None
    waiting: int | None
    last_write: datetime | None
    stall_s: float
    checked_at: datetime

    @property
    def idle_s(self) -> float | None:
        """Seconds since the last row was written (None: never)."""
        if self.last_write is None:
            return None
        return max(0.0, (self.checked_at - self.last_write).total_seconds())

    @property
    def stalled(self) -> bool:
        """Messages wait and no row was written for longer than ``stall_s`` (or ever)."""
        if not self.waiting:
            return False
        idle = self.idle_s
        return idle is None or idle > self.stall_s

    @property
    def ok(self) -> bool:
        return self.database_error is None and self.broker_error is None and not self.stalled

    def describe(self) -> str:
        """One line for a person."""
        if self.database_error:
            return f"database: {self.database_error}"
        if self.broker_error:
            return f"broker: {self.broker_error}"
        idle = "never" if self.idle_s is None else f"{self.idle_s:.0f} s ago"
        state = "STALLED" if self.stalled else "ok"
        return (
            f"{state}: {self.waiting} message(s) waiting, last audit row written {idle} "
            f"(stall threshold {self.stall_s:.0f} s)"
        )


def last_write(url: str) -> datetime | None:
    """When the newest audit row was written or updated (None: no row)."""
    from db.models import Audit
    from db.session import session_scope

    with session_scope(url) as session:
        value = session.execute(sa.select(sa.func.max(Audit.__table__.c.updated_at))).scalar()
    if value is None:
        return None
    if isinstance(value, str):  # SQLite hands back text for an aggregate
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def database_error(url: str) -> str | None:
    """None when the database answers ``SELECT 1``, else why not."""
    from db.session import session_scope

    try:
        with session_scope(url) as session:
            session.execute(sa.text("SELECT 1"))
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    return None


def check(settings: Settings, stall_s: float | None = None) -> Health:
    """Look at the database and the broker once (no retries)."""
    from inspection_audit.web.broker import BrokerUnavailable, queue_depth

    url = settings.resolved_database_url
    stall = settings.health_stall_s if stall_s is None else stall_s
    db_err = database_error(url)
    written = None
    if db_err is None:
        try:
            written = last_write(url)
        except Exception as exc:  # not migrated
            db_err = f"cannot read audits ({type(exc).__name__}); run `inspection-audit db upgrade`"
    try:
        waiting: int | None = queue_depth(settings)
        broker_err = None
    except BrokerUnavailable as exc:
        waiting, broker_err = None, str(exc)
    return Health(db_err, broker_err, waiting, written, stall, datetime.now(UTC))
