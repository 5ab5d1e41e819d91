"""Every write to schedules and their fires (docs/schedules.md).

The one way a fire becomes a run is `_fire_submit`, called under the schedule's row lock, in
the transaction that records the fire: the fire row (unique per schedule and fire time) and
its run commit together or not at all. The run goes through `run_submit`, with the idempotency
key `schedule:<schedule id>:<fire time>`, so quotas and backpressure apply to it as to a
client's submission, and a second submission of the same fire time could only replay the
first run. Two schedulers never fire the same schedule at once (`SKIP LOCKED`); a scheduler
killed mid-fire leaves nothing behind (its transaction rolls back) and the next sweep fires
the same fire time again.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction

from jobs import selectors as job_selectors
from jobs import templating
from jobs.definitions import Fault, template_strings
from jobs.models import Run, Workflow
from jobs.services.submission import (
    Backpressure,
    request_fingerprint,
    run_submit,
)
from jobs.statuses import RUN_FINAL
from jobs.templating import TemplateError
from jobs.transitions.runs import RunError, run_cancel
from schedules.models import FireKind, FireStatus, Overlap, Schedule, ScheduleFire
from schedules.timing import Timing, TimingError, jitter_of
from tenants.models import Lane, Tenant

log = logging.getLogger(__name__)

# Fire times recorded per schedule per transaction (a long downtime's skips take several).
MATERIALIZE_BATCH = 1000
# Fires submitted per schedule per transaction.
SUBMIT_BATCH = 50
# At most this many fire times per backfill request.
MAX_BACKFILL = 1000
EARLIEST_BACKFILL = datetime(2000, 1, 1, tzinfo=UTC)


class ScheduleError(Exception):
    def __init__(self, message: str, *, code: str = "invalid_schedule", faults=None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.faults: list[Fault] = faults or []


@dataclass
class FireStats:
    schedules: int = 0  # schedules looked at
    busy: int = 0  # locked by another scheduler: left to it
    submitted: int = 0
    skipped: int = 0
    refused: int = 0  # by a quota or backpressure: to be retried
    failed: int = 0


def fire_idempotency_key(schedule: Schedule, fire_at: datetime) -> str:
    """The run's idempotency key: one per (schedule, fire time), whoever submits it."""
    return f"schedule:{schedule.public_id}:{fire_at.astimezone(UTC).isoformat()}"


# --- defining schedules -------------------------------------------------------------------------

EDITABLE = (
    "name",
    "version",
    "input",
    "lane",
    "cron",
    "timezone",
    "interval_s",
    "starts_at",
    "ends_at",
    "overlap",
    "catchup_window_s",
    "jitter_s",
    "paused",
)
TIMING_FIELDS = {"cron", "timezone", "interval_s", "starts_at", "ends_at"}


def timing_of(schedule: Schedule) -> Timing:
    return Timing(
        cron=schedule.cron,
        timezone=schedule.timezone,
        interval_s=schedule.interval_s,
        starts_at=schedule.starts_at,
        ends_at=schedule.ends_at,
    )


def schedule_create(
    *, tenant: Tenant, name: str, workflow: str, now: datetime, **fields: Any
) -> Schedule:
    """A schedule of `tenant`'s workflow `workflow`; its first fire time is the first after
    `now` (and after `starts_at`). Raises ScheduleError."""
    found = Workflow.objects.filter(tenant=tenant, name=workflow).first()
    if found is None:
        raise ScheduleError(f"workflow {workflow!r} not found", code="not_found")
    unknown = set(fields) - set(EDITABLE)
    if unknown:
        raise ScheduleError(f"unknown fields: {sorted(unknown)}")
    schedule = Schedule(tenant=tenant, name=name, workflow=found, starts_at=now)
    for key, value in fields.items():
        if value is not None or key in ("version", "interval_s", "ends_at"):
            setattr(schedule, key, value)
    _check(schedule)
    _plan_next(schedule, after=now)
    try:
        with transaction.atomic():
            schedule.save()
    except IntegrityError:
        raise ScheduleError(f"a schedule named {name!r} exists", code="name_taken") from None
    return schedule


