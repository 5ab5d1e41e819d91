"""Housekeeping: retention, metric roll-ups, expired idempotency keys and approvals'
notifications, as Celery tasks on the `maintenance` queue that the scheduler enqueues when due;
each run's outcome is a stored task result, shown in the admin and on the dashboard
(docs/maintenance.md)."""
