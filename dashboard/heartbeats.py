"""Heartbeats of the worker and scheduler processes, for the dashboard's Workers and health.

Workers: when a Celery worker is ready (`worker_ready`, sent in its main process whatever the
pool: threads, prefork, gevent, solo), a daemon thread of that process upserts its
`ProcessHeartbeat` row every `SWITCHYARD_WORKER_HEARTBEAT_S` seconds: node name, queues, pool
type and concurrency, and the work that finished on the node since the last beat: step attempts
(`jobs_stepattempt`) and, on a node that consumes the `webhooks` queue, webhook POSTs
(`jobs_webhookattempt`; a 2xx answer is done, anything else failed), both of whose `worker` is
`<node>/<pid>`, over a window that trails the clock by `COUNT_LAG` so that a commit in flight
is counted once, in the next beat. The row's `steps_succeeded` and `steps_failed` hold both.
A clean shutdown (`worker_shutdown`) stamps `stopped_at`; a killed worker simply stops
beating, and the dashboard marks it down once its last beat is older than
`SWITCHYARD_WORKER_DOWN_AFTER_S`.

A thread rather than Celery's own heartbeat timer: a slow database must never stall the
consumer's event loop (which also acks messages), and the thread works the same on every pool.
Each beat opens and closes its own database connection, so a prefork child forked later never
shares the thread's socket.

Schedulers: `scheduler_cycle_done` is called by `jobs.scheduler` after each cycle and writes
the cycle's time and duration at most once a second (then starts the metric sampler when it is
due, `dashboard.sampling`). It never raises: the dashboard must not break scheduling.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import datetime, timedelta
from typing import Any

from celery.signals import worker_ready, worker_shutdown
from django.conf import settings
from django.db import close_old_connections, connection
from django.utils import timezone

from dashboard.models import ProcessHeartbeat, ProcessRole
from dashboard.sampling import sample_in_background

log = logging.getLogger(__name__)

# Attempts are counted up to this long before now: a transaction that stamped `finished_at`
# a moment ago may not have committed yet.
COUNT_LAG = timedelta(seconds=2)

# A webhook POST that delivered: what `webhook_attempt_record` settles as succeeded.
_DELIVERED = "(status_code BETWEEN 200 AND 299 AND error = '')"

_COUNT_AND_BEAT = f"""
UPDATE {ProcessHeartbeat._meta.db_table} AS h
SET last_seen_at = %(now)s,
    stopped_at = NULL,
    steps_succeeded = h.steps_succeeded + c.succeeded,
    steps_failed = h.steps_failed + c.failed,
    counted_until = %(until)s
FROM (
    SELECT coalesce(sum(succeeded), 0) AS succeeded, coalesce(sum(failed), 0) AS failed
    FROM (
        SELECT count(*) FILTER (WHERE outcome = 'succeeded') AS succeeded,
               count(*) FILTER (WHERE outcome IN ('failed', 'lost')) AS failed
        FROM jobs_stepattempt
        WHERE finished_at > %(since)s AND finished_at <= %(until)s AND worker LIKE %(pattern)s
        UNION ALL
        SELECT count(*) FILTER (WHERE {_DELIVERED}) AS succeeded,
               count(*) FILTER (WHERE NOT {_DELIVERED}) AS failed
        FROM jobs_webhookattempt
        -- A constant: PostgreSQL skips this scan for a node that delivers no webhooks.
        WHERE %(delivers_webhooks)s
          AND at > %(since)s AND at <= %(until)s AND worker LIKE %(pattern)s
    ) AS per_kind
) AS c
WHERE h.name = %(name)s
"""


def _like_prefix(node: str) -> str:
    escaped = node.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "/%"


def pool_name(pool: Any) -> str:
    """`threads`, `prefork`, `gevent`, `eventlet` or `solo`, from the pool's class."""
    module = type(pool).__module__.rsplit(".", 1)[-1]
    return {"thread": "threads", "asynpool": "prefork"}.get(module, module)


