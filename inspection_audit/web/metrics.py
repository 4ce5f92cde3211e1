"""``GET /metrics``: Prometheus text, read from the database and the broker at scrape time.

A custom collector (:class:`AuditCollector`) runs a few aggregate queries per scrape, so every
count equals the rows in the database at that moment, whichever process wrote them:

=================================================  ===============================================
``inspection_audit_audits{status}``                audit rows by status (``done``, ``error``)
``inspection_audit_flagged``                       done rows flagged as suspected false negatives
``inspection_audit_verdicts{verdict}``             inspections by their newest verdict
``inspection_audit_review_queue``                  flagged rows without a verdict
``inspection_audit_queue_messages{queue}``         messages waiting in the broker
``inspection_audit_oldest_waiting_age_seconds``    now − capture time of the oldest waiting message
``inspection_audit_capture_to_score_seconds``      histogram: audit row written − capture time (all rows)
``inspection_audit_rows_written_last_minute``      audit rows created in the last 60 s
``inspection_audit_last_write_age_seconds``        now − newest audit row's update time
``inspection_audit_up{component}``                 1 when the database / broker answered
=================================================  ===============================================
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from inspection_audit.settings import Settings

#: Upper bounds (seconds) of the capture-to-score histogram.
LAG_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 86400.0)


def _reliability_families(url: str) -> Iterator[Metric]:
    """Dead letters (per stage) and the producer's outbox: entries overdue for reconcile
    (queued longer than ``Settings.reconcile_after_s`` with no audit row) and resends."""
    from datetime import timedelta

    from db.repository import dead_letter_counts_by_stage, outbox_counts, queued_without_audit
    from db.session import session_scope
    from inspection_audit.settings import get_settings

    after = timedelta(seconds=get_settings().reconcile_after_s)
    with session_scope(url) as session:
        stages = dead_letter_counts_by_stage(session)
        overdue = queued_without_audit(session, after)
        outbox = outbox_counts(session)
    dead = GaugeMetricFamily(
        "inspection_audit_dead_letters",
        "Messages taken off the queue that could not be recorded under any inspection "
        "(table dead_letters), per stage.",
        labels=["stage"],
    )
    for stage in ("transport", "envelope", "message", "broker", "worker"):
        dead.add_metric([stage], stages.get(stage, 0))
    yield dead
    g = GaugeMetricFamily(
        "inspection_audit_queued_without_audit",
        "Outbox entries queued longer than the reconcile age with no audit row "
        "(what `inspection-audit reconcile` would send again).",
    )
    g.add_metric([], overdue)
    yield g
    o = GaugeMetricFamily(
        "inspection_audit_outbox", "The producer's outbox, by state.", labels=["state"]
    )
    for key in ("queued", "pending", "never_sent", "resent", "resends"):
        o.add_metric([key], outbox.get(key, 0))
    yield o


#: Extra families called at every scrape; each takes the database URL and yields metric
#: families (the dead letters and the outbox of docs/reliability.md).
EXTRA_FAMILIES: list[Callable[[str], Iterator[Metric]]] = [_reliability_families]


def _seconds_between(session: Any, later: Any, earlier: Any) -> Any:
    """``later − earlier`` in seconds, on either dialect."""
    if session.get_bind().dialect.name == "postgresql":
        return sa.func.extract("epoch", later - earlier)
    return (sa.func.julianday(later) - sa.func.julianday(earlier)) * 86400.0


#: Rows older than this are "settled": their part of the lag histogram is kept per process and
#: only newer rows are read at each scrape (a worker's transaction lasts seconds, not minutes).
SETTLE_S = 300.0


@dataclass
class _LagTotals:
    cutoff: datetime | None = None  # rows created before it are in `buckets`/`count`/`total`
    buckets: list[int] = field(default_factory=lambda: [0] * len(LAG_BUCKETS))
    count: int = 0
    total: float = 0.0


_LAG_CACHE: dict[str, _LagTotals] = {}
_LAG_LOCK = threading.Lock()


def _lag_rows(
    session: Any, lo: datetime | None, hi: datetime | None
) -> tuple[list[int], int, float]:
    """Cumulative bucket counts, count and sum of the capture-to-row lag of the audit rows
    created in ``[lo, hi)`` (open ends: None)."""
    from db.models import Audit, Inspection, UTCDateTime

    a = Audit.__table__.c
    i = Inspection.__table__.c
    lag = _seconds_between(session, a.created_at, i.captured_at)
    where = []
    if lo is not None:
        where.append(a.created_at >= sa.literal(lo, UTCDateTime()))
    if hi is not None:
        where.append(a.created_at < sa.literal(hi, UTCDateTime()))
    row = session.execute(
        sa.select(
            *[sa.func.count().filter(lag <= b) for b in LAG_BUCKETS],
            sa.func.count(),
            sa.func.coalesce(sa.func.sum(lag), 0.0),
        )
        .select_from(Audit.__table__.join(Inspection.__table__, i.inspection_id == a.inspection_id))
        .where(*where)
    ).one()
    n = len(LAG_BUCKETS)
    return [int(v) for v in row[:n]], int(row[n]), float(row[n + 1] or 0.0)


def lag_histogram(session: Any, url: str, now: datetime) -> tuple[list[int], int, float]:
    """The lag histogram of every audit row: the settled rows' totals kept per process and
    extended to ``now − SETTLE_S``, plus the newer rows read live. Exact at every scrape."""
    cutoff = now - timedelta(seconds=SETTLE_S)
    with _LAG_LOCK:
        cached = _LAG_CACHE.setdefault(url, _LagTotals())
        if cached.cutoff is None or cutoff > cached.cutoff:
            b, c, t = _lag_rows(session, cached.cutoff, cutoff)
            cached.buckets = [x + y for x, y in zip(cached.buckets, b, strict=True)]
            cached.count += c
            cached.total += t
            cached.cutoff = cutoff
        settled = (list(cached.buckets), cached.count, cached.total, cached.cutoff)
    b, c, t = _lag_rows(session, settled[3], None)
    return [x + y for x, y in zip(settled[0], b, strict=True)], settled[1] + c, settled[2] + t


def database_families(session: Any, now: datetime, url: str = "") -> list[Metric]:
    """The database's families (one transaction), each from an index of migration 0005 or the
    status index, except the settled part of the lag histogram (see :func:`lag_histogram`)."""
    from db.models import Audit, UTCDateTime
    from inspection_audit.web.queries import QueueFilter, _latest_reviews, queue_count

    a = Audit.__table__.c
    by_status: dict[str, int] = {"done": 0, "error": 0}
    flagged = 0
    for status, suspect, n in session.execute(
        sa.select(a.status, a.suspected_false_negative, sa.func.count()).group_by(
            a.status, a.suspected_false_negative
        )
    ):
        by_status[status] = by_status.get(status, 0) + int(n)
        if status == "done" and suspect:
            flagged += int(n)
    minute = session.execute(
        sa.select(sa.func.count()).where(
            a.created_at >= sa.literal(now - timedelta(seconds=60), UTCDateTime())
        )
    ).scalar_one()
    newest = session.execute(sa.select(sa.func.max(a.updated_at))).scalar()
    out: list[Metric] = []
    g = GaugeMetricFamily("inspection_audit_audits", "Audit rows by status.", labels=["status"])
    for status in sorted(by_status):
        g.add_metric([status], by_status[status])
    out.append(g)
    out.append(
        GaugeMetricFamily(
            "inspection_audit_flagged",
            "Done audit rows flagged as suspected false negatives.",
            value=flagged,
        )
    )
    latest = _latest_reviews()
    counts = dict(
        session.execute(
            sa.select(latest.c.verdict, sa.func.count()).group_by(latest.c.verdict)
        ).all()
    )
    v = GaugeMetricFamily(
        "inspection_audit_verdicts", "Inspections by their newest verdict.", labels=["verdict"]
    )
    for verdict in ("confirmed_defect", "cleared"):
        v.add_metric([verdict], int(counts.get(verdict, 0)))
    out.append(v)
    out.append(
        GaugeMetricFamily(
            "inspection_audit_review_queue",
            "Flagged audit rows awaiting a verdict.",
            value=queue_count(session, QueueFilter()),
        )
    )
    out.append(
        GaugeMetricFamily(
            "inspection_audit_rows_written_last_minute",
            "Audit rows created in the last 60 seconds.",
            value=int(minute),
        )
    )
    if newest is not None:
        if isinstance(newest, str):
            newest = datetime.fromisoformat(newest)
        newest = newest.replace(tzinfo=UTC) if newest.tzinfo is None else newest
        out.append(
            GaugeMetricFamily(
                "inspection_audit_last_write_age_seconds",
                "Seconds since the newest audit row was written or updated.",
                value=max(0.0, (now - newest).total_seconds()),
            )
        )
    buckets_n, count, total = lag_histogram(session, url or str(session.get_bind().url), now)
    buckets = [(_le(b), n) for b, n in zip(LAG_BUCKETS, buckets_n, strict=True)]
    buckets.append(("+Inf", count))
    out.append(
        HistogramMetricFamily(
            "inspection_audit_capture_to_score_seconds",
            "Seconds from capture to the audit row (every row, done or error).",
            buckets=buckets,
            sum_value=total,
        )
    )
    return out


def _le(bound: float) -> str:
    return f"{bound:g}" if bound < 1e6 else repr(bound)


class AuditCollector(Collector):
    """Reads the database and the broker at every scrape (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        from db.session import session_scope
        from inspection_audit.web.broker import BrokerUnavailable, oldest_waiting, queue_depth

        now = datetime.now(UTC)
        up = GaugeMetricFamily(
            "inspection_audit_up", "1 when the component answered.", labels=["component"]
        )
        url = self.settings.resolved_database_url
        try:
            with session_scope(url) as session:
                families = database_families(session, now, url)
            db_up = 1
        except Exception:
            families, db_up = [], 0
        yield from families
        for extra in EXTRA_FAMILIES:
            try:
                yield from extra(url)
            except Exception:
                db_up = 0
        up.add_metric(["database"], db_up)
        try:
            depth = queue_depth(self.settings)
            oldest = oldest_waiting(self.settings) if depth else None
            q = GaugeMetricFamily(
                "inspection_audit_queue_messages",
                "Messages waiting in the broker (not yet received by a worker).",
                labels=["queue"],
            )
            q.add_metric([self.settings.queue], depth)
            yield q
            yield GaugeMetricFamily(
                "inspection_audit_oldest_waiting_age_seconds",
                "Seconds since the capture of the oldest waiting inspection (0: none waits).",
                value=max(0.0, (now - oldest).total_seconds()) if oldest else 0.0,
            )
            up.add_metric(["broker"], 1)
        except BrokerUnavailable:
            up.add_metric(["broker"], 0)
        yield up


def registry_for(settings: Settings) -> CollectorRegistry:
    """A registry holding only :class:`AuditCollector` (no process metrics: several server
    processes must give the same answer)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(AuditCollector(settings))
    return reg
