"""The metric sampler: the time series behind the overview's charts, and `/metrics` counters.

Every `SWITCHYARD_METRICS_SAMPLE_S` seconds (10 by default) one sample is taken, whichever
process asks first: the scheduler asks after each cycle (`heartbeats.scheduler_cycle_done`,
on a background thread so a cycle never waits for it). Several schedulers may ask at once:
the sampler's single `SamplerState` row is locked with SKIP LOCKED and the sample is taken only
when the last one is old enough, so there is one sample per interval. No Celery beat, no extra
process: if no scheduler runs, nothing is admitted either, and the charts say so by a gap.

A sample writes `MetricSample` points:

| metric | key | value |
|---|---|---|
| `queue_depth` | broker queue | messages ready in RabbitMQ (passive declare) |
| `backlog` | lane | ready steps in PostgreSQL |
| `backlog_tenant` | tenant slug | ready steps of the tenant |
| `completed_per_min` | | attempts that succeeded, per minute, since the last sample |
| `retries_per_min` | | attempts that failed or were lost and will be retried, per minute |
| `failures_per_min` | | steps that failed for good, per minute |
| `wait_p50`, `wait_p95` | lane | queue wait (ready → running) in the last minute, ms |

and advances the cumulative `MetricCounter`s of `/metrics` by what finished between the
watermark (`SamplerState.counted_until`) and now - `COUNT_LAG`, in the same transaction as the
watermark: each attempt is counted once. Points older than `SWITCHYARD_METRICS_RETENTION_H`
hours are deleted, and so are heartbeats of processes long gone.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from dashboard.models import MetricSample, ProcessHeartbeat, ProcessRole, SamplerState

log = logging.getLogger(__name__)

COUNT_LAG = timedelta(seconds=2)
WAIT_WINDOW = timedelta(seconds=60)
# Prometheus histogram bounds, seconds.
DURATION_BOUNDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
WAIT_BOUNDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

# Charted series: metric → (title, unit). The overview draws one chart per group.
CHARTS = {
    "queue_depth": ("Broker queue depth", "messages"),
    "backlog": ("Ready backlog per lane", "steps"),
    "throughput": ("Throughput", "per minute"),
    "wait": ("Queue wait per lane", "ms"),
}

_ATTEMPTS = """
SELECT s.kind, a.outcome,
       (s.status = 'failed' AND a.number = s.attempt) AS final,
       width_bucket(coalesce(a.duration_ms, 0) / 1000.0, %(bounds)s::float8[]) AS bucket,
       count(*), coalesce(sum(a.duration_ms), 0) / 1000.0
FROM jobs_stepattempt a JOIN jobs_steprun s ON s.id = a.step_run_id
WHERE a.finished_at > %(since)s AND a.finished_at <= %(until)s
GROUP BY 1, 2, 3, 4
"""

_WAITS = """
SELECT t.slug, s.lane,
       width_bucket(extract(epoch FROM s.started_at - s.ready_at)::float8, %(bounds)s::float8[]),
       count(*), sum(extract(epoch FROM s.started_at - s.ready_at))
FROM jobs_steprun s JOIN tenants_tenant t ON t.id = s.tenant_id
WHERE s.started_at > %(since)s AND s.started_at <= %(until)s
  AND s.ready_at IS NOT NULL AND s.started_at >= s.ready_at
GROUP BY 1, 2, 3
"""

_WAIT_PERCENTILES = """
SELECT s.lane,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM s.started_at - s.ready_at)),
       percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM s.started_at - s.ready_at))
FROM jobs_steprun s
WHERE s.started_at > %(since)s AND s.started_at <= %(until)s
  AND s.ready_at IS NOT NULL AND s.started_at >= s.ready_at
