"""When a schedule fires: cron expressions in a time zone (cronsim) or fixed intervals, and
each fire time's jitter. Pure: no ORM, so the DST and catch-up rules are unit-tested alone.

Fire times are instants (aware datetimes, stored in UTC). A cron expression is read in the
schedule's time zone, with cronsim's rules at DST changes: a time that a spring-forward skips
fires once, at the first instant after the gap (02:30 on the day Berlin jumps from 02:00 to
03:00 fires at 03:00); a time that a fall-back repeats fires once, at its first occurrence,
unless the expression names every hour (`0 * * * *` fires at both 02:00s).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError


class TimingError(ValueError):
    """A schedule's cron expression, time zone or interval is not usable."""


@dataclass(frozen=True)
class Timing:
    cron: str
    timezone: str
    interval_s: int | None
    starts_at: datetime
    ends_at: datetime | None = None

    def zone(self) -> ZoneInfo:
        return zone_of(self.timezone)

    def check(self) -> None:
        """Raise TimingError unless exactly one of cron / interval is set and each is valid."""
        if bool(self.cron) == bool(self.interval_s):
            raise TimingError("give either a cron expression or an interval_s, not both")
        zone = self.zone()
        if self.cron:
            if len(self.cron.split()) != 5:
                raise TimingError(f"a cron expression has five fields, got {self.cron!r}")
            try:
                CronSim(self.cron, self.starts_at.astimezone(zone))
            except CronSimError as exc:
                raise TimingError(f"invalid cron expression {self.cron!r}: {exc}") from None

    def next_after(self, instant: datetime) -> datetime | None:
        """The first fire time strictly after `instant` (and not before `starts_at`), or None
        if it would fall after `ends_at`."""
        start = max(instant, self.starts_at - timedelta(microseconds=1))
        if self.cron:
            # cronsim yields the times strictly after its start, and keeps `fold` (which of a
            # fall-back's two 02:30s `start` is), so the repeated hour is neither lost nor
            # fired twice.
            following = next(CronSim(self.cron, start.astimezone(self.zone()))).astimezone(UTC)
        else:
            assert self.interval_s
            elapsed = (start - self.starts_at).total_seconds()
            steps = max(0, math.floor(elapsed / self.interval_s) + 1)
            following = self.starts_at + timedelta(seconds=steps * self.interval_s)
        if self.ends_at is not None and following > self.ends_at:
            return None
        return following

    def times_between(self, after: datetime, until: datetime) -> Iterator[datetime]:
        """Fire times in (after, until], in order."""
        current = self.next_after(after)
        while current is not None and current <= until:
            yield current
            current = self.next_after(current)


def zone_of(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise TimingError(f"unknown time zone {name!r}") from None


def jitter_of(schedule_key: str, fire_at: datetime, jitter_s: int) -> timedelta:
    """A delay in [0, jitter_s) derived from the schedule and the fire time: every scheduler
    process computes the same one, so a fire's due time never depends on which one fires it."""
    if jitter_s <= 0:
        return timedelta(0)
    digest = hashlib.sha256(f"{schedule_key}:{fire_at.isoformat()}".encode()).digest()
    millis = int.from_bytes(digest[:8], "big") % (jitter_s * 1000)
    return timedelta(milliseconds=millis)
