"""Firing schedules against the real PostgreSQL, with a controlled clock (`now` given to every
call): fire times across DST, each overlap policy, the catch-up window, quotas, backfill,
trigger now, pause and end (docs/schedules.md)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from jobs.models import Run, RunStatus, WorkflowVersion
from jobs.services.submission import (
    platform_backlog_cache_clear,
    request_fingerprint,
    run_submit,
)
from jobs.services.workflows import workflow_version_create
from jobs.transitions.runs import run_cancel
from schedules.models import FireStatus, ScheduleFire
from schedules.services import (
    ScheduleError,
    fire_idempotency_key,
    schedule_backfill,
    schedule_create,
    schedule_fire_now,
    schedule_pause,
    schedule_resume,
    schedule_update,
    schedules_fire_due,
)
from schedules.timing import jitter_of
from tests.support.workflows import tool_step

BERLIN = ZoneInfo("Europe/Berlin")
T0 = datetime(2026, 5, 4, 8, 0, tzinfo=UTC)


class Clock:
    """The time every call of a test is given: real time, in UTC (an hour added to a Berlin
    wall-clock time on the night of a fall-back would skip the repeated hour)."""

    def __init__(self, start: datetime):
        self.now = start.astimezone(UTC)

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def nightly(owner):
    workflow_version_create(
        tenant=owner.tenant,
        document={
            "name": "nightly",
            "input_schema": {"type": "object", "required": ["day"]},
            "steps": [tool_step("report", "echo", args={"day": "{{ input.day }}"})],
        },
    )
    return owner.tenant


def every_minute(tenant, clock, **fields):
    fields.setdefault("input", {"day": "{{ fire.date }}", "at": "{{ fire.time }}"})
    return schedule_create(
        tenant=tenant,
        name=fields.pop("name", "minutely"),
        workflow="nightly",
        now=clock.now,
        cron=fields.pop("cron", "* * * * *"),
        **fields,
    )


def fires(schedule) -> list[ScheduleFire]:
    return list(ScheduleFire.objects.filter(schedule=schedule).order_by("fire_at"))


def statuses(schedule) -> list[tuple[str, str]]:
    return [(f.fire_at.strftime("%H:%M"), f.status, f.code) for f in fires(schedule)]


def runs_of(schedule) -> list[Run]:
    return list(Run.objects.filter(schedule_fires__schedule=schedule).order_by("created_at"))


def end_runs(schedule) -> None:
    for run in runs_of(schedule):
        if not run.is_final:
            run_cancel(run=run, reason="test: the run ended")


# --- fire times ---------------------------------------------------------------------------------


def test_each_due_fire_time_becomes_one_run_with_its_templated_input(nightly, clock):
    schedule = every_minute(nightly, clock, overlap="allow_all", timezone="Europe/Berlin")
    assert schedules_fire_due(now=clock.now).submitted == 0  # 08:00:00 itself is not after now

    clock.advance(minutes=2, seconds=5)
    stats = schedules_fire_due(now=clock.now)
    schedules_fire_due(now=clock.now)  # again at the same instant: nothing more

    assert stats.submitted == 2
    assert [s[:2] for s in statuses(schedule)] == [("08:01", "submitted"), ("08:02", "submitted")]
    first = fires(schedule)[0].run
    assert first.input == {"day": "2026-05-04", "at": "2026-05-04T10:01:00+02:00"}
    assert first.idempotency_key == f"schedule:{schedule.public_id}:2026-05-04T08:01:00+00:00"
    assert len(runs_of(schedule)) == 2


def test_berlin_fire_times_across_spring_forward_and_fall_back(nightly):
    spring = Clock(datetime(2026, 3, 28, 12, tzinfo=BERLIN))
    schedule = schedule_create(
        tenant=nightly,
        name="daily-0230",
        workflow="nightly",
        now=spring.now,
        cron="30 2 * * *",
        timezone="Europe/Berlin",
        overlap="allow_all",
        input={"day": "{{ fire.date }}"},
    )
    for _ in range(3 * 24):
        schedules_fire_due(now=spring.advance(hours=1))
    fall = Clock(datetime(2026, 10, 24, 12, tzinfo=BERLIN))
    schedule_pause(schedule=schedule, now=spring.now)
    schedule_resume(schedule=schedule, now=fall.now)  # plans its next fire from then
    for _ in range(3 * 24):
        schedules_fire_due(now=fall.advance(hours=1))

    local = [f.fire_at.astimezone(BERLIN).isoformat() for f in fires(schedule)]
    assert local == [
        "2026-03-29T03:00:00+02:00",  # no 02:30 that night: once, right after the gap
        "2026-03-30T02:30:00+02:00",
        "2026-03-31T02:30:00+02:00",
        "2026-10-25T02:30:00+02:00",  # 02:30 happens twice that night: fired once
        "2026-10-26T02:30:00+01:00",
        "2026-10-27T02:30:00+01:00",
    ]
    assert [(f.status, f.reason) for f in fires(schedule)] == [(FireStatus.SUBMITTED, "")] * 6
    assert [r.input["day"] for r in runs_of(schedule)][:2] == ["2026-03-29", "2026-03-30"]


# --- the catch-up window -------------------------------------------------------------------------


def test_after_downtime_times_within_the_window_fire_and_older_ones_are_recorded_as_skipped(
    nightly, clock
):
    schedule = every_minute(nightly, clock, overlap="allow_all", catchup_window_s=180)
    clock.advance(minutes=10, seconds=30)  # the scheduler was down for ten minutes

    stats = schedules_fire_due(now=clock.now)

    assert stats.skipped == 7 and stats.submitted == 3
    assert [s[:2] for s in statuses(schedule)] == [
        *[(f"08:{m:02d}", "skipped") for m in range(1, 8)],
        ("08:08", "submitted"),
        ("08:09", "submitted"),
        ("08:10", "submitted"),
    ]
    skipped = fires(schedule)[0]
    assert skipped.code == "outside_catchup_window" and skipped.run is None
    assert "beyond the catch-up window of 180s" in skipped.reason
    assert len(runs_of(schedule)) == 3


# --- overlap policies -------------------------------------------------------------------------


def test_overlap_skip_records_the_fire_and_starts_nothing_while_a_run_is_active(nightly, clock):
    schedule = every_minute(nightly, clock, overlap="skip")
    schedules_fire_due(now=clock.advance(minutes=1))
    schedules_fire_due(now=clock.advance(minutes=1))
    end_runs(schedule)
    schedules_fire_due(now=clock.advance(minutes=1))

    assert statuses(schedule) == [
        ("08:01", "submitted", ""),
        ("08:02", "skipped", "overlap"),
        ("08:03", "submitted", ""),
    ]
    assert str(runs_of(schedule)[0].public_id) in fires(schedule)[1].reason
    assert len(runs_of(schedule)) == 2


def test_overlap_buffer_one_keeps_one_fire_until_the_run_ends_and_skips_the_rest(nightly, clock):
    schedule = every_minute(nightly, clock, overlap="buffer_one")
    schedules_fire_due(now=clock.advance(minutes=1))
    schedules_fire_due(now=clock.advance(minutes=1))
    schedules_fire_due(now=clock.advance(minutes=1))
    assert statuses(schedule) == [
        ("08:01", "submitted", ""),
        ("08:02", "pending", "waiting_for_run"),
        ("08:03", "skipped", "overlap_buffer_full"),
    ]

    end_runs(schedule)
    schedules_fire_due(now=clock.advance(seconds=5))

    assert [s[:2] for s in statuses(schedule)] == [
        ("08:01", "submitted"),
        ("08:02", "submitted"),
        ("08:03", "skipped"),
    ]
    buffered = fires(schedule)[1]
    assert buffered.run.status == RunStatus.ACCEPTED
    assert buffered.lateness_s == pytest.approx(65)
    assert len(runs_of(schedule)) == 2


def test_overlap_allow_all_starts_every_fire(nightly, clock):
    schedule = every_minute(nightly, clock, overlap="allow_all")
    for _ in range(3):
        schedules_fire_due(now=clock.advance(minutes=1))
    runs = runs_of(schedule)
    assert len(runs) == 3 and all(not run.is_final for run in runs)


def test_overlap_cancel_previous_cancels_the_active_run_then_starts(nightly, clock):
    schedule = every_minute(nightly, clock, overlap="cancel_previous")
    schedules_fire_due(now=clock.advance(minutes=1))
    schedules_fire_due(now=clock.advance(minutes=1))

    first, second = runs_of(schedule)
    assert first.status == RunStatus.CANCELLED
    assert "a newer fire (2026-05-04T08:02:00+00:00) started" in first.error
    assert second.status == RunStatus.ACCEPTED


# --- quotas and backpressure ---------------------------------------------------------------------


def test_a_fire_refused_by_the_queued_runs_quota_is_recorded_and_retried(nightly, clock, settings):
    settings.SWITCHYARD_API_RETRY_AFTER_S = 30
    nightly.max_queued_runs = 1
    nightly.save()
    schedule = every_minute(nightly, clock, overlap="allow_all")
    schedules_fire_due(now=clock.advance(minutes=1))
    stats = schedules_fire_due(now=clock.advance(minutes=1))

    refused = fires(schedule)[1]
    assert stats.refused == 1
    assert (refused.status, refused.code) == ("pending", "queued_runs_quota_full")
    assert refused.attempts == 1 and "max_queued_runs" in refused.reason
    assert refused.retry_at == clock.now + timedelta(seconds=30)

    end_runs(schedule)  # the quota has room again
    schedules_fire_due(now=clock.advance(seconds=10))
    assert fires(schedule)[1].status == "pending"  # not before its retry time
    schedules_fire_due(now=clock.advance(seconds=25))

    retried = fires(schedule)[1]
    assert retried.status == "submitted" and retried.attempts == 2
    assert len(runs_of(schedule)) == 2


def test_a_fire_refused_past_its_catch_up_window_is_skipped_with_the_refusal(
    nightly, clock, settings
):
    settings.SWITCHYARD_API_RETRY_AFTER_S = 30
    nightly.max_queued_runs = 1
    nightly.save()
    schedule = every_minute(nightly, clock, overlap="allow_all", catchup_window_s=60)
    schedules_fire_due(now=clock.advance(minutes=1))
    schedules_fire_due(now=clock.advance(seconds=30))
    schedules_fire_due(now=clock.advance(seconds=40))  # 08:02's first attempt: refused
    schedules_fire_due(now=clock.advance(seconds=70))  # past 08:02 + 60 s

    fire = next(f for f in fires(schedule) if f.fire_at.minute == 2)
    assert (fire.status, fire.code) == ("skipped", "outside_catchup_window")
    assert "max_queued_runs" in fire.reason


# --- operators: trigger now, pause, resume, end, backfill ---------------------------------------


def test_trigger_now_starts_a_run_at_once_and_pause_stops_scheduled_fires(nightly, clock):
    schedule = every_minute(nightly, clock, overlap="allow_all", input={"day": "{{ fire.kind }}"})
    schedule_pause(schedule=schedule, now=clock.now)
    fire = schedule_fire_now(schedule=schedule, now=clock.advance(seconds=10))
    assert fire.status == "submitted" and fire.run.input == {"day": "manual"}

    schedules_fire_due(now=clock.advance(minutes=5))
    assert [f.kind for f in fires(schedule)] == ["manual"]  # nothing while paused

    schedule_resume(schedule=schedule, now=clock.now)
    schedules_fire_due(now=clock.advance(minutes=1))
    assert [f.kind for f in fires(schedule)] == ["manual", "scheduled"]
    assert fires(schedule)[1].fire_at == datetime(2026, 5, 4, 8, 6, tzinfo=UTC)


def test_no_fire_after_the_end_date(nightly, clock):
    schedule = every_minute(nightly, clock, overlap="allow_all", ends_at=T0 + timedelta(minutes=2))
    schedules_fire_due(now=clock.advance(minutes=10))
    assert len(fires(schedule)) == 2
    schedule.refresh_from_db()
    assert schedule.next_fire_at is None


def test_backfill_fires_past_times_in_order_once_and_refills_skipped_ones(nightly, clock):
    schedule = every_minute(nightly, clock, overlap="skip", catchup_window_s=60)
    clock.advance(minutes=5, seconds=30)
    schedules_fire_due(now=clock.now)  # 08:01-08:04 skipped (window), 08:05 submitted
    assert [s[1] for s in statuses(schedule)] == ["skipped"] * 4 + ["submitted"]

    created = schedule_backfill(
        schedule=schedule,
        start=T0 + timedelta(minutes=2),
        end=T0 + timedelta(minutes=5),
        now=clock.now,
    )
    assert [f.fire_at.minute for f in created] == [2, 3, 4]  # 08:05 already has its run
    schedules_fire_due(now=clock.advance(seconds=1))

    assert [s[1] for s in statuses(schedule)] == ["skipped"] + ["submitted"] * 4
    backfilled = [f for f in fires(schedule) if f.kind == "backfill"]
    assert [f.run.input["at"][11:16] for f in backfilled] == ["08:02", "08:03", "08:04"]
    order = [f.run.created_at for f in backfilled]
    assert order == sorted(order)
    assert len(runs_of(schedule)) == 4


def test_backfill_refuses_future_and_oversized_ranges(nightly, clock):
    schedule = every_minute(nightly, clock)
    with pytest.raises(ScheduleError, match="in the past"):
        schedule_backfill(schedule=schedule, start=T0, end=T0 + timedelta(hours=1), now=clock.now)
    with pytest.raises(ScheduleError, match="more than 1000"):
        schedule_backfill(schedule=schedule, start=T0 - timedelta(days=2), end=T0, now=clock.now)


def test_a_schedule_with_bad_timing_or_input_is_refused(nightly, clock):
    with pytest.raises(ScheduleError, match="invalid cron expression"):
        every_minute(nightly, clock, cron="0 0 31 4 *")
    with pytest.raises(ScheduleError, match="a cron expression has five fields"):
        every_minute(nightly, clock, cron="every day")
    with pytest.raises(ScheduleError, match=r"unknown name .steps.; templates see fire, schedule"):
        every_minute(nightly, clock, input={"day": "{{ steps.x.output }}"})


def test_a_fire_whose_input_the_workflow_refuses_is_recorded_as_failed(nightly, clock):
    schedule = every_minute(nightly, clock, input={"other": 1})
    schedules_fire_due(now=clock.advance(minutes=1))
    [fire] = fires(schedule)
    assert (fire.status, fire.code, fire.run) == ("failed", "invalid_input", None)


def test_a_jittered_fire_is_due_at_its_fire_time_plus_its_jitter_in_every_process(nightly, clock):
    schedule = every_minute(nightly, clock, overlap="allow_all", jitter_s=30)
    fire_at = T0 + timedelta(minutes=1)
    due_at = fire_at + jitter_of(str(schedule.public_id), fire_at, 30)
    assert due_at > fire_at  # this schedule's first fire has a jitter (not 0)

    schedules_fire_due(now=due_at - timedelta(milliseconds=1))
    assert fires(schedule) == []
    schedules_fire_due(now=due_at)

    [fire] = fires(schedule)
    assert (fire.fire_at, fire.due_at, fire.status) == (fire_at, due_at, "submitted")
    assert fire.run.input["at"] == "2026-05-04T08:01:00+00:00"  # the fire time, not the jitter


def test_a_fire_refused_by_the_platform_backlog_waits_and_its_successors_keep_their_order(
    nightly, clock, settings
):
    settings.SWITCHYARD_API_RETRY_AFTER_S = 20
    settings.SWITCHYARD_PLATFORM_MAX_BACKLOG = 0  # every submission is refused
    platform_backlog_cache_clear()
    schedule = every_minute(nightly, clock, overlap="allow_all")
    schedules_fire_due(now=clock.advance(minutes=2))
    assert statuses(schedule) == [
        ("08:01", "pending", "platform_backlog_full"),
        ("08:02", "pending", ""),  # waits behind 08:01
    ]

    settings.SWITCHYARD_PLATFORM_MAX_BACKLOG = 100_000
    platform_backlog_cache_clear()
    schedules_fire_due(now=clock.advance(seconds=20))

    submitted = fires(schedule)
    assert [f.status for f in submitted] == ["submitted", "submitted"]
    assert submitted[0].run.created_at < submitted[1].run.created_at


def test_a_backfill_waits_for_the_quota_in_order_and_never_expires(nightly, clock, settings):
    settings.SWITCHYARD_API_RETRY_AFTER_S = 30
    nightly.max_queued_runs = 1
    nightly.save()
    schedule = every_minute(nightly, clock, overlap="allow_all", catchup_window_s=60)
    schedule_pause(schedule=schedule, now=clock.now)
    clock.advance(hours=1)
    schedule_backfill(
        schedule=schedule,
        start=T0 + timedelta(minutes=1),
        end=T0 + timedelta(minutes=3),
        now=clock.now,
    )
    schedules_fire_due(now=clock.advance(seconds=1))
    assert statuses(schedule) == [
        ("08:01", "submitted", ""),
        ("08:02", "pending", "queued_runs_quota_full"),
        ("08:03", "pending", ""),
    ]
    for _ in range(2):  # each time the quota has room for one more run
        end_runs(schedule)
        schedules_fire_due(now=clock.advance(hours=2))  # far past any catch-up window

    assert [s[1] for s in statuses(schedule)] == ["submitted"] * 3
    runs = [f.run for f in fires(schedule)]
    assert [r.created_at for r in runs] == sorted(r.created_at for r in runs)


def test_a_change_of_timing_or_a_pause_first_records_the_times_already_due(nightly, clock):
    """No sweep ran for three minutes (a slow scheduler); then the timing changes: the three
    due times are not lost to the change."""
    schedule = every_minute(nightly, clock, overlap="allow_all")
    schedule_update(schedule=schedule, now=clock.advance(minutes=3, seconds=10), cron="0 * * * *")
    schedules_fire_due(now=clock.advance(seconds=1))
    assert [s[:2] for s in statuses(schedule)] == [
        ("08:01", "submitted"),
        ("08:02", "submitted"),
        ("08:03", "submitted"),
    ]
    schedule.refresh_from_db()
    assert schedule.next_fire_at == datetime(2026, 5, 4, 9, 0, tzinfo=UTC)

    schedule_update(schedule=schedule, now=clock.now, cron="* * * * *")
    schedule_pause(schedule=schedule, now=clock.advance(minutes=2))
    schedules_fire_due(now=clock.advance(minutes=5))
    assert [s[0] for s in statuses(schedule)][3:] == ["08:04", "08:05"]  # then nothing


def test_a_fire_time_whose_run_already_exists_gets_that_run_not_a_second(nightly, clock):
    """The idempotency key is the second guard: if a fire time's run exists (a submission
    whose commit was acknowledged to nobody, a failover), firing that time replays it."""
    schedule = every_minute(nightly, clock, overlap="allow_all")
    fire_at = T0 + timedelta(minutes=1)
    earlier = run_submit(
        tenant=nightly,
        version=WorkflowVersion.objects.get(workflow__name="nightly"),
        input={"day": "2026-05-04"},
        idempotency_key=fire_idempotency_key(schedule, fire_at),
        request_hash=request_fingerprint(
            {"schedule": str(schedule.public_id), "fire_at": fire_at.isoformat()}
        ),
    ).run

    schedules_fire_due(now=clock.advance(minutes=1))

    [fire] = fires(schedule)
    assert fire.status == "submitted" and fire.run == earlier
    assert Run.objects.filter(tenant=nightly).count() == 1