GROUP BY 1
"""

_BACKLOG = """
SELECT t.slug, s.lane, count(*)
FROM jobs_steprun s JOIN tenants_tenant t ON t.id = s.tenant_id
WHERE s.status = 'ready'
GROUP BY 1, 2
"""

_ADD_COUNTERS = """
INSERT INTO dashboard_metriccounter (name, labels, value) VALUES (%s, %s, %s)
ON CONFLICT (name, labels) DO UPDATE SET value = dashboard_metriccounter.value + EXCLUDED.value
"""


def labels_key(**labels: str) -> str:
    """The canonical form of a label set, as stored in `MetricCounter.labels`."""
    return json.dumps(labels, sort_keys=True, separators=(",", ":"))


def _le(bounds: tuple[float, ...], bucket: int) -> str:
    return f"{bounds[bucket]:g}" if bucket < len(bounds) else "+Inf"


def sample_if_due(*, now: datetime | None = None, force: bool = False) -> bool:
    """Take a sample if the last one is older than the interval; True if one was taken."""
    now = now or timezone.now()
    interval = timedelta(seconds=float(settings.SWITCHYARD_METRICS_SAMPLE_S))
    SamplerState.objects.get_or_create(pk=1)
    with transaction.atomic():
        state = SamplerState.objects.select_for_update(skip_locked=True).filter(pk=1).first()
        if state is None:
            return False  # another process is sampling right now
        if not force and state.last_sample_at and now - state.last_sample_at < interval * 0.9:
            return False
        _take_sample(state, now)
        return True


def _take_sample(state: SamplerState, now: datetime) -> None:
    from dashboard.health import broker_queues

    points: list[MetricSample] = []

    def point(metric: str, key: str, value: float | None) -> None:
        if value is not None:
            points.append(MetricSample(at=now, metric=metric, key=key, value=float(value)))

    for queue in broker_queues():
        if queue.reachable:
            point("queue_depth", queue.name, queue.depth)

    by_lane: dict[str, int] = defaultdict(int)
    by_tenant: dict[str, int] = defaultdict(int)
    with connection.cursor() as cursor:
        cursor.execute(_BACKLOG)
        for slug, lane, count in cursor.fetchall():
            by_lane[lane] += count
            by_tenant[slug] += count
    for lane in ("interactive", "standard", "batch"):
        point("backlog", lane, by_lane.get(lane, 0))
    for slug, count in by_tenant.items():
        point("backlog_tenant", slug, count)

    until = now - COUNT_LAG
    since = state.counted_until
    if since is not None and until > since:
        rates = _count(since, until)
        minutes = (until - since).total_seconds() / 60
        for metric, count in rates.items():
            point(metric, "", round(count / minutes, 2))
    if since is None or until > since:
        state.counted_until = until

    with connection.cursor() as cursor:
        cursor.execute(_WAIT_PERCENTILES, {"since": until - WAIT_WINDOW, "until": until})
        for lane, p50, p95 in cursor.fetchall():
            point("wait_p50", lane, round(float(p50) * 1000, 1))
            point("wait_p95", lane, round(float(p95) * 1000, 1))

    MetricSample.objects.bulk_create(points)
    state.last_sample_at = now
    state.save(update_fields=["last_sample_at", "counted_until"])
    _prune(now)


def _count(since: datetime, until: datetime) -> dict[str, int]:
    """Advance the `/metrics` counters by what finished in (since, until]; the window's rates."""
    counters: dict[tuple[str, str], float] = defaultdict(float)
    rates = {"completed_per_min": 0, "retries_per_min": 0, "failures_per_min": 0}
    with connection.cursor() as cursor:
        cursor.execute(_ATTEMPTS, {"bounds": list(DURATION_BOUNDS), "since": since, "until": until})
        for kind, outcome, final, bucket, count, seconds in cursor.fetchall():
            counters[("step_attempts_total", labels_key(kind=kind, outcome=outcome))] += count
            if outcome == "succeeded":
                rates["completed_per_min"] += count
            elif outcome in ("failed", "lost"):
                if final:
                    rates["failures_per_min"] += count
                    counters[("step_failures_total", labels_key(kind=kind))] += count
                else:
                    rates["retries_per_min"] += count
                    counters[("step_retries_total", labels_key(kind=kind))] += count
            if outcome in ("succeeded", "failed"):
                le = _le(DURATION_BOUNDS, bucket)
                counters[("step_duration_seconds_bucket", labels_key(kind=kind, le=le))] += count
                counters[("step_duration_seconds_count", labels_key(kind=kind))] += count
                counters[("step_duration_seconds_sum", labels_key(kind=kind))] += float(seconds)
        cursor.execute(_WAITS, {"bounds": list(WAIT_BOUNDS), "since": since, "until": until})
        for slug, lane, bucket, count, seconds in cursor.fetchall():
            le = _le(WAIT_BOUNDS, bucket)
            counters[("queue_wait_seconds_bucket", labels_key(tenant=slug, lane=lane, le=le))] += (
                count
            )
            counters[("queue_wait_seconds_count", labels_key(tenant=slug, lane=lane))] += count
            counters[("queue_wait_seconds_sum", labels_key(tenant=slug, lane=lane))] += float(
                seconds or 0
            )
        if counters:
            cursor.executemany(
                _ADD_COUNTERS, [(name, labels, value) for (name, labels), value in counters.items()]
            )
    return rates


def _prune(now: datetime) -> None:
    retention = timedelta(hours=float(settings.SWITCHYARD_METRICS_RETENTION_H))
    MetricSample.objects.filter(at__lt=now - retention).delete()
    ProcessHeartbeat.objects.filter(
        role=ProcessRole.SCHEDULER, last_seen_at__lt=now - timedelta(hours=1)
    ).delete()
    ProcessHeartbeat.objects.filter(
        role=ProcessRole.WORKER, last_seen_at__lt=now - timedelta(hours=24)
    ).delete()


# --- in the background of a scheduler ---------------------------------------------------------

_thread: threading.Thread | None = None
_asked_at = 0.0


def sample_in_background() -> None:
    """Start `sample_if_due` on a thread unless one runs or it was asked for very recently."""
    global _thread, _asked_at
    clock = time.monotonic()
    if clock - _asked_at < float(settings.SWITCHYARD_METRICS_SAMPLE_S) / 4:
        return
    if _thread is not None and _thread.is_alive():
        return
    _asked_at = clock
    _thread = threading.Thread(target=_sample_quietly, name="metric-sampler", daemon=True)
    _thread.start()


def _sample_quietly() -> None:
    try:
        sample_if_due()
    except Exception:
        log.warning("metric sample failed", exc_info=True)
    finally:
        connection.close()


def series(*, since: datetime, metrics: Iterable[str] | None = None) -> dict[str, object]:
    """Chart data since `since`: `{"t": [epoch s...], "series": {"metric:key": [v...]}}`.

    Points of one sample share a time; a series missing from a sample gets null there, so
    every array has the length of `t` (what uPlot expects).
    """
    rows = MetricSample.objects.filter(at__gt=since).order_by("at", "id")
    if metrics is not None:
        rows = rows.filter(metric__in=list(metrics))
    times: list[float] = []
    index: dict[datetime, int] = {}
    values: dict[str, dict[int, float]] = defaultdict(dict)
    for at, metric, key, value in rows.values_list("at", "metric", "key", "value"):
        if at not in index:
            index[at] = len(times)
            times.append(round(at.timestamp(), 3))
        values[f"{metric}:{key}"][index[at]] = value
    return {
        "t": times,
        "series": {
            name: [points.get(i) for i in range(len(times))]
            for name, points in sorted(values.items())
        },
    }
