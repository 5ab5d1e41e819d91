"""The housekeeping's Celery tasks, on the `maintenance` queue. Thin: each calls one job of
`maintenance.housekeeping` and returns its outcome, which django-celery-results stores (the
task's result: rows removed per table, batches, errors, duration) for the admin and the
dashboard. A job that raises is stored as a failure with its traceback."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from maintenance import housekeeping

# Task name → the job it runs. The timers (`maintenance.timers`) and the dashboard use the names.
JOBS = {
    "maintenance.retention": housekeeping.retention_sweep,
    "maintenance.metric_roll_up": housekeeping.metric_samples_roll_up,
    "maintenance.idempotency_keys": housekeeping.idempotency_keys_expire,
    "maintenance.approval_notifications": housekeeping.approval_notifications_expire,
}


def _task(name: str):
    @shared_task(name=name, ignore_result=False, acks_late=True)
    def run() -> dict[str, Any]:
        return JOBS[name]().as_result()

    return run


retention = _task("maintenance.retention")
metric_roll_up = _task("maintenance.metric_roll_up")
idempotency_keys = _task("maintenance.idempotency_keys")
approval_notifications = _task("maintenance.approval_notifications")
