"""Exactly one run per fire time with real scheduler processes: two schedulers firing the same
schedules at once, and a scheduler killed with SIGKILL in the middle of a fire (its
transaction open, its fire rows and run written but not committed) and replaced; and
`buffer_one` with a real worker running the runs.

Each schedule fires every second; afterwards every fire time from the first to the last must
be there once, submitted, with a run of its own, and the tenant must have no other run.
"""

from __future__ import annotations

import itertools
import signal
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from jobs.models import Run
from jobs.services.workflows import workflow_version_create
from schedules.models import FireStatus, ScheduleFire
from schedules.services import (
    fire_idempotency_key,
    schedule_create,
    schedule_pause,
    schedules_fire_due,
)
from tests.support.stall import backends_alive, stop_inside_transaction
from tests.support.workflows import tool_step

pytestmark = pytest.mark.cluster

SCHEDULES = 12


@pytest.fixture
def every_second(owner):
    """SCHEDULES schedules of one tenant, each firing every second from now."""
    workflow_version_create(
        tenant=owner.tenant,
        document={"name": "tick", "steps": [tool_step("t", "echo", args={})]},
    )
    now = timezone.now()
    return [
        schedule_create(
            tenant=owner.tenant,
            name=f"tick-{number}",
            workflow="tick",
            now=now,
            interval_s=1,
            overlap="allow_all",
            input={"at": "{{ fire.utc }}"},
        )
        for number in range(SCHEDULES)
    ]


def assert_each_fire_time_has_exactly_one_run(schedules, *, fired_until) -> int:
    """Every fire time of each schedule, from its first to `fired_until` (less a margin for a
    sweep slowed by a busy machine), is recorded once, submitted, with its own run; returns
    the number of runs."""
    total = 0
    for schedule in schedules:
        fires = list(ScheduleFire.objects.filter(schedule=schedule).order_by("fire_at"))
        times = [fire.fire_at for fire in fires]
        first = schedule.next_fire_at  # as planned at creation
        expected = [first + timedelta(seconds=n) for n in range(len(times))]
        assert times == expected, f"{schedule.name}: fire times with a gap or a repeat"
        assert times[-1] >= fired_until - timedelta(seconds=4), f"{schedule.name} fell behind"
        wrong = [(f.fire_at, f.status, f.code, f.reason) for f in fires if f.status != "submitted"]
        assert not wrong, f"{schedule.name}: fires not submitted: {wrong[:3]}"
        runs = Run.objects.filter(schedule_fires__schedule=schedule)
        assert runs.count() == len(fires)
        for fire in fires:
            assert fire.run.idempotency_key == fire_idempotency_key(schedule, fire.fire_at)
            assert fire.run.input == {"at": fire.fire_at.isoformat()}
        total += len(fires)
    tenant = schedules[0].tenant
    assert Run.objects.filter(tenant=tenant).count() == total, "a run without its fire"
    return total


def test_two_schedulers_fire_each_fire_time_once(cluster, every_second):
    first = cluster.start_scheduler("scheduler-1")
    second = cluster.start_scheduler("scheduler-2")
    # Both fire for a while once they have started (which a loaded machine may take seconds to
    # do): every schedule fired at least once, then 6 s more.
    cluster.wait_until(
        lambda: (
            ScheduleFire.objects.filter(status=FireStatus.SUBMITTED)
            .values("schedule")
            .distinct()
            .count()
            == SCHEDULES
        ),
        timeout=60,
        message="the schedulers did not fire every schedule",
        proc=first,
    )
    time.sleep(6)
    stopping_at = timezone.now()
    cluster.stop(first)
    cluster.stop(second)

    runs = assert_each_fire_time_has_exactly_one_run(every_second, fired_until=stopping_at)
    assert runs >= SCHEDULES * 5
    for proc in (first, second):
        assert "firing failed" not in proc.log(), proc.log()[-2000:]


def test_a_scheduler_killed_mid_fire_leaves_no_fire_half_done_and_none_lost(cluster, every_second):
    doomed = cluster.start_scheduler("doomed")
    cluster.wait_until(
        lambda: ScheduleFire.objects.filter(status=FireStatus.SUBMITTED).count() >= SCHEDULES,
        timeout=30,
        message="the scheduler did not fire",
        proc=doomed,
    )

    def mid_fire(held) -> bool:
        return held.writes("schedules_schedulefire") and held.writes("jobs_run")

    held = stop_inside_transaction(doomed.pid, timeout=30, prefer=mid_fire)
    assert any(mid_fire(h) for h in held), f"not stopped inside a fire: {held}"
    cluster.kill(doomed, signal.SIGKILL)
    cluster.wait_until(
        lambda: not backends_alive([h.backend_pid for h in held]),
        timeout=10,
        message="PostgreSQL kept the killed scheduler's transaction",
    )

    replacement = cluster.start_scheduler("replacement")
    time.sleep(5)
    stopping_at = timezone.now()
    cluster.stop(replacement)
    # A scheduler stopped inside a sweep may leave the fire times it recorded pending (due,
    # not submitted yet): the next sweep of any scheduler submits them, as this one does.
    schedules_fire_due(now=stopping_at)

    assert_each_fire_time_has_exactly_one_run(every_second, fired_until=stopping_at)


def test_buffer_one_with_real_workers_never_overlaps_runs_and_keeps_one_fire_waiting(
    cluster, owner
):
    """A run takes about 2.5 s and the schedule fires every second: under `buffer_one` each
    run starts after the previous one ended, one fire waits for it, the others are skipped."""
    workflow_version_create(
        tenant=owner.tenant,
        document={
            "name": "slow",
            "steps": [tool_step("work", "test.count", args={"key": "slow", "sleep_ms": 2500})],
        },
    )
    schedule = schedule_create(
        tenant=owner.tenant,
        name="slow-every-second",
        workflow="slow",
        now=timezone.now(),
        interval_s=1,
        overlap="buffer_one",
    )
    cluster.start_scheduler()
    cluster.start_worker("steps.tool", pool="threads", concurrency=4)
    cluster.wait_until(
        lambda: Run.objects.filter(tenant=owner.tenant, status="succeeded").count() >= 3,
        timeout=40,
        message="three runs did not finish",
    )
    schedule_pause(schedule=schedule, now=timezone.now())
    # The times the pause recorded are looked at by the next sweep.
    cluster.wait_until(
        lambda: (
            not ScheduleFire.objects.filter(schedule=schedule, status="pending", code="")
            .exclude(code="waiting_for_run")
            .exists()
        ),
        timeout=10,
        message="the fires recorded by the pause were not looked at",
    )

    fires = list(ScheduleFire.objects.filter(schedule=schedule).order_by("fire_at"))
    runs = [fire.run for fire in fires if fire.run is not None]
    ended = [run for run in runs if run.finished_at is not None]
    for previous, following in itertools.pairwise(runs):
        assert previous.finished_at is not None
        assert following.created_at >= previous.finished_at, "two runs of the schedule overlap"
    assert len(ended) >= 3
    skipped = [f for f in fires if f.status == "skipped"]
    assert skipped and {f.code for f in skipped} == {"overlap_buffer_full"}
    assert sum(f.status == "pending" for f in fires) <= 1