def schedule_update(*, schedule: Schedule, now: datetime, **changes: Any) -> Schedule:
    """Change a schedule. An active schedule first records its fire times due by `now` (as a
    sweep would: none is lost to the change); then a change of its timing, a resume (or no
    change at all) plans its next fire from `now`."""
    unknown = set(changes) - set(EDITABLE)
    if unknown:
        raise ScheduleError(f"unknown fields: {sorted(unknown)}")
    with transaction.atomic():
        locked = (
            Schedule.objects.select_for_update(of=("self",))
            .select_related("tenant")
            .get(pk=schedule.pk)
        )
        was_paused = locked.paused
        _record_due_times(locked, now, FireStats())
        for key, value in changes.items():
            setattr(locked, key, value)
        _check(locked)
        resumed = was_paused and not locked.paused
        if not changes or TIMING_FIELDS & set(changes) or resumed:
            _plan_next(locked, after=now)
        taken = Schedule.objects.filter(tenant=locked.tenant, name=locked.name)
        if taken.exclude(pk=locked.pk).exists():
            raise ScheduleError(f"a schedule named {locked.name!r} exists", code="name_taken")
        locked.save()
    return locked


def schedule_pause(*, schedule: Schedule, now: datetime) -> Schedule:
    """No fire time is recorded while paused (those due by `now` are recorded first); fires
    already pending still go on."""
    return schedule_update(schedule=schedule, now=now, paused=True)


def schedule_resume(*, schedule: Schedule, now: datetime) -> Schedule:
    """Fire again from the first fire time after `now`: the times passed while paused are not
    caught up (a backfill fires them)."""
    return schedule_update(schedule=schedule, now=now, paused=False)


def schedule_delete(*, schedule: Schedule) -> None:
    schedule.delete()


def _check(schedule: Schedule) -> None:
    faults: list[Fault] = []
    try:
        timing_of(schedule).check()
    except TimingError as exc:
        field_name = "cron" if schedule.cron else "interval_s"
        if "time zone" in str(exc):
            field_name = "timezone"
        faults.append(Fault(field_name, str(exc)))
    if schedule.lane and schedule.lane not in Lane.values:
        faults.append(Fault("lane", f"lane must be one of {', '.join(Lane.values)}"))
    if schedule.overlap not in Overlap.values:
        faults.append(Fault("overlap", f"overlap must be one of {', '.join(Overlap.values)}"))
    if schedule.ends_at is not None and schedule.ends_at <= schedule.starts_at:
        faults.append(Fault("ends_at", "ends_at must be after starts_at"))
    faults.extend(_input_faults(schedule.input))
    if faults:
        raise ScheduleError("; ".join(str(f) for f in faults), faults=faults)


def _input_faults(value: Any) -> list[Fault]:
    faults = []
    for path, text in template_strings(value, "input"):
        try:
            templating.check(text, templating.SCHEDULE_NAMES)
        except TemplateError as exc:
            faults.append(Fault(path, f"template error: {exc.message}"))
    return faults


def _timing_from(schedule: Schedule, start: datetime) -> Timing:
    """The schedule's timing, extended back to `start` (a backfill may reach back before the
    schedule existed); an interval keeps its phase."""
    timing = timing_of(schedule)
    if start >= timing.starts_at:
        return timing
    anchor = start
    if timing.interval_s:
        periods = math.ceil((timing.starts_at - start).total_seconds() / timing.interval_s)
        anchor = timing.starts_at - timedelta(seconds=periods * timing.interval_s)
    return dataclasses.replace(timing, starts_at=anchor)


def _plan_next(schedule: Schedule, *, after: datetime) -> None:
    following = timing_of(schedule).next_after(after)
    schedule.next_fire_at = following
    schedule.next_due_at = _due(schedule, following) if following is not None else None


def _due(schedule: Schedule, fire_at: datetime) -> datetime:
    return fire_at + jitter_of(str(schedule.public_id), fire_at, schedule.jitter_s)


# --- firing ------------------------------------------------------------------------------------


