"""When housekeeping runs: the scheduler's sweep asks `housekeeping_enqueue_due` every time;
each job whose timer is due is advanced by `SWITCHYARD_HOUSEKEEPING_INTERVAL_S` in one
compare-and-set statement and then published to the `maintenance` queue, so that several
schedulers enqueue it once (docs/decisions.md, "Housekeeping from the scheduler").

A publish that fails (RabbitMQ down) loses that run only: the job is due again one interval
later, and each job finishes what an earlier run left.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection
from django.utils import timezone

from orchestrator.celery import app

log = logging.getLogger(__name__)

# The housekeeping tasks by name (defined in maintenance.tasks; published by name, so that the
# scheduler never imports the worker's code).
JOB_NAMES = (
    "maintenance.retention",
    "maintenance.metric_roll_up",
    "maintenance.idempotency_keys",
    "maintenance.approval_notifications",
)

_ENSURE = """
INSERT INTO maintenance_housekeepingtimer (job, next_at)
SELECT unnest(%(jobs)s::text[]), %(next)s
ON CONFLICT (job) DO NOTHING
"""
_TAKE_DUE = """
UPDATE maintenance_housekeepingtimer
SET next_at = %(next)s, last_enqueued_at = %(now)s
WHERE job = ANY(%(jobs)s) AND next_at <= %(now)s
RETURNING job
"""


def housekeeping_enqueue_due(*, now: datetime | None = None) -> list[str]:
    """Publish the housekeeping jobs that are due; the names of those published."""
    now = now or timezone.now()
    interval = timedelta(seconds=settings.SWITCHYARD_HOUSEKEEPING_INTERVAL_S)
    with connection.cursor() as cursor:
        # A job's first run is one interval after its timer appears (a new deployment).
        cursor.execute(_ENSURE, {"jobs": list(JOB_NAMES), "next": now + interval})
        cursor.execute(_TAKE_DUE, {"jobs": list(JOB_NAMES), "now": now, "next": now + interval})
        due = sorted(row[0] for row in cursor.fetchall())
    published = []
    for name in due:
        try:
            app.send_task(name, queue=settings.SWITCHYARD_QUEUE_PREFIX + "maintenance")
            published.append(name)
        except Exception:
            log.warning(
                "housekeeping %s not published; due again in %s", name, interval, exc_info=True
            )
    return published
