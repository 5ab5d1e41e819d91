"""The dashboard's figures of the platform's processes and services (docs/dashboard.md): the
broker's queues, the health of PostgreSQL, Redis, RabbitMQ and the scheduler, and the workers
from their heartbeats.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import redis
from django.conf import settings
from django.db import connection
from django.utils import timezone
from kombu import Connection

from dashboard.models import ProcessHeartbeat, ProcessRole, SamplerState
from jobs.admission import max_queued, pool_capacity
from jobs.models import StepStatus
from jobs.selectors import in_flight_steps

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
