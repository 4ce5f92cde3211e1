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
``inspection_audit_capture_to_score_seconds``      histogram: audit row written − capture time
``inspection_audit_rows_written_last_minute``      audit rows created in the last 60 s
``inspection_audit_last_write_age_seconds``        now − newest audit row's update time
``inspection_audit_up{component}``                 1 when the database / broker answered
=================================================  ===============================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from inspection_audit.settings import Settings

#: Upper bounds (seconds) of the capture-to-score histogram.
LAG_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 86400.0)

#: Extra families from other parts of the service, called at every scrape. Each takes the
#: database URL and yields metric families.
#:
#: RESERVED for the reliability work (migration 0004): a dead-letter table and an outbox of
#: queued inspections. Register their collectors here, e.g.
#: ``inspection_audit_dead_letters`` (rows in the dead-letter table) and
#: ``inspection_audit_queued_without_audit`` (outbox rows with no audit row yet), from the
#: repository functions that come with that migration.
EXTRA_FAMILIES: list[Callable[[str], Iterator[Metric]]] = []


def _seconds_between(session: Any, later: Any, earlier: Any) -> Any:
    """``later − earlier`` in seconds, on either dialect."""
    if session.get_bind().dialect.name == "postgresql":
        return sa.func.extract("epoch", later - earlier)
    return (sa.func.julianday(later) - sa.func.julianday(earlier)) * 86400.0


def database_families(session: Any, now: datetime) -> list[Metric]:
    """The database's families (one transaction)."""
    from db.models import Audit, Inspection, UTCDateTime
    from inspection_audit.web.queries import QueueFilter, _latest_reviews, queue_count

    a = Audit.__table__.c
    i = Inspection.__table__.c
    done, error, flagged, minute, newest = session.execute(
        sa.select(
            sa.func.count().filter(a.status == "done"),
            sa.func.count().filter(a.status == "error"),
            sa.func.count().filter(sa.and_(a.status == "done", a.suspected_false_negative)),
            sa.func.count().filter(
                a.created_at >= sa.literal(now - timedelta(seconds=60), UTCDateTime())
            ),
            sa.func.max(a.updated_at),
        )
    ).one()
    out: list[Metric] = []
    g = GaugeMetricFamily("inspection_audit_audits", "Audit rows by status.", labels=["status"])
    g.add_metric(["done"], int(done))
    g.add_metric(["error"], int(error))
    out.append(g)
    out.append(
        GaugeMetricFamily(
            "inspection_audit_flagged",
            "Done audit rows flagged as suspected false negatives.",
            value=int(flagged),
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
    # capture-to-score lag of done rows, cumulative buckets in one pass
    lag = _seconds_between(session, a.created_at, i.captured_at)
    cols = [sa.func.count().filter(lag <= b) for b in LAG_BUCKETS]
    row = session.execute(
        sa.select(*cols, sa.func.count(), sa.func.coalesce(sa.func.sum(lag), 0.0))
        .select_from(Audit.__table__.join(Inspection.__table__, i.inspection_id == a.inspection_id))
        .where(a.status == "done")
    ).one()
    buckets = [(_le(b), int(n)) for b, n in zip(LAG_BUCKETS, row[: len(LAG_BUCKETS)], strict=True)]
    buckets.append(("+Inf", int(row[len(LAG_BUCKETS)])))
    out.append(
        HistogramMetricFamily(
            "inspection_audit_capture_to_score_seconds",
            "Seconds from capture to the audit row (done rows).",
            buckets=buckets,
            sum_value=float(row[-1] or 0.0),
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
                families = database_families(session, now)
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