def schedules_fire_due(*, now: datetime, limit: int | None = None) -> FireStats:
    """The scheduler's duty (each sweep): record every fire time of every schedule that is due
    by `now` and submit the pending fires. Safe to run from several processes at once."""
    limit = limit or settings.SWITCHYARD_SCHEDULER_BATCH
    stats = FireStats()
    due = Schedule.objects.filter(paused=False, next_due_at__lte=now).order_by("next_due_at")
    waiting = ScheduleFire.objects.filter(status=FireStatus.PENDING, retry_at__lte=now)
    ids = set(due.values_list("id", flat=True)[:limit])
    ids |= set(waiting.values_list("schedule_id", flat=True).distinct()[:limit])
    for schedule_id in sorted(ids):
        try:
            _fire_one(schedule_id, now, stats)
        except Exception:
            # This schedule's transaction rolled back: its fires are retried at the next sweep.
            log.exception("schedule %s: firing failed", schedule_id)
    if stats.submitted or stats.skipped or stats.refused or stats.failed:
        log.info(
            "schedules: submitted=%d skipped=%d refused=%d failed=%d",
            stats.submitted,
            stats.skipped,
            stats.refused,
            stats.failed,
        )
    return stats


def _fire_one(schedule_id: int, now: datetime, stats: FireStats) -> None:
    """Record the schedule's due times, then submit its pending fires: one run per
    transaction, so that no transaction holds the schedule's lock (nor the admission lock
    that a run's direct admission may take) for more than one submission."""
    for number in range(SUBMIT_BATCH):
        with transaction.atomic():
            schedule = (
                Schedule.objects.select_for_update(skip_locked=True, of=("self",))
                .select_related("tenant", "workflow")
                .filter(pk=schedule_id)
                .first()
            )
            if schedule is None:
                if number == 0:
                    stats.busy += 1
                return
            if number == 0:
                stats.schedules += 1
                _record_due_times(schedule, now, stats)
            more = _submit_pending(schedule, now, stats, limit=1)
        if not more:
            return


def schedule_fire_now(*, schedule: Schedule, now: datetime) -> ScheduleFire:
    """Trigger now: a manual fire at `now`, submitted at once by the schedule's policies."""
    stats = FireStats()
    with transaction.atomic():
        locked = (
            Schedule.objects.select_for_update(of=("self",))
            .select_related("tenant", "workflow")
            .get(pk=schedule.pk)
        )
        fire = ScheduleFire.objects.create(
            schedule=locked,
            tenant=locked.tenant,
            fire_at=now,
            due_at=now,
            retry_at=now,
            kind=FireKind.MANUAL,
            status=FireStatus.PENDING,
        )
        _submit_pending(locked, now, stats)
    fire.refresh_from_db()
    return fire


def schedule_backfill(
    *, schedule: Schedule, start: datetime, end: datetime, now: datetime
) -> list[ScheduleFire]:
    """Fire the schedule's fire times in [start, end] (past times only), oldest first, as the
    tenant's quotas allow. A time that already has a run is not fired again; a time that was
    skipped is fired now. Raises ScheduleError for an empty, future or too long range."""
    if end > now:
        raise ScheduleError("a backfill ends in the past", code="invalid_range")
    if start > end:
        raise ScheduleError("start must not be after end", code="invalid_range")
    if start < EARLIEST_BACKFILL:
        raise ScheduleError("a backfill starts in 2000 or later", code="invalid_range")
    timing = _timing_from(schedule, start)
    times = []
    for fire_at in timing.times_between(start - timedelta(microseconds=1), end):
        times.append(fire_at)
        if len(times) > MAX_BACKFILL:
            raise ScheduleError(
                f"more than {MAX_BACKFILL} fire times in that range", code="invalid_range"
            )
    with transaction.atomic():
        locked = Schedule.objects.select_for_update(of=("self",)).get(pk=schedule.pk)
        existing = {f.fire_at: f for f in locked.fires.filter(fire_at__in=times)}
        fires = []
        for fire_at in times:
            fire = existing.get(fire_at)
            if fire is None:
                fire = ScheduleFire(
                    schedule=locked,
                    tenant_id=locked.tenant_id,
                    fire_at=fire_at,
                    due_at=fire_at,
                    kind=FireKind.BACKFILL,
                    status=FireStatus.PENDING,
                    retry_at=now,
                )
            elif fire.status == FireStatus.SKIPPED:
                fire.kind = FireKind.BACKFILL
                fire.status = FireStatus.PENDING
                fire.reason = f"backfilled after: {fire.reason}"
                fire.code = ""
                fire.retry_at = now
            else:
                continue  # it has a run, or will have one, or could not have one
            fires.append(fire)
        for fire in fires:
            fire.save()
    return fires


