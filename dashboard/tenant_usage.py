"""The Tenants page's figures (docs/dashboard.md): each tenant's usage against its quotas,
searched, sorted and paged in the database, and the operators' latest actions.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.db.models import Count, Q
from django.utils import timezone

from dashboard.models import OperatorAction
from jobs.models import StepRun
from tenants.admin import with_usage
from tenants.models import Tenant

# --- tenants --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bar:
    label: str
    used: int
    limit: int

    @property
    def percent(self) -> int:
        if self.limit <= 0:
            return 100 if self.used else 0
        return min(100, round(100 * self.used / self.limit))

    @property
    def level(self) -> str:
        return "full" if self.percent >= 100 else "high" if self.percent >= 80 else "ok"


@dataclass(frozen=True)
class TenantUsage:
    tenant: Tenant
    bars: list[Bar]
    running_steps: int
    ready_steps: int


# The Tenants page's sort keys (`?sort=`, `-` first for descending): name → what it orders by.
TENANT_SORTS = {
    "name": "name",
    "slug": "slug",
    "state": "is_active",
    "active": "active_runs",
    "queued": "queued_runs",
    "in_flight": "in_flight_steps",
    "ready": "ready_steps",
}
TENANTS_PER_PAGE = 24


@dataclass(frozen=True)
class TenantQuery:
    """The Tenants page's search, sort and page, parsed from the query string (invalid values
    fall back to the defaults: every tenant, by slug, the first page)."""

    search: str = ""
    sort: str = "slug"
    page: int = 1

    @classmethod
    def from_query(cls, query: Any) -> TenantQuery:
        search = (query.get("q") or "").strip()[:100]
        sort = query.get("sort") or "slug"
        if sort.removeprefix("-") not in TENANT_SORTS:
            sort = "slug"
        page = query.get("page") or ""
        return cls(search, sort, int(page) if page.isdigit() and int(page) > 0 else 1)

    def as_query(self) -> dict[str, str]:
        return {
            name: value
            for name, value in (("q", self.search), ("sort", self.sort), ("page", str(self.page)))
            if value and (name, value) not in (("sort", "slug"), ("page", "1"))
        }

    def order_by(self) -> list[str]:
        key = self.sort.removeprefix("-")
        field_name = TENANT_SORTS[key]
        ordered = f"-{field_name}" if self.sort.startswith("-") else field_name
        return [ordered, "slug"] if key != "slug" else [ordered]


@dataclass(frozen=True)
class TenantsPage:
    usage: list[TenantUsage]
    query: TenantQuery
    total: int  # tenants that match the search
    page: int  # the page shown (the last one if the query asked for a page past it)
    pages: int

    @property
    def previous(self) -> int | None:
        return self.page - 1 if self.page > 1 else None

    @property
    def next(self) -> int | None:
        return self.page + 1 if self.page < self.pages else None


def tenants_usage(
    query: TenantQuery | None = None, *, per_page: int = TENANTS_PER_PAGE
) -> TenantsPage:
    """One page of tenants, each with its use against its quotas (what the scheduler measures
    them against): those whose name or slug contains the search, in the query's order."""
    query = query or TenantQuery()
    tenants = Tenant.objects.all()
    if query.search:
        tenants = tenants.filter(Q(name__icontains=query.search) | Q(slug__icontains=query.search))
    total = tenants.count()
    pages = max(1, -(-total // per_page))
    page = min(query.page, pages)
    offset = (page - 1) * per_page
    shown = list(with_usage(tenants).order_by(*query.order_by())[offset : offset + per_page])
    since = timezone.now() - timedelta(minutes=1)
    per_minute = dict(
        StepRun.objects.filter(started_at__gte=since, tenant__in=[t.pk for t in shown])
        .values_list("tenant_id")
        .annotate(n=Count("id"))
        .values_list("tenant_id", "n")
    )
    usage = []
    for tenant in shown:
        usage.append(
            TenantUsage(
                tenant=tenant,
                running_steps=tenant.running_steps,
                ready_steps=tenant.ready_steps,
                bars=[
                    Bar("steps in flight", tenant.in_flight_steps, tenant.max_concurrent_steps),
                    Bar("active runs", tenant.active_runs, tenant.max_active_runs),
                    Bar("queued runs", tenant.queued_runs, tenant.max_queued_runs),
                    Bar("steps / minute", per_minute.get(tenant.pk, 0), tenant.steps_per_minute),
                    Bar("LLM tokens today", tenant.tokens_today, tenant.llm_tokens_per_day),
                ],
            )
        )
    return TenantsPage(usage, query, total, page, pages)


def tenant_by_slug(slug: str) -> Tenant | None:
    return Tenant.objects.filter(slug=slug).first()


def recent_actions(limit: int = 10) -> list[OperatorAction]:
    return list(OperatorAction.objects.order_by("-at", "-id")[:limit])
