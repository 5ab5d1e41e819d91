"""When schedules fire: cron in a time zone across DST changes, intervals, end dates, jitter."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from schedules.timing import Timing, TimingError, jitter_of

BERLIN = ZoneInfo("Europe/Berlin")
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def cron(expr: str, zone: str = "Europe/Berlin", **fields) -> Timing:
    return Timing(cron=expr, timezone=zone, interval_s=None, starts_at=EPOCH, **fields)


def local(times) -> list[str]:
    return [t.astimezone(BERLIN).isoformat() for t in times]


def test_a_daily_time_that_spring_forward_skips_fires_once_right_after_the_gap():
    timing = cron("30 2 * * *")
    start = datetime(2026, 3, 27, 12, tzinfo=BERLIN)
    times = list(timing.times_between(start, start + timedelta(days=3)))
    assert local(times) == [
        "2026-03-28T02:30:00+01:00",
        "2026-03-29T03:00:00+02:00",  # 02:30 does not exist that night
        "2026-03-30T02:30:00+02:00",
    ]


def test_a_daily_time_that_fall_back_repeats_fires_once():
    timing = cron("30 2 * * *")
    start = datetime(2026, 10, 24, 12, tzinfo=BERLIN)
    times = list(timing.times_between(start, start + timedelta(days=2)))
    assert local(times) == ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"]
    # 25 hours apart in real time: the repeated hour is not fired twice.
    assert times[1] - times[0] == timedelta(hours=25)


def test_an_hourly_schedule_fires_in_both_repeated_hours_and_never_twice_at_one_instant():
    timing = cron("0 * * * *")
    start = datetime(2026, 10, 25, 0, 30, tzinfo=BERLIN)
    times = list(timing.times_between(start, start.astimezone(UTC) + timedelta(hours=5)))
    assert local(times) == [
        "2026-10-25T01:00:00+02:00",
        "2026-10-25T02:00:00+02:00",
        "2026-10-25T02:00:00+01:00",
        "2026-10-25T03:00:00+01:00",
        "2026-10-25T04:00:00+01:00",
    ]
    assert all(b - a == timedelta(hours=1) for a, b in itertools.pairwise(times))


def test_an_hourly_schedule_loses_the_hour_that_spring_forward_removes():
    timing = cron("0 * * * *")
    start = datetime(2026, 3, 29, 0, 30, tzinfo=BERLIN)
    times = list(timing.times_between(start, start.astimezone(UTC) + timedelta(hours=3)))
    assert local(times) == [
        "2026-03-29T01:00:00+01:00",
        "2026-03-29T03:00:00+02:00",
        "2026-03-29T04:00:00+02:00",
    ]


def test_the_next_fire_after_a_fire_time_is_the_following_one():
    timing = cron("*/15 * * * *", zone="UTC")
    at = datetime(2026, 5, 1, 10, 15, tzinfo=UTC)
    assert timing.next_after(at) == datetime(2026, 5, 1, 10, 30, tzinfo=UTC)
    assert timing.next_after(at - timedelta(microseconds=1)) == at


def test_last_day_of_month_and_nth_weekday():
    last = cron("0 9 L * *", zone="UTC")
    assert last.next_after(datetime(2026, 2, 3, tzinfo=UTC)) == datetime(2026, 2, 28, 9, tzinfo=UTC)
    second_tuesday = cron("0 9 * * 2#2", zone="UTC")
    assert second_tuesday.next_after(datetime(2026, 6, 1, tzinfo=UTC)) == datetime(
        2026, 6, 9, 9, tzinfo=UTC
    )


def test_an_interval_counts_from_its_start():
    timing = Timing(cron="", timezone="UTC", interval_s=600, starts_at=EPOCH)
    assert timing.next_after(EPOCH - timedelta(days=1)) == EPOCH
    assert timing.next_after(EPOCH) == EPOCH + timedelta(minutes=10)
    assert timing.next_after(EPOCH + timedelta(minutes=25)) == EPOCH + timedelta(minutes=30)


def test_no_fire_after_the_end():
    timing = cron("0 0 * * *", zone="UTC", ends_at=datetime(2026, 1, 3, tzinfo=UTC))
    times = list(timing.times_between(EPOCH, EPOCH + timedelta(days=10)))
    assert times == [datetime(2026, 1, 2, tzinfo=UTC), datetime(2026, 1, 3, tzinfo=UTC)]
    assert timing.next_after(datetime(2026, 1, 3, tzinfo=UTC)) is None


@pytest.mark.parametrize(
    "timing, message",
    [
        (cron("61 * * * *"), "invalid cron expression"),
        (cron("0 * * * *", zone="Mars/Olympus"), "unknown time zone"),
        (Timing(cron="0 * * * *", timezone="UTC", interval_s=60, starts_at=EPOCH), "not both"),
        (Timing(cron="", timezone="UTC", interval_s=None, starts_at=EPOCH), "not both"),
    ],
)
def test_unusable_timings_are_refused(timing, message):
    with pytest.raises(TimingError, match=message):
        timing.check()


def test_jitter_is_the_same_in_every_process_and_within_bounds():
    at = datetime(2026, 5, 1, tzinfo=UTC)
    delays = {jitter_of("s1", at + timedelta(minutes=n), 30) for n in range(50)}
    assert all(timedelta(0) <= d < timedelta(seconds=30) for d in delays)
    assert len(delays) > 10  # spread out, not one constant
    assert jitter_of("s1", at, 30) == jitter_of("s1", at, 30)
    assert jitter_of("s1", at, 0) == timedelta(0)
