"""Tenants' quota state as the scheduler sees it, and the steps-per-minute token bucket.

The bucket holds up to `SWITCHYARD_RATE_BURST_S` seconds' worth of steps and refills at
`steps_per_minute / 60` per second. Its state lives in `TenantThrottle`, apart from the tenant's
settings, and is only written by the scheduler while it holds the admission lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime

from django.conf import settings
from django.db import connection
from django.db.models import Count, Q

from tenants.models import Tenant, TenantThrottle, TenantUsageDay


@dataclass
class TenantQuotaState:
    step_tokens: float
    llm_tokens_today: int
    active_runs: int
    queued_runs: int


def usage_day(now: datetime) -> date:
    """The UTC day that an LLM token budget is counted on."""
    return now.astimezone(UTC).date()


def bucket_capacity(tenant: Tenant) -> float:
    return max(1.0, tenant.steps_per_minute / 60.0 * settings.SWITCHYARD_RATE_BURST_S)


def refilled(tenant: Tenant, throttle: TenantThrottle | None, now: datetime) -> float:
    capacity = bucket_capacity(tenant)
    if throttle is None:
        return capacity
    elapsed = max(0.0, (now - throttle.refilled_at).total_seconds())
    return min(capacity, throttle.step_tokens + elapsed * tenant.steps_per_minute / 60.0)


def quota_states(tenants: list[Tenant], *, now: datetime) -> dict[int, TenantQuotaState]:
    from jobs.models import Run, RunStatus

    ids = [tenant.pk for tenant in tenants]
    throttles = {t.tenant_id: t for t in TenantThrottle.objects.filter(tenant_id__in=ids)}
    tokens = dict(
        TenantUsageDay.objects.filter(tenant_id__in=ids, day=usage_day(now)).values_list(
            "tenant_id", "llm_tokens"
        )
    )
    runs = {
        row["tenant_id"]: row
        for row in Run.objects.filter(tenant_id__in=ids)
        .filter(status__in=[RunStatus.ACCEPTED, RunStatus.RUNNING, RunStatus.WAITING])
        .values("tenant_id")
        .annotate(
            active=Count("id", filter=Q(status__in=[RunStatus.RUNNING, RunStatus.WAITING])),
            queued=Count("id", filter=Q(status=RunStatus.ACCEPTED)),
        )
    }
    return {
        tenant.pk: TenantQuotaState(
            step_tokens=refilled(tenant, throttles.get(tenant.pk), now),
            llm_tokens_today=tokens.get(tenant.pk, 0),
            active_runs=runs.get(tenant.pk, {}).get("active", 0),
            queued_runs=runs.get(tenant.pk, {}).get("queued", 0),
        )
        for tenant in tenants
    }


def throttle_record(*, levels: dict[int, float], now: datetime) -> None:
    """Write tenants' bucket levels after an admission (`Decision.levels`), in one statement.

    The levels were computed from the buckets as read by the same decision: only the holder of
    the admission lock writes them, so nothing changed them in between.
    """
    if not levels:
        return
    table = TenantThrottle._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (tenant_id, step_tokens, refilled_at) VALUES "
            + ", ".join(["(%s, %s, %s)"] * len(levels))
            + " ON CONFLICT (tenant_id) DO UPDATE"
            " SET step_tokens = EXCLUDED.step_tokens, refilled_at = EXCLUDED.refilled_at",
            [value for tenant_id, level in levels.items() for value in (tenant_id, level, now)],
        )


def llm_tokens_add(*, tenant_id: int, tokens: int, now: datetime) -> None:
    """Count LLM tokens against today's budget (an upsert that adds, safe under races)."""
    if tokens <= 0:
        return
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO {TenantUsageDay._meta.db_table} (tenant_id, day, llm_tokens,
                                                         steps_completed)
            VALUES (%s, %s, %s, 0)
            ON CONFLICT (tenant_id, day)
            DO UPDATE SET llm_tokens = {TenantUsageDay._meta.db_table}.llm_tokens
                                       + EXCLUDED.llm_tokens
            """,
            [tenant_id, usage_day(now), tokens],
        )
