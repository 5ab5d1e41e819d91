"""Scheduling metrics per tenant and lane, read from PostgreSQL (one selector).

Used by the operators' dashboard, `/metrics` and the fairness tests: the ready backlog, the
steps queued in the broker and running, and the distribution of queue wait (ready → running)
of the steps that started within the window.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from django.db import connection
from django.utils import timezone

from jobs.models import StepRun
from jobs.selectors import in_flight_sql


@dataclass(frozen=True)
class LaneMetrics:
    tenant: str
    lane: str
    ready: int
    queued: int
    running: int
    started_in_window: int
    wait_p50_ms: float | None
    wait_p95_ms: float | None
    wait_p99_ms: float | None


_WAITS = f"""
SELECT t.slug, s.lane, count(*),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM s.started_at - s.ready_at)),
       percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM s.started_at - s.ready_at)),
       percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM s.started_at - s.ready_at))
FROM {StepRun._meta.db_table} s JOIN tenants_tenant t ON t.id = s.tenant_id
WHERE s.started_at >= %s AND s.ready_at IS NOT NULL AND s.started_at >= s.ready_at
GROUP BY t.slug, s.lane
"""

_COUNTS = f"""
SELECT t.slug, s.lane, s.status, count(*)
FROM {StepRun._meta.db_table} s JOIN tenants_tenant t ON t.id = s.tenant_id
WHERE s.status = 'ready' OR {in_flight_sql("s")}
GROUP BY t.slug, s.lane, s.status
"""


def scheduling_metrics(*, window_s: float = 300) -> list[LaneMetrics]:
    """One row per (tenant, lane) with backlog, in-flight counts and queue-wait percentiles."""
    since = timezone.now() - timedelta(seconds=window_s)
    counts: dict[tuple[str, str], dict[str, int]] = {}
    waits: dict[tuple[str, str], tuple[int, float, float, float]] = {}
    with connection.cursor() as cursor:
        cursor.execute(_COUNTS)
        for slug, lane, status, n in cursor.fetchall():
            counts.setdefault((slug, lane), {})[status] = n
        cursor.execute(_WAITS, [since])
        for slug, lane, n, p50, p95, p99 in cursor.fetchall():
            waits[(slug, lane)] = (n, p50, p95, p99)
    rows = []
    for key in sorted(set(counts) | set(waits)):
        by_status = counts.get(key, {})
        n, p50, p95, p99 = waits.get(key, (0, None, None, None))
        rows.append(
            LaneMetrics(
                tenant=key[0],
                lane=key[1],
                ready=by_status.get("ready", 0),
                queued=by_status.get("queued", 0),
                running=by_status.get("running", 0),
                started_in_window=n,
                wait_p50_ms=None if p50 is None else round(float(p50) * 1000, 1),
                wait_p95_ms=None if p95 is None else round(float(p95) * 1000, 1),
                wait_p99_ms=None if p99 is None else round(float(p99) * 1000, 1),
            )
        )
    return rows