def _record_due_times(schedule: Schedule, now: datetime, stats: FireStats) -> None:
    """Record each fire time due by `now`: pending within the catch-up window, skipped
    (`outside_catchup_window`) before it."""
    if schedule.paused or schedule.next_due_at is None or schedule.next_due_at > now:
        return
    timing = timing_of(schedule)
    window = timedelta(seconds=schedule.catchup_window_s)
    fire_at: datetime | None = schedule.next_fire_at
    rows = []
    while fire_at is not None and len(rows) < MATERIALIZE_BATCH:
        due_at = _due(schedule, fire_at)
        if due_at > now:
            break
        fire = ScheduleFire(
            schedule=schedule,
            tenant_id=schedule.tenant_id,
            fire_at=fire_at,
            due_at=due_at,
            kind=FireKind.SCHEDULED,
        )
        if now - due_at > window:
            _mark_skipped(
                fire,
                "outside_catchup_window",
                f"missed: due at {due_at.isoformat()}, reached {now - due_at} later, beyond "
                f"the catch-up window of {schedule.catchup_window_s}s",
            )
            stats.skipped += 1
        else:
            fire.status = FireStatus.PENDING
            fire.retry_at = due_at
        rows.append(fire)
        fire_at = timing.next_after(fire_at)
    # A manual or backfilled fire may already hold one of these times: it is that time's fire.
    ScheduleFire.objects.bulk_create(rows, ignore_conflicts=True)
    schedule.next_fire_at = fire_at
    schedule.next_due_at = _due(schedule, fire_at) if fire_at is not None else None
    schedule.save(update_fields=["next_fire_at", "next_due_at", "updated_at"])


def _mark_skipped(fire: ScheduleFire, code: str, reason: str) -> None:
    fire.status = FireStatus.SKIPPED
    fire.code = code
    fire.reason = reason
    fire.retry_at = None


def _active_runs(schedule: Schedule) -> list[Run]:
    return list(
        Run.objects.filter(schedule_fires__schedule=schedule)
        .exclude(status__in=RUN_FINAL)
        .order_by("created_at")
    )


