"""Reads of schedules, fires and events, always scoped to the caller's tenant (the API) or
explicitly platform-wide (the operators' dashboard, the metrics)."""

from __future__ import annotations

import uuid

from django.db.models import Prefetch, QuerySet

from jobs.models import Run
from schedules.models import Schedule, ScheduleFire, TriggerEvent
from tenants.models import Tenant

_STARTED_RUNS = Prefetch(
    "runs",
    queryset=Run.objects.select_related("workflow_version__workflow").order_by("created_at"),
    to_attr="started_runs",
)


def _uuid(value: str | uuid.UUID) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


def schedules_for(*, tenant: Tenant) -> QuerySet[Schedule]:
    return Schedule.objects.filter(tenant=tenant).select_related("workflow").order_by("name")


def schedule_for(*, tenant: Tenant, schedule_id: str | uuid.UUID) -> Schedule | None:
    """The tenant's schedule with this public id; None for a malformed id or another
    tenant's."""
    public_id = _uuid(schedule_id)
    if public_id is None:
        return None
    return schedules_for(tenant=tenant).filter(public_id=public_id).first()


def fires_for(*, schedule: Schedule, limit: int = 50) -> list[ScheduleFire]:
    """The schedule's fires, latest fire time first, with their runs."""
    return list(
        ScheduleFire.objects.filter(schedule=schedule)
        .select_related("run")
        .order_by("-fire_at")[:limit]
    )


def last_fires(schedules: list[Schedule]) -> dict[int, ScheduleFire]:
    """Each schedule's latest fire (by fire time), if any."""
    latest: dict[int, ScheduleFire] = {}
    fires = (
        ScheduleFire.objects.filter(schedule__in=schedules)
        .select_related("run")
        .order_by("schedule_id", "-fire_at")
        .distinct("schedule_id")
    )
    for fire in fires:
        latest[fire.schedule_id] = fire
    return latest


def events_for(*, tenant: Tenant, limit: int = 50) -> list[TriggerEvent]:
    return list(
        TriggerEvent.objects.filter(tenant=tenant)
        .select_related("api_key")
        .prefetch_related(_STARTED_RUNS)
        .order_by("-created_at", "-id")[:limit]
    )


# --- platform-wide: the operators' dashboard and the metrics ------------------------------------


def all_schedules() -> list[Schedule]:
    return list(Schedule.objects.select_related("tenant", "workflow").order_by("tenant", "name"))


def schedule_by_public_id(schedule_id: str | uuid.UUID) -> Schedule | None:
    public_id = _uuid(schedule_id)
    if public_id is None:
        return None
    return Schedule.objects.select_related("tenant", "workflow").filter(public_id=public_id).first()


def recent_fires(*, limit: int = 30) -> list[ScheduleFire]:
    return list(
        ScheduleFire.objects.select_related("schedule", "tenant", "run").order_by(
            "-created_at", "-fire_at"
        )[:limit]
    )


def recent_events(*, limit: int = 100) -> list[TriggerEvent]:
    return list(
        TriggerEvent.objects.select_related("tenant", "api_key")
        .prefetch_related(_STARTED_RUNS)
        .order_by("-created_at", "-id")[:limit]
    )
