"""The overview page's figures (docs/dashboard.md): the backlog per tenant and lane, the active
runs, the approvals waiting, and the whole page as the live socket pushes it.

Operators are staff and see all tenants, so nothing here is scoped by tenant; the views and
consumers that call these functions admit staff only. Each function reads what one panel
shows and no more: lists are bounded, counts come from indexed or partial scans.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db.models import Count, Min, Q
from django.utils import timezone

from approvals.models import Approval
from dashboard.health import broker_queues, health, last_sample_at, workers
from jobs.metrics import LaneMetrics, scheduling_metrics
from jobs.models import Run, RunStatus, StepAttempt
from maintenance.selectors import housekeeping_last_runs

ACTIVE_RUN_STATUSES = (RunStatus.ACCEPTED, RunStatus.RUNNING, RunStatus.WAITING)
ACTIVE_RUNS_SHOWN = 15
DUE_SOON = timedelta(hours=1)


# --- backlog, active runs, approvals --------------------------------------------------------


def backlog() -> list[LaneMetrics]:
    """Per tenant and lane: ready, queued, running steps and queue-wait percentiles (5 min)."""
    return scheduling_metrics(window_s=300)


@dataclass(frozen=True)
class BacklogTotals:
    ready: int
    queued: int
    running: int


def backlog_totals(rows: list[LaneMetrics]) -> BacklogTotals:
    return BacklogTotals(
        ready=sum(r.ready for r in rows),
        queued=sum(r.queued for r in rows),
        running=sum(r.running for r in rows),
    )


def active_run_counts() -> dict[str, int]:
    """Runs not finished, by status (accepted = not started yet)."""
    counts = dict(
        Run.objects.filter(status__in=ACTIVE_RUN_STATUSES)
        .values_list("status")
        .annotate(n=Count("id"))
        .values_list("status", "n")
    )
    return {status: counts.get(status, 0) for status in ACTIVE_RUN_STATUSES}


def active_runs(limit: int = ACTIVE_RUNS_SHOWN) -> list[Run]:
    """The most recent unfinished runs."""
    return list(
        Run.objects.filter(status__in=ACTIVE_RUN_STATUSES)
        .select_related("tenant", "workflow_version__workflow")
        .order_by("-created_at", "-id")[:limit]
    )


@dataclass(frozen=True)
class ApprovalQueue:
    tenant: str
    reviewers: str
    pending: int
    oldest_at: datetime | None
    due_soon: int
    overdue: int


def approval_queues(now: datetime | None = None) -> list[ApprovalQueue]:
    """Pending approvals per tenant and reviewer group."""
    now = now or timezone.now()
    rows = (
        Approval.objects.filter(status="pending")
        .values("tenant__slug", "reviewers")
        .annotate(
            pending=Count("id"),
            oldest_at=Min("created_at"),
            due_soon=Count("id", filter=Q(due_at__gt=now, due_at__lte=now + DUE_SOON)),
            overdue=Count("id", filter=Q(due_at__lte=now)),
        )
        .order_by("tenant__slug", "reviewers")
    )
    return [
        ApprovalQueue(
            tenant=row["tenant__slug"],
            reviewers=row["reviewers"],
            pending=row["pending"],
            oldest_at=row["oldest_at"],
            due_soon=row["due_soon"],
            overdue=row["overdue"],
        )
        for row in rows
    ]


# --- the overview, whole (also what the live socket pushes) ---------------------------------


def overview(now: datetime | None = None) -> dict[str, Any]:
    now = now or timezone.now()
    queues = broker_queues()
    worker_list = workers(now)
    lanes = backlog()
    return {
        "now": now,
        "queues": queues,
        "backlog": lanes,
        "backlog_totals": backlog_totals(lanes),
        "active_counts": active_run_counts(),
        "active_runs": active_runs(),
        "approvals": approval_queues(now),
        "health": health(queues, worker_list, now),
        "workers_up": sum(w.state == "up" for w in worker_list),
        "workers_down": sum(w.state == "down" for w in worker_list),
        "finished_5m": StepAttempt.objects.filter(
            finished_at__gte=now - timedelta(minutes=5), outcome="succeeded"
        ).count(),
        "failed_5m": StepAttempt.objects.filter(
            finished_at__gte=now - timedelta(minutes=5), outcome__in=["failed", "lost"]
        ).count(),
        "last_sample_at": last_sample_at(),
        "housekeeping": housekeeping_last_runs(),
    }