class WorkerBeat:
    """The heartbeat of one worker node (runs on a daemon thread of its main process)."""

    def __init__(self, *, node: str, queues: list[str], pool: str, concurrency: int | None) -> None:
        self.node = node
        self.queues = queues
        self.pool = pool
        self.concurrency = concurrency
        self.delivers_webhooks = settings.SWITCHYARD_QUEUE_PREFIX + "webhooks" in queues
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="dashboard-heartbeat", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def run(self) -> None:
        interval = float(settings.SWITCHYARD_WORKER_HEARTBEAT_S)
        registered = False
        while not self.stopping.is_set():
            try:
                if not registered:
                    self.register()
                    registered = True
                else:
                    self.beat()
            except Exception:
                log.warning("worker heartbeat of %s failed", self.node, exc_info=True)
            finally:
                connection.close()
            self.stopping.wait(interval)

    def register(self) -> None:
        now = timezone.now()
        ProcessHeartbeat.objects.update_or_create(
            name=self.node,
            defaults={
                "role": ProcessRole.WORKER,
                "hostname": socket.gethostname(),
                "pid": os.getpid(),
                "queues": self.queues,
                "pool": self.pool,
                "concurrency": self.concurrency,
                "started_at": now,
                "last_seen_at": now,
                "stopped_at": None,
                "steps_succeeded": 0,
                "steps_failed": 0,
                "counted_until": now,
            },
        )

    def beat(self) -> None:
        now = timezone.now()
        since = (
            ProcessHeartbeat.objects.filter(name=self.node)
            .values_list("counted_until", flat=True)
            .first()
        )
        if since is None:
            self.register()
            return
        until = max(since, now - COUNT_LAG)
        with connection.cursor() as cursor:
            cursor.execute(
                _COUNT_AND_BEAT,
                {
                    "now": now,
                    "since": since,
                    "until": until,
                    "pattern": _like_prefix(self.node),
                    "delivers_webhooks": self.delivers_webhooks,
                    "name": self.node,
                },
            )

    def stop(self) -> None:
        self.stopping.set()
        try:
            close_old_connections()
            ProcessHeartbeat.objects.filter(name=self.node).update(stopped_at=timezone.now())
        except Exception:
            log.warning("could not record the shutdown of %s", self.node, exc_info=True)


_worker_beat: WorkerBeat | None = None


@worker_ready.connect(dispatch_uid="dashboard.worker_ready")
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    global _worker_beat
    consumer = sender
    queues = sorted(getattr(consumer.app.amqp.queues, "consume_from", None) or {})
    controller = getattr(consumer, "controller", None)
    _worker_beat = WorkerBeat(
        node=consumer.hostname,
        queues=queues,
        pool=pool_name(consumer.pool),
        concurrency=getattr(controller, "concurrency", None),
    )
    _worker_beat.start()


@worker_shutdown.connect(dispatch_uid="dashboard.worker_shutdown")
def _on_worker_shutdown(**_: Any) -> None:
    if _worker_beat is not None:
        _worker_beat.stop()


# --- schedulers -------------------------------------------------------------------------------

_scheduler_name = ""
_scheduler_started: datetime | None = None
_scheduler_written = 0.0


def scheduler_cycle_done(stats: Any) -> None:
    """Record a scheduler cycle (at most once a second) and sample metrics when due.

    Called by `jobs.scheduler.Scheduler` after every cycle. Never raises.
    """
    global _scheduler_name, _scheduler_started, _scheduler_written
    try:
        clock = time.monotonic()
        if clock - _scheduler_written >= 1.0:
            now = timezone.now()
            if not _scheduler_name:
                _scheduler_name = f"scheduler@{socket.gethostname()}/{os.getpid()}"
                _scheduler_started = now
            ProcessHeartbeat.objects.update_or_create(
                name=_scheduler_name,
                defaults={
                    "role": ProcessRole.SCHEDULER,
                    "hostname": socket.gethostname(),
                    "pid": os.getpid(),
                    "started_at": _scheduler_started,
                    "last_seen_at": now,
                    "last_cycle_at": now,
                    "last_cycle_ms": round(float(getattr(stats, "duration_s", 0.0)) * 1000, 2),
                },
            )
            _scheduler_written = clock
        sample_in_background()
    except Exception:
        log.warning("recording the scheduler cycle failed", exc_info=True)
