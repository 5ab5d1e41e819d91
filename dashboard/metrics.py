"""`GET /metrics`: Prometheus text exposition (docs/dashboard.md), behind a bearer token.

A custom collector reads, at scrape time:
- gauges from where they live: broker queue depth and consumers (RabbitMQ, passive
  declares), steps ready / queued / running per tenant and lane and active runs per tenant
  (PostgreSQL), workers up / down (heartbeats);
- counters and histograms from `dashboard.MetricCounter`, which the sampler advances from the
  attempts and steps that finished (so they are cumulative across every worker process and
  host, and survive restarts): step attempts by kind and outcome, retries and failures by kind,
  step latency by kind, queue wait by tenant and lane.

`SWITCHYARD_METRICS_TOKEN` empty: 403 (disabled). Otherwise `Authorization: Bearer <token>`,
else 401.
"""

from __future__ import annotations

import hmac
import json
from collections import defaultdict
from collections.abc import Iterator

from django.conf import settings
from django.db import connection
from django.db.models import Count
from django.http import HttpRequest, HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from dashboard import health, overview_page
from dashboard.models import MetricCounter
from dashboard.sampling import DURATION_BOUNDS, WAIT_BOUNDS
from jobs.models import Run
from jobs.selectors import in_flight_sql
from schedules.metrics import schedule_metrics

_STEP_COUNTS = f"""
SELECT t.slug, s.lane, s.status, count(*)
FROM jobs_steprun s JOIN tenants_tenant t ON t.id = s.tenant_id
WHERE s.status = 'ready' OR {in_flight_sql("s")}
GROUP BY 1, 2, 3
"""

COUNTERS = {
    "step_attempts_total": (
        "switchyard_step_attempts",
        "Step attempts that finished, by kind and outcome.",
        ["kind", "outcome"],
    ),
    "step_retries_total": (
        "switchyard_step_retries",
        "Failed or lost attempts that were retried, by kind.",
        ["kind"],
    ),
    "step_failures_total": (
        "switchyard_step_failures",
        "Steps that failed for good (attempts spent or not retryable), by kind.",
        ["kind"],
    ),
}
HISTOGRAMS = {
    "step_duration_seconds": (
        "switchyard_step_duration_seconds",
        "Duration of step attempts that succeeded or failed, by kind.",
        ["kind"],
        DURATION_BOUNDS,
    ),
    "queue_wait_seconds": (
        "switchyard_queue_wait_seconds",
        "Queue wait of started steps (ready to running), by tenant and lane.",
        ["tenant", "lane"],
        WAIT_BOUNDS,
    ),
}


class SwitchyardCollector:
    """Reads every figure at scrape time (see the module docstring)."""

    def collect(self) -> Iterator[Metric]:
        yield from self._broker()
        yield from self._steps_and_runs()
        yield from self._workers()
        yield from self._counters()
        yield from schedule_metrics()

    def _broker(self) -> Iterator[Metric]:
        queues = health.broker_queues()
        up = GaugeMetricFamily("switchyard_broker_up", "1 when RabbitMQ answered this scrape.")
        up.add_metric([], 1 if queues and all(q.reachable for q in queues) else 0)
        yield up
        depth = GaugeMetricFamily(
            "switchyard_queue_depth", "Messages ready in each broker queue.", labels=["queue"]
        )
        consumers = GaugeMetricFamily(
            "switchyard_queue_consumers", "Consumers of each broker queue.", labels=["queue"]
        )
        for queue in queues:
            if queue.reachable:
                depth.add_metric([queue.name], queue.depth or 0)
                consumers.add_metric([queue.name], queue.consumers or 0)
        yield depth
        yield consumers

    def _steps_and_runs(self) -> Iterator[Metric]:
        steps = GaugeMetricFamily(
            "switchyard_steps",
            "Steps by tenant, lane and status: ready is the backlog waiting in PostgreSQL, "
            "queued is admitted to the broker, running is on a worker.",
            labels=["tenant", "lane", "status"],
        )
        with connection.cursor() as cursor:
            cursor.execute(_STEP_COUNTS)
            for slug, lane, status, count in cursor.fetchall():
                steps.add_metric([slug, lane, status], count)
        yield steps
        active = GaugeMetricFamily(
            "switchyard_active_runs",
            "Runs not finished, by tenant and status (accepted = not started).",
            labels=["tenant", "status"],
        )
        rows = (
            Run.objects.filter(status__in=overview_page.ACTIVE_RUN_STATUSES)
            .values_list("tenant__slug", "status")
            .annotate(n=Count("id"))
        )
        for slug, status, count in rows:
            active.add_metric([slug, status], count)
        yield active

    def _workers(self) -> Iterator[Metric]:
        workers = GaugeMetricFamily(
            "switchyard_workers",
            "Celery workers by state (up: heartbeating; down: silent; stopped: shut down).",
            labels=["state"],
        )
        counts: dict[str, int] = {"up": 0, "down": 0, "stopped": 0}
        for worker in health.workers():
            counts[worker.state] += 1
        for state, count in counts.items():
            workers.add_metric([state], count)
        yield workers

    def _counters(self) -> Iterator[Metric]:
        stored: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
        for name, labels, value in MetricCounter.objects.values_list("name", "labels", "value"):
            stored[name].append((json.loads(labels), value))
        for key, (name, doc, label_names) in COUNTERS.items():
            family = CounterMetricFamily(name, doc, labels=label_names)
            for labels, value in stored.get(key, []):
                family.add_metric([labels.get(n, "") for n in label_names], value)
            yield family
        for key, (name, doc, label_names, bounds) in HISTOGRAMS.items():
            les = [f"{bound:g}" for bound in bounds] + ["+Inf"]
            family = HistogramMetricFamily(name, doc, labels=label_names)
            buckets: dict[tuple[str, ...], dict[str, float]] = defaultdict(dict)
            sums: dict[tuple[str, ...], float] = defaultdict(float)
            for labels, value in stored.get(f"{key}_bucket", []):
                series = tuple(labels.get(n, "") for n in label_names)
                buckets[series][labels["le"]] = value
            for labels, value in stored.get(f"{key}_sum", []):
                sums[tuple(labels.get(n, "") for n in label_names)] = value
            for series, by_le in sorted(buckets.items()):
                cumulative, running = [], 0.0
                for le in les:
                    running += by_le.get(le, 0.0)
                    cumulative.append((le, running))
                family.add_metric(list(series), cumulative, sum_value=sums.get(series, 0.0))
            yield family


def _authorised(request: HttpRequest, token: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, offered = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(offered.strip(), token)


def metrics(request: HttpRequest) -> HttpResponse:
    token = settings.SWITCHYARD_METRICS_TOKEN
    if not token:
        return HttpResponse(
            "metrics are disabled: set SWITCHYARD_METRICS_TOKEN\n",
            status=403,
            content_type="text/plain",
        )
    if not _authorised(request, token):
        response = HttpResponse(
            "send Authorization: Bearer <SWITCHYARD_METRICS_TOKEN>\n",
            status=401,
            content_type="text/plain",
        )
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SwitchyardCollector())
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
