"""The platform's housekeeping: what keeps the tables as small as their purpose needs.

Four jobs, each run by a Celery task on the `maintenance` queue (`maintenance.tasks`), when the
scheduler finds it due (`maintenance.timers`):

- `retention_sweep`: a finished run older than its tenant's `retention_days` loses its event log
  and its attempts (the run, its steps, their outputs and errors stay);
- `metric_samples_roll_up`: the dashboard's raw samples older than
  `SWITCHYARD_METRICS_ROLLUP_AFTER_H` become one point per minute and series (their average);
- `idempotency_keys_expire`: a run's Idempotency-Key is released once it is older than
  `SWITCHYARD_IDEMPOTENCY_TTL_S` (the submission already ignores it then; this frees the index);
- `approval_notifications_withdraw` (`approvals.services`): an approval webhook still waiting to
  be delivered about a request that is no longer pending is given up.

Every job works in batches of `SWITCHYARD_HOUSEKEEPING_BATCH` rows, one short transaction each,
takes only rows no one holds (`SKIP LOCKED`) and stops at `SWITCHYARD_HOUSEKEEPING_BUDGET_S`
(the next run goes on), so it never holds a hot table's rows for long (docs/maintenance.md).
Retention never touches a run that is not final: each batch locks the runs it empties
`FOR SHARE`, which a retry (`FOR UPDATE`) cannot take until the batch commits, and the batch
re-reads their status under that lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from approvals.services import approval_notifications_withdraw
from jobs.statuses import RUN_FINAL
from tenants.models import Tenant

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What one housekeeping run did: stored as its Celery task's result and shown to operators."""

    job: str
    removed: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    errors: list[str] = field(default_factory=list)
    finished: bool = True  # False when the time budget ran out with work left
    duration_s: float = 0.0

    @property
    def rows(self) -> int:
        return sum(self.removed.values())

    def count(self, table: str, rows: int) -> None:
        self.removed[table] = self.removed.get(table, 0) + rows

    def as_result(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "rows": self.rows,
            "removed": self.removed,
            "batches": self.batches,
            "errors": self.errors,
            "finished": self.finished,
            "duration_s": round(self.duration_s, 3),
        }


class _Budget:
    def __init__(self, seconds: float | None):
        self.until = time.monotonic() + (
            settings.SWITCHYARD_HOUSEKEEPING_BUDGET_S if seconds is None else seconds
        )

    def spent(self) -> bool:
        return time.monotonic() >= self.until


def _batch(batch: int | None) -> int:
    return batch or settings.SWITCHYARD_HOUSEKEEPING_BATCH


def _until_done(
    outcome: Outcome, table: str, budget: _Budget, one_batch: Callable[[], int]
) -> None:
    """Run `one_batch` (one transaction; how many rows it changed) until it changes none or
    the budget is spent."""
    while not budget.spent():
        rows = one_batch()
        if not rows:
            return
        outcome.count(table, rows)
        outcome.batches += 1
    outcome.finished = False


def _timed(outcome: Outcome, work: Callable[[], None]) -> Outcome:
    started = time.monotonic()
    try:
        work()
    finally:
        outcome.duration_s = time.monotonic() - started
    return outcome


# --- retention ---------------------------------------------------------------------------------

_FINAL = sorted(str(status) for status in RUN_FINAL)

# The runs of one batch: final, finished before the cutoff, with something left to delete;
# locked FOR SHARE (a retry waits for this batch's commit) and skipped if someone holds them.
_RETENTION_RUNS = """
SELECT r.id FROM jobs_run r
WHERE r.tenant_id = %(tenant)s AND r.status = ANY(%(final)s) AND r.finished_at < %(cutoff)s
  AND r.id > %(after)s
  AND (EXISTS (SELECT 1 FROM jobs_event e WHERE e.run_id = r.id)
       OR EXISTS (SELECT 1 FROM jobs_stepattempt a JOIN jobs_steprun s ON s.id = a.step_run_id
                  WHERE s.run_id = r.id))
ORDER BY r.id
LIMIT %(runs)s
FOR SHARE OF r SKIP LOCKED
"""
_RETENTION_EVENTS = """
DELETE FROM jobs_event WHERE id IN (
    SELECT id FROM jobs_event WHERE run_id = ANY(%(runs)s) LIMIT %(batch)s)
"""
_RETENTION_ATTEMPTS = """
DELETE FROM jobs_stepattempt WHERE id IN (
    SELECT a.id FROM jobs_stepattempt a JOIN jobs_steprun s ON s.id = a.step_run_id
    WHERE s.run_id = ANY(%(runs)s) LIMIT %(batch)s)
"""
# Runs emptied per batch: enough for a batch of rows, few enough to lock briefly.
RUNS_PER_BATCH = 50


def retention_sweep(
    *, now: datetime | None = None, batch: int | None = None, budget_s: float | None = None
) -> Outcome:
    """Delete the events and attempts of final runs older than their tenant's retention.

    At most `batch` events and `batch` attempts per transaction. Runs that are not final
    (accepted, running, waiting; a failed run being retried) are never touched.
    """
    now = now or timezone.now()
    outcome = Outcome(job="retention")
    budget = _Budget(budget_s)

    def work() -> None:
        for tenant_id, days in Tenant.objects.values_list("id", "retention_days").order_by("id"):
            try:
                if not _retention_for_tenant(
                    outcome, tenant_id, now - timedelta(days=days), _batch(batch), budget
                ):
                    outcome.finished = False
                    return
            except Exception as exc:  # one tenant's failure does not stop the others
                log.warning("retention of tenant %s failed", tenant_id, exc_info=True)
                outcome.errors.append(f"tenant {tenant_id}: {type(exc).__name__}: {exc}")

    return _timed(outcome, work)


