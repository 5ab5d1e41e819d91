"""Tenants' quota state as the scheduler sees it, and the steps-per-minute token bucket.

The bucket holds up to `SWITCHYARD_RATE_BURST_S` seconds' worth of steps and refills at
`steps_per_minute / 60` per second. Its state lives in `TenantThrottle`, apart from the tenant's
settings, and is only written by the scheduler while it holds the admission lock.

No step's transaction writes a row that all of a tenant's steps write: one stalled worker
holding such a row would stall every other worker of the tenant behind it. So what a step
transaction counts is appended, and the scheduler folds it in outside any step's transaction:
- a direct admission appends the bucket tokens it spent (`TenantThrottleSpend`); the bucket's
  level is `TenantThrottle`'s, refilled, minus the spends not folded yet, and the scheduler's
  next admission folds them (`throttle_record`). Counting a spend after the refill can only
  under-state the level (never let more steps through);
- a step's report appends the LLM tokens it used (`TenantTokenUse`); the day's use is
  `TenantUsageDay` plus the rows not rolled up yet, read in one statement (one snapshot, so a
  roll-up running at the same moment is counted once), and the scheduler's sweep rolls the
  rows up (`usage_roll_up`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count, Q, Sum

from jobs.models import Run, RunStatus
from tenants.models import (
    Tenant,
    TenantThrottle,
    TenantThrottleSpend,
    TenantTokenUse,
    TenantUsageDay,
)

# Only one process rolls usage up at a time (two schedulers): taken without waiting.
USAGE_ROLL_UP_LOCK_ID = 0x5357_5255  # "SWRU"


@dataclass
class TenantQuotaState:
    step_tokens: float
    llm_tokens_today: int
    active_runs: int
    queued_runs: int
    # Bucket tokens direct admissions spent that the scheduler has not folded yet (already
    # taken off `step_tokens`).
    spends_to_fold: float = 0.0


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
    ids = [tenant.pk for tenant in tenants]
    throttles = {t.tenant_id: t for t in TenantThrottle.objects.filter(tenant_id__in=ids)}
    spent = throttle_spent(ids)
    tokens = llm_tokens_used(ids, day=usage_day(now))
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
            step_tokens=refilled(tenant, throttles.get(tenant.pk), now) - spent.get(tenant.pk, 0),
            llm_tokens_today=tokens.get(tenant.pk, 0),
            active_runs=runs.get(tenant.pk, {}).get("active", 0),
            queued_runs=runs.get(tenant.pk, {}).get("queued", 0),
            spends_to_fold=spent.get(tenant.pk, 0.0),
        )
        for tenant in tenants
    }


def throttle_spent(tenant_ids: list[int]) -> dict[int, float]:
    """Per tenant, the bucket tokens that direct admissions spent since the last fold."""
    return dict(
        TenantThrottleSpend.objects.filter(tenant_id__in=tenant_ids)
        .values_list("tenant_id")
        .annotate(total=Sum("step_tokens"))
        .values_list("tenant_id", "total")
    )


def throttle_record(*, levels: dict[int, float], now: datetime) -> None:
    """Write tenants' bucket levels after the scheduler's admission (`Decision.levels`) and
    fold their spends: one statement. Only the scheduler calls it, holding the admission lock.

    The levels were computed from the buckets and the spends as read by the same decision;
    spends are appended only under the admission lock, so none was added in between.
    """
    if not levels:
        return
    table = TenantThrottle._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"WITH folded AS (DELETE FROM {TenantThrottleSpend._meta.db_table}"
            " WHERE tenant_id = ANY(%s)) "
            f"INSERT INTO {table} (tenant_id, step_tokens, refilled_at) VALUES "
            + ", ".join(["(%s, %s, %s)"] * len(levels))
            + " ON CONFLICT (tenant_id) DO UPDATE"
            " SET step_tokens = EXCLUDED.step_tokens, refilled_at = EXCLUDED.refilled_at",
            [list(levels), *(v for item in levels.items() for v in (*item, now))],
        )


def throttle_fold(*, now: datetime) -> int:
    """Fold every tenant's unfolded spends into its bucket; how many tenants. The scheduler
    calls it on its sweep timer, holding the admission lock, so that the spends of a system
    whose steps are all admitted directly do not pile up."""
    ids = list(TenantThrottleSpend.objects.values_list("tenant_id", flat=True).distinct())
    if not ids:
        return 0
    tenants = Tenant.objects.in_bulk(ids)
    throttles = {t.tenant_id: t for t in TenantThrottle.objects.filter(tenant_id__in=ids)}
    spent = throttle_spent(ids)
    throttle_record(
        levels={
            tenant_id: refilled(tenant, throttles.get(tenant_id), now) - spent.get(tenant_id, 0)
            for tenant_id, tenant in tenants.items()
        },
        now=now,
    )
    return len(tenants)


def llm_tokens_used(tenant_ids: list[int], *, day: date) -> dict[int, int]:
    """Per tenant, the LLM tokens used on `day`: rolled up and not yet (one snapshot)."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            SELECT tenant_id, sum(tokens) FROM (
                SELECT tenant_id, llm_tokens AS tokens FROM {TenantUsageDay._meta.db_table}
                WHERE day = %(day)s AND tenant_id = ANY(%(ids)s)
                UNION ALL
                SELECT tenant_id, llm_tokens FROM {TenantTokenUse._meta.db_table}
                WHERE day = %(day)s AND tenant_id = ANY(%(ids)s)
            ) used GROUP BY tenant_id
            """,
            {"day": day, "ids": list(tenant_ids)},
        )
        return {tenant_id: int(total) for tenant_id, total in cursor.fetchall()}


def llm_tokens_add(*, tenant_id: int, tokens: int, now: datetime) -> None:
    """Count LLM tokens against today's budget: an appended row (no row lock is waited for)."""
    if tokens > 0:
        TenantTokenUse.objects.create(tenant_id=tenant_id, day=usage_day(now), llm_tokens=tokens)


def usage_roll_up(*, batch: int = 10_000) -> int:
    """Move appended token uses into `TenantUsageDay`, in one statement; returns rows moved.

    The scheduler's sweep calls it, outside any step's transaction. One process at a time (an
    advisory lock taken without waiting); rows a step's transaction is still writing are not
    visible yet and wait for the next roll-up.
    """
    uses = TenantTokenUse._meta.db_table
    days = TenantUsageDay._meta.db_table
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [USAGE_ROLL_UP_LOCK_ID])
        if not cursor.fetchone()[0]:
            return 0
        cursor.execute(
            f"""
            WITH moved AS (
                DELETE FROM {uses} WHERE id IN (
                    SELECT id FROM {uses} ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED
                ) RETURNING tenant_id, day, llm_tokens
            ), summed AS (
                SELECT tenant_id, day, sum(llm_tokens) AS tokens, count(*) AS n
                FROM moved GROUP BY tenant_id, day
            ), upserted AS (
                INSERT INTO {days} (tenant_id, day, llm_tokens, steps_completed)
                SELECT tenant_id, day, tokens, 0 FROM summed
                ON CONFLICT (tenant_id, day)
                DO UPDATE SET llm_tokens = {days}.llm_tokens + EXCLUDED.llm_tokens
            )
            SELECT coalesce(sum(n), 0) FROM summed
            """,
            [batch],
        )
        return int(cursor.fetchone()[0])
