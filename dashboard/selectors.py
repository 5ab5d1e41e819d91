"""Every figure the operators' dashboard shows, read from where it lives (docs/dashboard.md).

Operators are staff and see all tenants, so nothing here is scoped by tenant; the views and
consumers that call these functions admit staff only. Each function reads what one panel
shows and no more: lists are bounded, counts come from indexed or partial scans.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import redis
from django.conf import settings
from django.db import connection
from django.db.models import Count, Min, Q, QuerySet
from django.db.models.expressions import RawSQL
from django.utils import timezone
from kombu import Connection

from dashboard.models import OperatorAction, ProcessHeartbeat, ProcessRole, SamplerState
from jobs.admission import max_queued, pool_capacity
from jobs.metrics import LaneMetrics, scheduling_metrics
from jobs.models import (
    Event,
    Run,
    RunStatus,
    StepAttempt,
    StepRun,
    StepStatus,
    WorkflowVersion,
)
from jobs.selectors import in_flight_steps
from jobs.statuses import RUN_FINAL
from jobs.transitions.txn import definition_of
from tenants.admin import with_usage
from tenants.models import Lane, Tenant

ACTIVE_RUN_STATUSES = (RunStatus.ACCEPTED, RunStatus.RUNNING, RunStatus.WAITING)
RUNS_PAGE = 50
ACTIVE_RUNS_SHOWN = 15
EVENTS_SHOWN = 200
# Step inputs and outputs longer than this are cut on the run page (with a note saying so).
JSON_SHOWN = 20_000
# Items of a map listed on the run page (failed items always are); the graph counts them all.
MAP_ITEMS_SHOWN = 20
DUE_SOON = timedelta(hours=1)


# --- the broker ----------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueFigure:
    """One broker queue as RabbitMQ reports it (`depth`/`consumers` None when unreachable)."""

    name: str
    broker_name: str
    depth: int | None
    consumers: int | None
    reachable: bool
    exists: bool
    capacity: int | None
    max_queued: int | None


def _queue_names() -> list[str]:
    return [queue.name for queue in settings.CELERY_TASK_QUEUES]


def broker_queues() -> list[QueueFigure]:
    """Depth and consumers of each configured queue, by a passive `queue.declare` each.

    A passive declare creates nothing and works without the management plugin. A queue that
    does not exist yet (no worker or publisher declared it) is reported with depth 0.
    """
    prefix = settings.SWITCHYARD_QUEUE_PREFIX
    capacities = pool_capacity()
    figures: list[QueueFigure] = []

    def figure(full: str, **values: Any) -> QueueFigure:
        name = full[len(prefix) :] if prefix and full.startswith(prefix) else full
        step_queue = name.startswith("steps.")
        return QueueFigure(
            name=name,
            broker_name=full,
            capacity=capacities.get(name),
            max_queued=max_queued(name) if step_queue else None,
            **values,
        )

    try:
        with Connection(
            settings.CELERY_BROKER_URL,
            connect_timeout=float(settings.SWITCHYARD_DASHBOARD_BROKER_TIMEOUT_S),
        ) as conn:
            conn.ensure_connection(max_retries=1)
            for full in _queue_names():
                channel = conn.channel()
                try:
                    declared = channel.queue_declare(full, passive=True)
                    figures.append(
                        figure(
                            full,
                            depth=declared.message_count,
                            consumers=declared.consumer_count,
                            reachable=True,
                            exists=True,
                        )
                    )
                except conn.channel_errors:
                    figures.append(figure(full, depth=0, consumers=0, reachable=True, exists=False))
                finally:
                    try:
                        channel.close()
                    except Exception:  # noqa: BLE001 - a channel the broker already closed
                        pass
    except Exception:  # noqa: BLE001 - unreachable broker: reported, not raised
        return [
            figure(full, depth=None, consumers=None, reachable=False, exists=False)
            for full in _queue_names()
        ]
    return figures


# --- backlog, active runs, approvals --------------------------------------------------------


def backlog() -> list[LaneMetrics]:
    """Per tenant and lane: ready, queued, running steps and queue-wait percentiles (5 min)."""
    return scheduling_metrics(window_s=300)


@dataclass(frozen=True)
class BacklogTotals:
    ready: int
    queued: int
    running: int


def backlog_totals(rows: list[LaneMetrics]) -> BacklogTotals:
    return BacklogTotals(
        ready=sum(r.ready for r in rows),
        queued=sum(r.queued for r in rows),
        running=sum(r.running for r in rows),
    )


def active_run_counts() -> dict[str, int]:
    """Runs not finished, by status (accepted = not started yet)."""
    counts = dict(
        Run.objects.filter(status__in=ACTIVE_RUN_STATUSES)
        .values_list("status")
        .annotate(n=Count("id"))
        .values_list("status", "n")
    )
    return {status: counts.get(status, 0) for status in ACTIVE_RUN_STATUSES}


def active_runs(limit: int = ACTIVE_RUNS_SHOWN) -> list[Run]:
    """The most recent unfinished runs."""
    return list(
        Run.objects.filter(status__in=ACTIVE_RUN_STATUSES)
        .select_related("tenant", "workflow_version__workflow")
        .order_by("-created_at", "-id")[:limit]
    )


@dataclass(frozen=True)
class ApprovalQueue:
    tenant: str
    reviewers: str
    pending: int
    oldest_at: datetime | None
    due_soon: int
    overdue: int


def approval_queues(now: datetime | None = None) -> list[ApprovalQueue] | None:
    """Pending approvals per tenant and reviewer group; None when approvals do not exist."""
    try:
        from jobs.models import Approval
    except ImportError:
        return None
    now = now or timezone.now()
    rows = (
        Approval.objects.filter(status="pending")
        .values("tenant__slug", "reviewers")
        .annotate(
            pending=Count("id"),
            oldest_at=Min("created_at"),
            due_soon=Count("id", filter=Q(due_at__gt=now, due_at__lte=now + DUE_SOON)),
            overdue=Count("id", filter=Q(due_at__lte=now)),
        )
        .order_by("tenant__slug", "reviewers")
    )
    return [
        ApprovalQueue(
            tenant=row["tenant__slug"],
            reviewers=row["reviewers"],
            pending=row["pending"],
            oldest_at=row["oldest_at"],
            due_soon=row["due_soon"],
            overdue=row["overdue"],
        )
        for row in rows
    ]


# --- health ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class HealthFigure:
    name: str
    ok: bool
    detail: str
    latency_ms: float | None = None


def _timed(check) -> tuple[bool, str, float | None]:
    started = time.monotonic()
    try:
        detail = check()
        return True, detail, round((time.monotonic() - started) * 1000, 1)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return False, f"{type(exc).__name__}: {exc}"[:200], None


def _postgres() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return "answering"


def _redis() -> str:
    client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=1, socket_connect_timeout=1)
    try:
        client.ping()
    finally:
        client.close()
    return "answering"


def health(
    queues: list[QueueFigure], workers: list[WorkerFigure], now: datetime | None = None
) -> list[HealthFigure]:
    """PostgreSQL, RabbitMQ, Redis, the scheduler(s) and each worker pool."""
    now = now or timezone.now()
    figures = []
    ok, detail, latency = _timed(_postgres)
    figures.append(HealthFigure("PostgreSQL", ok, detail, latency))
    reachable = bool(queues) and all(q.reachable for q in queues)
    figures.append(
        HealthFigure(
            "RabbitMQ",
            reachable,
            f"{len(queues)} queues declared passively" if reachable else "unreachable",
        )
    )
    ok, detail, latency = _timed(_redis)
    figures.append(HealthFigure("Redis", ok, detail, latency))
    figures.append(scheduler_health(now))
    live_by_queue: dict[str, int] = defaultdict(int)
    for worker in workers:
        if worker.state == "up":
            for queue in worker.queues:
                live_by_queue[queue] += 1
    for queue in queues:
        if queue.name == "maintenance":
            continue
        live = live_by_queue.get(queue.broker_name, 0)
        consumers = queue.consumers or 0
        figures.append(
            HealthFigure(
                f"pool {queue.name}",
                live > 0 or consumers > 0,
                f"{live} worker(s) heartbeating, {consumers} consumer(s) on the queue",
            )
        )
    return figures


def scheduler_health(now: datetime) -> HealthFigure:
    last = (
        ProcessHeartbeat.objects.filter(role=ProcessRole.SCHEDULER)
        .order_by("-last_cycle_at")
        .first()
    )
    if last is None or last.last_cycle_at is None:
        return HealthFigure("Scheduler", False, "no scheduler has run a cycle")
    age = (now - last.last_cycle_at).total_seconds()
    stale_after = max(10.0, 5 * float(settings.SWITCHYARD_SCHEDULER_POLL_S))
    return HealthFigure(
        "Scheduler",
        age <= stale_after,
        f"last cycle {age:.1f}s ago ({last.last_cycle_ms or 0:.0f} ms) on {last.name}",
        last.last_cycle_ms,
    )


def last_sample_at() -> datetime | None:
    state = SamplerState.objects.filter(pk=1).first()
    return state.last_sample_at if state else None


# --- workers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CurrentStep:
    run_id: uuid.UUID
    tenant: str
    step: str
    kind: str
    attempt: int
    started_at: datetime | None


@dataclass(frozen=True)
class WorkerFigure:
    name: str
    hostname: str
    pid: int | None
    queues: list[str]
    pool: str
    concurrency: int | None
    started_at: datetime
    last_seen_at: datetime
    stopped_at: datetime | None
    state: str  # up, down (stopped heartbeating), stopped (clean shutdown)
    succeeded: int
    failed: int
    current: list[CurrentStep] = field(default_factory=list)

    @property
    def queue_names(self) -> list[str]:
        prefix = settings.SWITCHYARD_QUEUE_PREFIX
        return [q[len(prefix) :] if prefix and q.startswith(prefix) else q for q in self.queues]


def worker_state(beat: ProcessHeartbeat, now: datetime) -> str:
    if beat.stopped_at is not None:
        return "stopped"
    down_after = timedelta(seconds=float(settings.SWITCHYARD_WORKER_DOWN_AFTER_S))
    return "down" if now - beat.last_seen_at > down_after else "up"


def workers(now: datetime | None = None) -> list[WorkerFigure]:
    """Every worker that heartbeated in the last 24 h: up ones first, then by name."""
    now = now or timezone.now()
    running: dict[str, list[CurrentStep]] = defaultdict(list)
    for step in (
        in_flight_steps()
        .filter(status=StepStatus.RUNNING)
        .select_related("run", "tenant")
        .order_by("started_at")
    ):
        node = step.worker.rsplit("/", 1)[0]
        running[node].append(
            CurrentStep(
                run_id=step.run.public_id,
                tenant=step.tenant.slug,
                step=step.key,
                kind=step.kind,
                attempt=step.attempt,
                started_at=step.started_at,
            )
        )
    figures = [
        WorkerFigure(
            name=beat.name,
            hostname=beat.hostname,
            pid=beat.pid,
            queues=list(beat.queues or []),
            pool=beat.pool,
            concurrency=beat.concurrency,
            started_at=beat.started_at,
            last_seen_at=beat.last_seen_at,
            stopped_at=beat.stopped_at,
            state=worker_state(beat, now),
            succeeded=beat.steps_succeeded,
            failed=beat.steps_failed,
            current=running.get(beat.name, []),
        )
        for beat in ProcessHeartbeat.objects.filter(role=ProcessRole.WORKER)
    ]
    order = {"up": 0, "down": 1, "stopped": 2}
    return sorted(figures, key=lambda w: (order[w.state], w.name))


# --- tenants --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bar:
    label: str
    used: int
    limit: int

    @property
    def percent(self) -> int:
        if self.limit <= 0:
            return 100 if self.used else 0
        return min(100, round(100 * self.used / self.limit))

    @property
    def level(self) -> str:
        return "full" if self.percent >= 100 else "high" if self.percent >= 80 else "ok"


@dataclass(frozen=True)
class TenantUsage:
    tenant: Tenant
    bars: list[Bar]
    running_steps: int
    ready_steps: int


# The Tenants page's sort keys (`?sort=`, `-` first for descending): name → what it orders by.
TENANT_SORTS = {
    "name": "name",
    "slug": "slug",
    "state": "is_active",
    "active": "active_runs",
    "queued": "queued_runs",
    "in_flight": "in_flight_steps",
    "ready": "ready_steps",
}
TENANTS_PER_PAGE = 24


@dataclass(frozen=True)
class TenantQuery:
    """The Tenants page's search, sort and page, parsed from the query string (invalid values
    fall back to the defaults: every tenant, by slug, the first page)."""

    search: str = ""
    sort: str = "slug"
    page: int = 1

    @classmethod
    def from_query(cls, query: Any) -> TenantQuery:
        search = (query.get("q") or "").strip()[:100]
        sort = query.get("sort") or "slug"
        if sort.removeprefix("-") not in TENANT_SORTS:
            sort = "slug"
        page = query.get("page") or ""
        return cls(search, sort, int(page) if page.isdigit() and int(page) > 0 else 1)

    def as_query(self) -> dict[str, str]:
        return {
            name: value
            for name, value in (("q", self.search), ("sort", self.sort), ("page", str(self.page)))
            if value and (name, value) not in (("sort", "slug"), ("page", "1"))
        }

    def order_by(self) -> list[str]:
        key = self.sort.removeprefix("-")
        field_name = TENANT_SORTS[key]
        ordered = f"-{field_name}" if self.sort.startswith("-") else field_name
        return [ordered, "slug"] if key != "slug" else [ordered]


@dataclass(frozen=True)
class TenantsPage:
    usage: list[TenantUsage]
    query: TenantQuery
    total: int  # tenants that match the search
    page: int  # the page shown (the last one if the query asked for a page past it)
    pages: int

    @property
    def previous(self) -> int | None:
        return self.page - 1 if self.page > 1 else None

    @property
    def next(self) -> int | None:
        return self.page + 1 if self.page < self.pages else None


def tenants_usage(
    query: TenantQuery | None = None, *, per_page: int = TENANTS_PER_PAGE
) -> TenantsPage:
    """One page of tenants, each with its use against its quotas (what the scheduler measures
    them against): those whose name or slug contains the search, in the query's order."""
    query = query or TenantQuery()
    tenants = Tenant.objects.all()
    if query.search:
        tenants = tenants.filter(Q(name__icontains=query.search) | Q(slug__icontains=query.search))
    total = tenants.count()
    pages = max(1, -(-total // per_page))
    page = min(query.page, pages)
    offset = (page - 1) * per_page
    shown = list(with_usage(tenants).order_by(*query.order_by())[offset : offset + per_page])
    since = timezone.now() - timedelta(minutes=1)
    per_minute = dict(
        StepRun.objects.filter(started_at__gte=since, tenant__in=[t.pk for t in shown])
        .values_list("tenant_id")
        .annotate(n=Count("id"))
        .values_list("tenant_id", "n")
    )
    usage = []
    for tenant in shown:
        usage.append(
            TenantUsage(
                tenant=tenant,
                running_steps=tenant.running_steps,
                ready_steps=tenant.ready_steps,
                bars=[
                    Bar("steps in flight", tenant.in_flight_steps, tenant.max_concurrent_steps),
                    Bar("active runs", tenant.active_runs, tenant.max_active_runs),
                    Bar("queued runs", tenant.queued_runs, tenant.max_queued_runs),
                    Bar("steps / minute", per_minute.get(tenant.pk, 0), tenant.steps_per_minute),
                    Bar("LLM tokens today", tenant.tokens_today, tenant.llm_tokens_per_day),
                ],
            )
        )
    return TenantsPage(usage, query, total, page, pages)


def tenant_by_slug(slug: str) -> Tenant | None:
    return Tenant.objects.filter(slug=slug).first()


def recent_actions(limit: int = 10) -> list[OperatorAction]:
    return list(OperatorAction.objects.order_by("-at", "-id")[:limit])


# --- runs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFilters:
    """The runs list's filters, as parsed from the query string (invalid values dropped)."""

    tenant: str = ""
    workflow: str = ""
    status: str = ""
    lane: str = ""
    since: datetime | None = None
    until: datetime | None = None
    error: str = ""
    fingerprint: str = ""

    @classmethod
    def from_query(cls, query: Any) -> RunFilters:
        def text(name: str, limit: int = 200) -> str:
            return (query.get(name) or "").strip()[:limit]

        status = text("status")
        lane = text("lane")
        fingerprint = text("fingerprint", 12)
        return cls(
            tenant=text("tenant", 64),
            workflow=text("workflow", 100),
            status=status if status in RunStatus.values else "",
            lane=lane if lane in Lane.values else "",
            since=_parse_time(text("since")),
            until=_parse_time(text("until")),
            error=text("error"),
            fingerprint=fingerprint if re.fullmatch(r"[0-9a-f]{12}", fingerprint) else "",
        )

    def as_query(self) -> dict[str, str]:
        values = {
            "tenant": self.tenant,
            "workflow": self.workflow,
            "status": self.status,
            "lane": self.lane,
            "since": _format_time(self.since),
            "until": _format_time(self.until),
            "error": self.error,
            "fingerprint": self.fingerprint,
        }
        return {name: value for name, value in values.items() if value}

    @property
    def is_empty(self) -> bool:
        return not self.as_query()


def _parse_time(value: str) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if timezone.is_naive(parsed):
        parsed = timezone.make_aware(parsed, timezone.get_default_timezone())
    return parsed


def _format_time(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%dT%H:%M") if value else ""


# The error fingerprint: the error with ids and numbers masked, hashed (failures view).
FINGERPRINT_SQL = (
    "left(md5(regexp_replace(regexp_replace(left({col}, 500), "
    "'[0-9a-f]{{8}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{12}}', '<id>', 'gi'), "
    "'[0-9]+', 'N', 'g')), 12)"
)


def runs_matching(filters: RunFilters) -> QuerySet[Run]:
    """The runs that match `filters`, unordered.

    Tenant and workflow are resolved to ids first (two tiny queries), so that PostgreSQL
    plans the big query with literal values it has statistics for, rather than through joins
    it cannot estimate.
    """
    runs = Run.objects.all()
    tenant_id = None
    if filters.tenant:
        tenant_id = Tenant.objects.filter(slug=filters.tenant).values_list("id", flat=True).first()
        if tenant_id is None:
            return Run.objects.none()
        runs = runs.filter(tenant_id=tenant_id)
    if filters.workflow:
        versions = WorkflowVersion.objects.filter(workflow__name=filters.workflow)
        if tenant_id is not None:
            versions = versions.filter(workflow__tenant_id=tenant_id)
        version_ids = list(versions.values_list("id", flat=True))
        if not version_ids:
            return Run.objects.none()
        runs = runs.filter(workflow_version_id__in=version_ids)
    if filters.status:
        runs = runs.filter(status=filters.status)
    if filters.lane:
        runs = runs.filter(lane=filters.lane)
    if filters.since:
        runs = runs.filter(created_at__gte=filters.since)
    if filters.until:
        runs = runs.filter(created_at__lt=filters.until)
    if filters.error:
        runs = runs.filter(error__icontains=filters.error)
    if filters.fingerprint:
        expression = RawSQL(FINGERPRINT_SQL.format(col='"jobs_run"."error"'), [])
        runs = runs.annotate(fingerprint=expression).filter(fingerprint=filters.fingerprint)
    return runs


@dataclass(frozen=True)
class RunsPage:
    runs: list[Run]
    older: str | None  # public id to pass as ?after= for the next (older) page
    newer: str | None  # public id to pass as ?before= for the previous (newer) page
    elapsed_ms: float


def runs_page(
    filters: RunFilters,
    *,
    after: str | None = None,
    before: str | None = None,
    limit: int = RUNS_PAGE,
) -> RunsPage:
    """One page of runs, newest first, by keyset on (created_at, id).

    `after` / `before` are the public ids of the last / first run of the page the operator
    comes from; the query starts from that run's position, so every page costs the same
    however deep it is. No total count: counting a million rows is what makes lists slow.
    """
    started = time.monotonic()
    runs = runs_matching(filters).select_related("tenant", "workflow_version__workflow")
    anchor = _anchor(after or before)
    if anchor is not None and after:
        runs = runs.filter(created_at__lte=anchor[0]).exclude(
            created_at=anchor[0], id__gte=anchor[1]
        )
        rows = list(runs.order_by("-created_at", "-id")[: limit + 1])
        has_older, has_newer = len(rows) > limit, True
        rows = rows[:limit]
    elif anchor is not None and before:
        runs = runs.filter(created_at__gte=anchor[0]).exclude(
            created_at=anchor[0], id__lte=anchor[1]
        )
        rows = list(runs.order_by("created_at", "id")[: limit + 1])
        has_older, has_newer = True, len(rows) > limit
        rows = list(reversed(rows[:limit]))
    else:
        rows = list(runs.order_by("-created_at", "-id")[: limit + 1])
        has_older, has_newer = len(rows) > limit, False
        rows = rows[:limit]
    return RunsPage(
        runs=rows,
        older=str(rows[-1].public_id) if rows and has_older else None,
        newer=str(rows[0].public_id) if rows and has_newer else None,
        elapsed_ms=round((time.monotonic() - started) * 1000, 1),
    )


def _anchor(public_id: str | None) -> tuple[datetime, int] | None:
    if not public_id:
        return None
    try:
        parsed = uuid.UUID(str(public_id))
    except ValueError:
        return None
    return Run.objects.filter(public_id=parsed).values_list("created_at", "id").first()


def runs_count(filters: RunFilters, *, action_filter: Q, cap: int) -> int:
    """How many runs a bulk action would touch, counted up to `cap` + 1."""
    return runs_matching(filters).filter(action_filter)[: cap + 1].count()


def runs_for_bulk(filters: RunFilters, *, action_filter: Q, cap: int) -> list[Run]:
    return list(runs_matching(filters).filter(action_filter).order_by("-created_at", "-id")[:cap])


def run_by_public_id(run_id: str) -> Run | None:
    try:
        public_id = uuid.UUID(str(run_id))
    except ValueError:
        return None
    return (
        Run.objects.select_related("tenant", "workflow_version__workflow", "parent_step__run")
        .filter(public_id=public_id)
        .first()
    )


# --- one run --------------------------------------------------------------------------------


@dataclass
class GraphNode:
    step_id: str
    kind: str
    status: str
    x: float
    y: float
    items_done: int = 0
    items_total: int = 0
    optional: bool = False


@dataclass(frozen=True)
class GraphEdge:
    x1: float
    y1: float
    x2: float
    y2: float
    done: bool

    @property
    def path(self) -> str:
        """A horizontal S-curve from the dependency's right edge to the step's left edge."""
        bend = (self.x2 - self.x1) / 2
        return (
            f"M{self.x1:g},{self.y1:g} C{self.x1 + bend:g},{self.y1:g} "
            f"{self.x2 - bend:g},{self.y2:g} {self.x2:g},{self.y2:g}"
        )


@dataclass(frozen=True)
class Graph:
    nodes: list[GraphNode]
    edges: list[GraphEdge]
    width: float
    height: float
    node_width: float
    node_height: float


NODE_W, NODE_H, GAP_X, GAP_Y, PAD = 150.0, 44.0, 56.0, 16.0, 8.0


def _map_items(steps: list[StepRun]) -> dict[str, list[StepRun]]:
    """The items of each map step, by the map's step id."""
    items: dict[str, list[StepRun]] = defaultdict(list)
    for step in steps:
        if step.map_index is not None:
            items[step.step_id].append(step)
    return items


def _items_done(map_items: list[StepRun]) -> int:
    return sum(i.status in (StepStatus.SUCCEEDED, StepStatus.SKIPPED) for i in map_items)


def run_graph(run: Run, steps: list[StepRun]) -> Graph:
    """The workflow's steps laid out by dependency depth (columns), each with its status."""
    definition = definition_of(run.workflow_version)
    by_key = {(s.step_id, s.map_index): s for s in steps}
    items = _map_items(steps)
    depth: dict[str, int] = {}
    for step_def in definition.steps:  # topological order
        depth[step_def.id] = 1 + max((depth[d] for d in step_def.depends_on), default=-1)
    columns: dict[int, list[str]] = defaultdict(list)
    for step_def in definition.steps:
        columns[depth[step_def.id]].append(step_def.id)
    tallest = max((len(c) for c in columns.values()), default=1)
    nodes: dict[str, GraphNode] = {}
    for column, ids in columns.items():
        offset = (tallest - len(ids)) * (NODE_H + GAP_Y) / 2
        for row, step_id in enumerate(ids):
            step_def = definition.step(step_id)
            row_step = by_key.get((step_id, None))
            map_items = items.get(step_id, [])
            nodes[step_id] = GraphNode(
                step_id=step_id,
                kind=step_def.kind,
                status=row_step.status if row_step else StepStatus.PENDING,
                x=PAD + column * (NODE_W + GAP_X),
                y=PAD + offset + row * (NODE_H + GAP_Y),
                items_done=_items_done(map_items),
                items_total=len(map_items),
                optional=step_def.optional,
            )
    edges = []
    for step_def in definition.steps:
        target = nodes[step_def.id]
        for dependency in sorted(step_def.depends_on):
            source = nodes[dependency]
            edges.append(
                GraphEdge(
                    x1=source.x + NODE_W,
                    y1=source.y + NODE_H / 2,
                    x2=target.x,
                    y2=target.y + NODE_H / 2,
                    done=source.status in ("succeeded", "skipped"),
                )
            )
    width = PAD * 2 + len(columns) * NODE_W + max(0, len(columns) - 1) * GAP_X
    height = PAD * 2 + tallest * NODE_H + max(0, tallest - 1) * GAP_Y
    return Graph(list(nodes.values()), edges, width, height, NODE_W, NODE_H)


@dataclass(frozen=True)
class GanttBar:
    x: float  # percent of the run's span
    width: float
    css: str  # queued, attempt-succeeded, attempt-failed, ...
    title: str


@dataclass(frozen=True)
class GanttRow:
    label: str
    status: str
    bars: list[GanttBar]


@dataclass(frozen=True)
class Gantt:
    rows: list[GanttRow]
    start: datetime
    end: datetime
    span_s: float
    ticks: list[tuple[float, str]]


GANTT_ROWS = 60


def run_gantt(run: Run, steps: list[StepRun], now: datetime | None = None) -> Gantt:
    """Per step (map items included, up to GANTT_ROWS rows): waits and attempts over time."""
    now = now or timezone.now()
    start = run.created_at
    end = run.finished_at or now
    for step in steps:
        for attempt in step.attempts.all():
            end = max(end, attempt.finished_at or now)
    span = max((end - start).total_seconds(), 0.001)

    def pos(at: datetime) -> float:
        return round(100 * max(0.0, (at - start).total_seconds()) / span, 3)

    rows = []
    ordered = sorted(
        steps, key=lambda s: (s.started_at or s.ready_at or now, s.step_id, s.map_index or -1)
    )
    for step in ordered[:GANTT_ROWS]:
        bars = []
        attempts = list(step.attempts.all())
        first_start = attempts[0].started_at if attempts else step.started_at
        map_row = step.kind == "map" and step.map_index is None
        if step.ready_at and first_start and first_start > step.ready_at and not map_row:
            bars.append(
                GanttBar(
                    pos(step.ready_at),
                    max(0.3, pos(first_start) - pos(step.ready_at)),
                    "wait",
                    f"waited {(first_start - step.ready_at).total_seconds():.2f}s for a worker",
                )
            )
        for attempt in attempts:
            finish = attempt.finished_at or now
            seconds = (finish - attempt.started_at).total_seconds()
            bars.append(
                GanttBar(
                    pos(attempt.started_at),
                    max(0.3, pos(finish) - pos(attempt.started_at)),
                    f"attempt-{attempt.outcome}",
                    f"attempt {attempt.number}: {attempt.outcome}, {seconds:.2f}s"
                    + (f" on {attempt.worker}" if attempt.worker else "")
                    + (f" — {attempt.error[:200]}" if attempt.error else ""),
                )
            )
        if not attempts and step.started_at:
            finish = step.finished_at or now
            bars.append(
                GanttBar(
                    pos(step.started_at),
                    max(0.3, pos(finish) - pos(step.started_at)),
                    f"attempt-{step.status}",
                    f"{step.status}, {(finish - step.started_at).total_seconds():.2f}s",
                )
            )
        rows.append(GanttRow(step.key, step.status, bars))
    return Gantt(rows, start, end, span, gantt_ticks(span))


def gantt_ticks(span_s: float, most: int = 5) -> list[tuple[float, str]]:
    """At most `most` ticks over `span_s` seconds: (percent of the span, label).

    A round step (1, 2 or 5 times a power of ten seconds) and as many decimals as it needs, so
    that no two labels read the same: a 0.12 s run gets `+0.00s +0.05s +0.10s`, not
    `+0.0s +0.0s +0.1s`.
    """
    wanted = span_s / (most - 1)
    magnitude = 10 ** math.floor(math.log10(wanted))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= wanted * (1 - 1e-9))
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    count = math.floor(span_s / step * (1 + 1e-9)) + 1
    return [(round(100 * n * step / span_s, 1), f"+{n * step:.{decimals}f}s") for n in range(count)]


@dataclass(frozen=True)
class StepDetail:
    step: StepRun
    input: str
    output: str
    attempts: list[StepAttempt]
    # A map's own row: how many of its items are done, of how many. That row never runs on
    # a worker (its items do), so it has no attempts to count.
    items_done: int | None = None
    items_total: int | None = None


def _shown(value: Any) -> str:
    if value is None:
        return ""
    text = json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)
    if len(text) > JSON_SHOWN:
        return text[:JSON_SHOWN] + f"\n… cut: {len(text):,} characters in all"
    return text


def _step_detail(step: StepRun, map_items: list[StepRun]) -> StepDetail:
    detail = StepDetail(step, _shown(step.input), _shown(step.output), list(step.attempts.all()))
    if step.kind == "map" and step.map_index is None:
        return replace(detail, items_done=_items_done(map_items), items_total=len(map_items))
    return detail


def run_detail(run: Run) -> dict[str, Any]:
    """What the run page shows: steps with attempts, graph, timeline, latest events."""
    steps = list(StepRun.objects.filter(run=run).prefetch_related("attempts").order_by("id"))
    events = list(Event.objects.filter(run=run).order_by("-seq")[:EVENTS_SHOWN])
    events.reverse()
    definition = definition_of(run.workflow_version)
    shown, per_map = [], defaultdict(int)
    items = _map_items(steps)
    for step in steps:
        if step.map_index is not None and step.status != StepStatus.FAILED:
            per_map[step.step_id] += 1
            if per_map[step.step_id] > MAP_ITEMS_SHOWN:
                continue
        shown.append(step)
    return {
        "steps": [_step_detail(step, items.get(step.step_id, [])) for step in shown],
        "steps_hidden": len(steps) - len(shown),
        "graph": run_graph(run, steps),
        "gantt": run_gantt(run, steps),
        "events": events,
        "events_cut": bool(events) and events[0].seq > 1,
        "step_ids": [step.id for step in definition.steps],
        "child_runs": list(
            Run.objects.filter(parent_step__run=run).values_list("public_id", "status")
        ),
        "is_final": run.status in RUN_FINAL,
    }


# --- failures -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FailureGroup:
    tenant: str
    workflow: str
    fingerprint: str
    count: int
    last_at: datetime
    first_at: datetime
    sample_error: str
    sample_run: uuid.UUID


# When a run failed: the failure stamps `finished_at` (`updated_at` is for a row without it).
_FAILED_AT = "coalesce(r.finished_at, r.updated_at)"

_FAILURES = f"""
SELECT t.slug, w.name, {FINGERPRINT_SQL.format(col="r.error")} AS fp, count(*),
       max({_FAILED_AT}), min({_FAILED_AT}),
       (array_agg(r.error ORDER BY {_FAILED_AT} DESC))[1],
       (array_agg(r.public_id ORDER BY {_FAILED_AT} DESC))[1]
FROM jobs_run r
JOIN tenants_tenant t ON t.id = r.tenant_id
JOIN jobs_workflowversion v ON v.id = r.workflow_version_id
JOIN jobs_workflow w ON w.id = v.workflow_id
WHERE r.status = 'failed' AND r.created_at >= %s
GROUP BY 1, 2, 3
ORDER BY 4 DESC, 5 DESC
LIMIT %s
"""


def failure_groups(*, since: datetime, limit: int = 100) -> list[FailureGroup]:
    """Failed runs created since `since`, grouped by tenant, workflow and error fingerprint,
    each group with its first and last failure times and its latest failure's error and run."""
    with connection.cursor() as cursor:
        cursor.execute(_FAILURES, [since, limit])
        return [FailureGroup(*row) for row in cursor.fetchall()]


# --- the overview, whole (also what the live socket pushes) ---------------------------------


def overview(now: datetime | None = None) -> dict[str, Any]:
    now = now or timezone.now()
    queues = broker_queues()
    worker_list = workers(now)
    lanes = backlog()
    return {
        "now": now,
        "queues": queues,
        "backlog": lanes,
        "backlog_totals": backlog_totals(lanes),
        "active_counts": active_run_counts(),
        "active_runs": active_runs(),
        "approvals": approval_queues(now),
        "health": health(queues, worker_list, now),
        "workers_up": sum(w.state == "up" for w in worker_list),
        "workers_down": sum(w.state == "down" for w in worker_list),
        "finished_5m": StepAttempt.objects.filter(
            finished_at__gte=now - timedelta(minutes=5), outcome="succeeded"
        ).count(),
        "failed_5m": StepAttempt.objects.filter(
            finished_at__gte=now - timedelta(minutes=5), outcome__in=["failed", "lost"]
        ).count(),
        "last_sample_at": last_sample_at(),
    }
