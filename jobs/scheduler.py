"""The scheduler process (`python manage.py run_scheduler`).

Each cycle: release retries that are due, expire leases (dead or hung workers, timeouts),
re-dispatch stale dispatches (a crash between commit and publish, a purged queue), expire and
escalate approvals that are due (their `on_timeout`, their `escalate_to`), and admit
ready steps by the admission policy. Dispatches are published after their transaction commits,
with publisher confirms. Between cycles it sleeps on PostgreSQL LISTEN, woken by the NOTIFY
that a transaction making a step ready sends, and polls as a fallback.

Several schedulers may run at once: every transition is a compare-and-set under the run's
row lock, so a step is admitted (and a token issued) once.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta

import psycopg
from django.conf import settings
from django.db import connection, connections, transaction
from django.utils import timezone

from approvals.services import approvals_escalate_due, approvals_expire_due
from dashboard.heartbeats import scheduler_cycle_done
from jobs import admission
from jobs.dispatch import Dispatch, publish
from jobs.events import READY_CHANNEL
from jobs.models import StepRun, StepStatus
from jobs.transitions.steps import (
    step_expire_lease,
    step_hold,
    step_redispatch,
    step_release_retry,
    steps_admit,
)
from jobs.wakeups import channel_connection
from jobs.webhooks import webhooks_dispatch_due
from maintenance.timers import housekeeping_enqueue_due
from schedules.services import schedules_fire_due
from tenants.quotas import throttle_fold, throttle_record, usage_roll_up

log = logging.getLogger(__name__)


@dataclass
class CycleStats:
    released: int = 0
    expired: int = 0
    redispatched: int = 0
    admitted: int = 0
    published: int = 0
    publish_failures: int = 0
    approvals_expired: int = 0
    approvals_escalated: int = 0
    # Another process held the admission lock (a direct admission, another scheduler).
    admission_busy: bool = False
    # Steps chosen but left ready because another transaction held their run's lock.
    skipped_busy: int = 0
    duration_s: float = 0.0
    dispatches: list[Dispatch] = field(default_factory=list, repr=False)


def run_cycle(*, sweeps: bool = True) -> CycleStats:
    """One scheduling cycle. Safe to run from several processes at once.

    `sweeps=False` only admits (and publishes): the scheduler runs the recovery sweeps on a
    timer of their own (`SWITCHYARD_SCHEDULER_SWEEP_S`), not on every NOTIFY, so that a step
    that becomes ready on an idle system is dispatched after a handful of queries.
    """
    started = time.monotonic()
    stats = CycleStats()
    now = timezone.now()
    if sweeps:
        _sweep(stats, now)

    holds: list[admission.Hold] = []
    # Decide first, without the admission lock, from the state as of an admission epoch read
    # while no one held the lock; then admit and write the buckets in one transaction holding
    # it. If anything was admitted in between (the epoch moved), that decision may give away a
    # slot twice: decide again, holding the lock. So the lock is held for the writes only, and
    # a direct admission waiting for it (docs/scheduling.md) waits milliseconds, not a whole
    # decision. A transaction-level lock: a scheduler that stalls inside it (SIGSTOP, a
    # partition) is cut off by PostgreSQL's idle-in-transaction timeout, which releases it.
    early: admission.Decision | None = None
    if not connection.in_atomic_block:
        seen = admission_lock_try()  # held for this statement only (autocommit)
        early = admission.decide(now) if seen is not None else None
    with transaction.atomic():
        epoch = admission_lock_try()
        if epoch is not None:
            decision = early if early is not None and epoch == seen else admission.decide(now)
            admitted = steps_admit(step_run_ids=decision.admit)
            stats.admitted = len(admitted)
            stats.skipped_busy = len(decision.admit) - len(admitted)
            stats.dispatches.extend(admitted)
            throttle_record(
                levels=decision.levels_after(Counter(d.tenant_id for d in admitted)), now=now
            )
            if sweeps:
                throttle_fold(now=now)
            holds = decision.holds
        else:
            stats.admission_busy = True
    for hold in holds:
        step_hold(step_run_id=hold.step_run_id, reason=hold.reason)

    stats.published, stats.publish_failures = publish(stats.dispatches)
    webhooks_dispatch_due()
    stats.duration_s = time.monotonic() - started
    return stats


def _sweep(stats: CycleStats, now) -> None:
    """Recovery: due retries, expired leases, stale dispatches, approvals past their time."""
    batch = settings.SWITCHYARD_SCHEDULER_BATCH
    due = StepRun.objects.filter(status=StepStatus.RETRY_WAIT, retry_at__lte=now)
    for step_run_id in due.order_by("retry_at").values_list("id", flat=True)[:batch]:
        stats.released += step_release_retry(step_run_id=step_run_id)

    expired = StepRun.objects.filter(status=StepStatus.RUNNING, lease_expires_at__lt=now)
    for step_run_id in expired.values_list("id", flat=True)[:batch]:
        stats.expired += step_expire_lease(step_run_id=step_run_id)

    stale_before = now - timedelta(seconds=settings.SWITCHYARD_DISPATCH_STALE_S)
    stale = StepRun.objects.filter(status=StepStatus.QUEUED, dispatched_at__lt=stale_before)
    for step_run_id in stale.values_list("id", flat=True)[:batch]:
        dispatch = step_redispatch(step_run_id=step_run_id, stale_before=stale_before)
        if dispatch is not None:
            stats.redispatched += 1
            stats.dispatches.append(dispatch)

    # Approvals past their deadline or escalation time (steps they settle become ready now).
    stats.approvals_expired = approvals_expire_due(now=now)
    stats.approvals_escalated = approvals_escalate_due(now=now)
    # LLM token uses appended by steps' reports, into the tenants' days.
    usage_roll_up()
    # Schedules' fire times that are due, each fired once (docs/schedules.md).
    schedules_fire_due(now=now)
    # Housekeeping jobs that are due, to the maintenance queue (docs/maintenance.md).
    housekeeping_enqueue_due(now=now)


# How soon a cycle that found the admission lock held looks again.
ADMISSION_RETRY_S = 0.01


def admission_lock_try() -> int | None:
    """Take the admission lock for the current transaction, without waiting; the admission
    epoch (advanced by every admission: `switchyard_steps_admit`) read holding it, or None
    when another transaction holds the lock."""
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT CASE WHEN pg_try_advisory_xact_lock(%s) THEN
                   (SELECT CASE WHEN is_called THEN last_value ELSE 0 END
                      FROM switchyard_admission_epoch) END
            """,
            [admission.ADMISSION_LOCK_ID],
        )
        return cursor.fetchone()[0]