def _retention_for_tenant(
    outcome: Outcome, tenant_id: int, cutoff: datetime, batch: int, budget: _Budget
) -> bool:
    """Empty the tenant's expired runs batch by batch; False if the budget ran out first."""
    params: dict[str, Any] = {"tenant": tenant_id, "final": _FINAL, "cutoff": cutoff}
    # Runs are taken in id order from where the last batch ended (a run emptied in part is
    # taken again), so a run of the job reads each expired run once, however many batches.
    after = 0
    while True:
        if budget.spent():
            return False
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(_RETENTION_RUNS, {**params, "runs": RUNS_PER_BATCH, "after": after})
            runs = [row[0] for row in cursor.fetchall()]
            if not runs:
                return True
            cursor.execute(_RETENTION_EVENTS, {"runs": runs, "batch": batch})
            outcome.count("events", cursor.rowcount)
            cursor.execute(_RETENTION_ATTEMPTS, {"runs": runs, "batch": batch})
            outcome.count("attempts", cursor.rowcount)
            if cursor.rowcount < batch:
                # Every attempt of these runs is gone; their events may not be (a batch of
                # each table): the next batch starts at the first run that may keep some.
                cursor.execute("SELECT min(run_id) FROM jobs_event WHERE run_id = ANY(%s)", [runs])
                (first_left,) = cursor.fetchone()
                after = max(runs) if first_left is None else first_left - 1
        outcome.batches += 1


# --- metric samples -----------------------------------------------------------------------------

# One window of raw points becomes one point per (minute, metric, key), in one statement.
_ROLL_UP = """
WITH raw AS (
    DELETE FROM dashboard_metricsample
    WHERE NOT rolled_up AND at >= %(start)s AND at < %(end)s
    RETURNING at, metric, key, value
), minutes AS (
    INSERT INTO dashboard_metricsample (at, metric, key, value, rolled_up)
    SELECT date_trunc('minute', at), metric, key, avg(value), true FROM raw
    GROUP BY 1, 2, 3
    RETURNING 1
)
SELECT (SELECT count(*) FROM raw), (SELECT count(*) FROM minutes)
"""
ROLL_UP_WINDOW = timedelta(minutes=10)


def metric_samples_roll_up(
    *, now: datetime | None = None, budget_s: float | None = None
) -> Outcome:
    """Average the raw samples older than `SWITCHYARD_METRICS_ROLLUP_AFTER_H` by minute.

    Windows of ten whole minutes, one transaction each, oldest first. The samples are written
    by the scheduler's sampler only at the present, so an old window is never written at once.
    """
    now = now or timezone.now()
    outcome = Outcome(job="metric roll-up")
    budget = _Budget(budget_s)
    after = timedelta(hours=float(settings.SWITCHYARD_METRICS_ROLLUP_AFTER_H))
    cutoff = (now - after).replace(second=0, microsecond=0)

    def work() -> None:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT min(at) FROM dashboard_metricsample WHERE NOT rolled_up AND at < %s",
                [cutoff],
            )
            (oldest,) = cursor.fetchone()
        if oldest is None:
            return
        start = oldest.replace(second=0, microsecond=0)
        while start < cutoff:
            if budget.spent():
                outcome.finished = False
                return
            end = min(start + ROLL_UP_WINDOW, cutoff)
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute(_ROLL_UP, {"start": start, "end": end})
                raw, minutes = cursor.fetchone()
            outcome.count("samples", raw - minutes)
            outcome.batches += 1
            start = end

    return _timed(outcome, work)


# --- idempotency keys ---------------------------------------------------------------------------

_KEYS_EXPIRE = """
UPDATE jobs_run SET idempotency_key = '', request_hash = ''
WHERE id IN (
    SELECT id FROM jobs_run
    WHERE idempotency_key <> '' AND created_at < %(before)s
    ORDER BY id LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED)
"""


def idempotency_keys_expire(
    *, now: datetime | None = None, batch: int | None = None, budget_s: float | None = None
) -> Outcome:
    """Release the Idempotency-Keys of runs older than `SWITCHYARD_IDEMPOTENCY_TTL_S`.

    A submission already treats such a key as free (`switchyard_run_submit`); releasing it
    keeps the unique index on (tenant, key) to the keys that still mean something. Runs
    locked by a transition are skipped and released next time.
    """
    now = now or timezone.now()
    outcome = Outcome(job="idempotency keys")
    budget = _Budget(budget_s)
    before = now - timedelta(seconds=settings.SWITCHYARD_IDEMPOTENCY_TTL_S)

    def one_batch() -> int:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(_KEYS_EXPIRE, {"before": before, "batch": _batch(batch)})
            return cursor.rowcount

    return _timed(outcome, lambda: _until_done(outcome, "idempotency keys", budget, one_batch))


# --- approvals' notifications -------------------------------------------------------------------


def approval_notifications_expire(
    *, now: datetime | None = None, batch: int | None = None, budget_s: float | None = None
) -> Outcome:
    """Give up the approval webhooks still to be delivered about requests that are no longer
    pending (`approvals.services.approval_notifications_withdraw`), batch by batch."""
    now = now or timezone.now()
    outcome = Outcome(job="approval notifications")
    budget = _Budget(budget_s)

    def one_batch() -> int:
        return approval_notifications_withdraw(now=now, batch=_batch(batch))

    return _timed(
        outcome, lambda: _until_done(outcome, "approval notifications", budget, one_batch)
    )