def _submit_pending(
    schedule: Schedule, now: datetime, stats: FireStats, *, limit: int = SUBMIT_BATCH
) -> bool:
    """Submit the schedule's pending fires, oldest fire time first, by its overlap policy;
    at most `limit` runs. True if it stopped at `limit` with fires left to look at.

    Call inside a transaction holding the schedule's row lock. A fire refused by a quota or
    backpressure stays pending until its `retry_at`, and the fires after it wait behind it
    (fire times start in order).
    """
    pending = list(
        schedule.fires.filter(status=FireStatus.PENDING).order_by("fire_at")[:SUBMIT_BATCH]
    )
    if not pending:
        return False
    submitted = 0
    active = _active_runs(schedule)
    window = timedelta(seconds=schedule.catchup_window_s)
    buffered: ScheduleFire | None = None
    for fire in pending:
        if fire.retry_at is not None and fire.retry_at > now:
            break  # refused until then; later fires keep their order behind it
        if fire.kind == FireKind.SCHEDULED and now - fire.due_at > window:
            _mark_skipped(
                fire,
                "outside_catchup_window",
                f"not started within the catch-up window of {schedule.catchup_window_s}s "
                f"(last: {fire.reason or 'never tried'})",
            )
            fire.save()
            stats.skipped += 1
            continue
        if fire.kind != FireKind.BACKFILL and active:
            policy = schedule.overlap
            previous = ", ".join(str(run.public_id) for run in active)
            if policy == Overlap.SKIP:
                _mark_skipped(fire, "overlap", f"a run of this schedule was active: {previous}")
                fire.save()
                stats.skipped += 1
                continue
            if policy == Overlap.BUFFER_ONE:
                if buffered is not None:
                    _mark_skipped(
                        fire,
                        "overlap_buffer_full",
                        f"a run of this schedule was active ({previous}) and the fire of "
                        f"{buffered.fire_at.isoformat()} already waits for it to end",
                    )
                    stats.skipped += 1
                else:
                    buffered = fire
                    fire.code = "waiting_for_run"
                    fire.reason = f"waits for the active run to end: {previous}"
                    fire.retry_at = now
                fire.save()
                continue
            if policy == Overlap.CANCEL_PREVIOUS:
                for run in active:
                    try:
                        run_cancel(
                            run=run,
                            reason=f"cancelled by schedule {schedule.name!r}: a newer fire "
                            f"({fire.fire_at.isoformat()}) started",
                            by=f"schedule:{schedule.public_id}",
                        )
                    except RunError:
                        pass  # it ended meanwhile
                active = []
        if buffered is not None:
            # A fire that waits for the active run: no later fire may start before it.
            _mark_skipped(fire, "overlap_buffer_full", "another fire waits for the active run")
            fire.save()
            stats.skipped += 1
            continue
        if submitted == limit:
            return True
        outcome = _fire_submit(schedule, fire, now)
        if outcome == "refused":
            stats.refused += 1
            return False
        if outcome == "failed":
            stats.failed += 1
            continue
        stats.submitted += 1
        submitted += 1
        active.append(fire.run)
    return False


def _fire_submit(schedule: Schedule, fire: ScheduleFire, now: datetime) -> str:
    """Submit `fire`'s run and record the outcome on `fire`: submitted, refused or failed."""
    tenant = schedule.tenant
    version = job_selectors.workflow_version_for(
        tenant=tenant, name=schedule.workflow.name, version=schedule.version
    )
    if version is None:
        return _fail(fire, "workflow_missing", f"workflow version {schedule.version} not found")
    try:
        run_input = templating.render(schedule.input, _fire_context(schedule, fire))
    except TemplateError as exc:
        return _fail(fire, "template_error", f"input: {exc}")
    if not isinstance(run_input, dict):
        return _fail(fire, "invalid_input", "the rendered input is not an object")
    identity = {"schedule": str(schedule.public_id), "fire_at": fire.fire_at.isoformat()}
    try:
        with transaction.atomic():
            submission = run_submit(
                tenant=tenant,
                version=version,
                input=run_input,
                lane=schedule.lane or None,
                idempotency_key=fire_idempotency_key(schedule, fire.fire_at),
                request_hash=request_fingerprint(identity),
            )
    except Backpressure as exc:
        fire.attempts += 1
        fire.code = exc.code
        fire.reason = f"refused (attempt {fire.attempts}): {exc.message}"
        fire.retry_at = now + timedelta(seconds=exc.retry_after)
        fire.save()
        return "refused"
    except RunError as exc:
        return _fail(fire, exc.code, exc.message)
    fire.attempts += 1
    fire.status = FireStatus.SUBMITTED
    fire.run = submission.run
    fire.submitted_at = now
    fire.retry_at = None
    if fire.code == "waiting_for_run":
        fire.code = ""
    fire.save()
    return "submitted"


def _fail(fire: ScheduleFire, code: str, reason: str) -> str:
    fire.status = FireStatus.FAILED
    fire.code = code
    fire.reason = reason
    fire.retry_at = None
    fire.save()
    return "failed"


def _fire_context(schedule: Schedule, fire: ScheduleFire) -> dict[str, Any]:
    local = fire.fire_at.astimezone(timing_of(schedule).zone())
    return {
        "fire": {
            "time": local.isoformat(),
            "utc": fire.fire_at.astimezone(UTC).isoformat(),
            "date": local.date().isoformat(),
            "timestamp": int(fire.fire_at.timestamp()),
            "kind": fire.kind,
        },
        "schedule": {"id": str(schedule.public_id), "name": schedule.name},
    }