def _listen_connection() -> psycopg.Connection:
    conn = channel_connection("switchyard scheduler")
    conn.execute(f"LISTEN {READY_CHANNEL}")
    return conn


class Scheduler:
    def __init__(self, *, poll_s: float | None = None):
        self.poll_s = poll_s if poll_s is not None else settings.SWITCHYARD_SCHEDULER_POLL_S
        self.stopping = threading.Event()
        self.last_cycle: CycleStats | None = None

    def stop(self, *_args: object) -> None:
        self.stopping.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run_forever(self) -> None:
        listener: psycopg.Connection | None = None
        sweep_s = settings.SWITCHYARD_SCHEDULER_SWEEP_S
        next_sweep = 0.0
        log.info("scheduler started (poll %.2fs, sweeps every %.2fs)", self.poll_s, sweep_s)
        while not self.stopping.is_set():
            try:
                if listener is None:
                    listener = _listen_connection()
                sweeps = time.monotonic() >= next_sweep
                stats = run_cycle(sweeps=sweeps)
                if sweeps:
                    next_sweep = time.monotonic() + sweep_s
                self.last_cycle = stats
                scheduler_cycle_done(stats)  # the dashboard's heartbeat and metric sampler
                if stats.admitted or stats.redispatched or stats.expired or stats.released:
                    log.info(
                        "cycle: admitted=%d redispatched=%d expired=%d released=%d "
                        "publish_failures=%d in %.3fs",
                        stats.admitted,
                        stats.redispatched,
                        stats.expired,
                        stats.released,
                        stats.publish_failures,
                        stats.duration_s,
                    )
                if stats.admitted >= settings.SWITCHYARD_SCHEDULER_BATCH:
                    continue  # more backlog: no sleep
                if stats.admission_busy or stats.skipped_busy:
                    # The NOTIFY that woke this cycle may be for steps the lock's holder
                    # (a worker's direct admission, for milliseconds) leaves ready: look again
                    # soon rather than at the next poll.
                    self._wait(listener, timeout=ADMISSION_RETRY_S)
                    continue
                self._wait(listener, timeout=min(self.poll_s, next_sweep - time.monotonic()))
            except Exception as exc:
                log.warning("scheduler cycle failed: %s; retrying in 1s", exc, exc_info=True)
                if listener is not None:
                    try:
                        listener.close()
                    except Exception:  # noqa: BLE001
                        pass
                    listener = None
                connections.close_all()
                self.stopping.wait(1.0)
        if listener is not None:
            listener.close()
        log.info("scheduler stopped")

    def _wait(self, listener: psycopg.Connection, *, timeout: float) -> None:
        # Wake on the first NOTIFY, then drain whatever else arrived with it.
        for _ in listener.notifies(timeout=max(0.0, timeout), stop_after=1):
            pass
        for _ in listener.notifies(timeout=0.0):
            pass
