"""Schedules' figures for `/metrics` (read at scrape time by `dashboard.metrics`).

- `switchyard_schedule_fires_total{tenant,status,code}`: fire rows by outcome (submitted,
  skipped, failed, pending), with the reason code of skips and refusals; each fire time counts
  once, whatever happened to it, so `status="skipped"` counts the skips by their `code`;
- `switchyard_schedule_fire_lateness_seconds{tenant}`: how long after its due time (fire
  time plus jitter) each submitted fire's run was submitted;
- `switchyard_schedule_fires_waiting{tenant,code}`: fires due but not submitted yet (refused
  by a quota, or waiting for the previous run under `buffer_one`).

Counts come from the fire rows, so they are the same from every web process and survive
restarts; deleting a schedule deletes its fires and their counts.
"""

from __future__ import annotations

from collections.abc import Iterator

from django.db import connection
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric

from schedules.models import ScheduleFire
from tenants.models import Tenant

LATENESS_BOUNDS = (0.5, 1, 2, 5, 10, 30, 60, 300, 1800, 3600)

_FIRE_TABLE = ScheduleFire._meta.db_table
_TENANT_TABLE = Tenant._meta.db_table
_LATENESS = f"""
SELECT t.slug, {", ".join(f"count(*) FILTER (WHERE late <= {bound})" for bound in LATENESS_BOUNDS)},
       count(*), coalesce(sum(late), 0)
FROM (SELECT tenant_id, greatest(0, extract(epoch FROM submitted_at - due_at)) AS late
      FROM {_FIRE_TABLE} WHERE status = 'submitted') f
JOIN {_TENANT_TABLE} t ON t.id = f.tenant_id
GROUP BY t.slug
"""
_COUNTS = f"""
SELECT t.slug, f.status, f.code, count(*)
FROM {_FIRE_TABLE} f JOIN {_TENANT_TABLE} t ON t.id = f.tenant_id
GROUP BY t.slug, f.status, f.code
"""


def schedule_metrics() -> Iterator[Metric]:
    fires = CounterMetricFamily(
        "switchyard_schedule_fires",
        "Schedules' fire times by outcome and reason code (skips: status=skipped).",
        labels=["tenant", "status", "code"],
    )
    waiting = GaugeMetricFamily(
        "switchyard_schedule_fires_waiting",
        "Fires due and not yet submitted: refused by a quota, or waiting for a run to end.",
        labels=["tenant", "code"],
    )
    with connection.cursor() as cursor:
        cursor.execute(_COUNTS)
        for slug, status, code, count in cursor.fetchall():
            fires.add_metric([slug, status, code], count)
            if status == "pending":
                waiting.add_metric([slug, code], count)
        cursor.execute(_LATENESS)
        rows = cursor.fetchall()
    yield fires
    yield waiting
    lateness = HistogramMetricFamily(
        "switchyard_schedule_fire_lateness_seconds",
        "Seconds from a fire's due time (fire time plus jitter) to its run's submission.",
        labels=["tenant"],
    )
    for slug, *counts in rows:
        *within, total, late_sum = counts
        buckets = [(f"{bound:g}", n) for bound, n in zip(LATENESS_BOUNDS, within, strict=True)]
        buckets.append(("+Inf", total))
        lateness.add_metric([slug], buckets, sum_value=float(late_sum))
    yield lateness
