"""The operators' dashboard (staff only), the landing redirect, the sign-in and `/healthz`.

Thin views: figures come from the dashboard's read modules (`dashboard.health`,
`overview_page`, `run_queries`, `tenant_usage`), actions go through the engine's and the
tenants' services (with the operator's name as `by`) and are recorded in the audit trail.
Live parts are pushed by `dashboard.consumers`; the templates render the same fragments on
first load, so a page is complete without JavaScript.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from functools import wraps
from typing import Any
from urllib.parse import urlencode

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.views import LoginView, redirect_to_login
from django.db import connection
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

from dashboard import health, overview_page, run_queries, sampling, tenant_usage
from dashboard.services import operator_action_record, operator_name
from jobs.models import RunStatus
from jobs.services.operations import (
    bulk_action_filter,
    run_rerun_from,
    runs_bulk_cancel,
    runs_bulk_retry,
)
from jobs.transitions.runs import RunError, run_cancel, run_retry
from tenants.models import Lane
from tenants.services import tenant_pause, tenant_resume

CHART_WINDOW = timedelta(hours=1)
FAILURE_WINDOWS = {"1h": timedelta(hours=1), "24h": timedelta(hours=24), "7d": timedelta(days=7)}


def staff_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Anonymous users go to the sign-in page; signed-in non-staff (reviewers) get a 403."""

    @wraps(view)
    def guarded(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path())
        if not request.user.is_staff:
            return render(request, "dashboard/forbidden.html", status=403)
        return view(request, *args, **kwargs)

    return guarded


def home(request: HttpRequest) -> HttpResponse:
    """Operators land on the dashboard, reviewers on their inbox, others on this page."""
    if request.user.is_authenticated:
        return redirect("dashboard:overview" if request.user.is_staff else "inbox:list")
    return render(request, "dashboard/home.html")


class SignInView(LoginView):
    """The shared sign-in page: operators then land on the dashboard, reviewers on the inbox."""

    template_name = "registration/login.html"

    def get_default_redirect_url(self) -> str:
        user = self.request.user
        return reverse("dashboard:overview" if user.is_staff else "inbox:list")


def healthz(request: HttpRequest) -> JsonResponse:
    """200 when PostgreSQL answers; the body says so. Used by `make run` to wait for web."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        database = "ok"
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        database = f"error: {exc}"
    healthy = database == "ok"
    return JsonResponse({"database": database}, status=200 if healthy else 503)


# --- pages ----------------------------------------------------------------------------------


@staff_required
def overview(request: HttpRequest) -> HttpResponse:
    now = timezone.now()
    return render(
        request,
        "dashboard/overview.html",
        {
            **overview_page.overview(now),
            "chart_data": sampling.series(since=now - CHART_WINDOW),
            "sample_s": settings.SWITCHYARD_METRICS_SAMPLE_S,
            "section": "overview",
        },
    )


@staff_required
def workers(request: HttpRequest) -> HttpResponse:
    return render(
        request,
        "dashboard/workers.html",
        {
            "workers": health.workers(),
            "down_after": settings.SWITCHYARD_WORKER_DOWN_AFTER_S,
            "now": timezone.now(),
            "section": "workers",
        },
    )


@staff_required
def tenants(request: HttpRequest) -> HttpResponse:
    listing = tenant_usage.tenants_usage(tenant_usage.TenantQuery.from_query(request.GET))
    return render(
        request,
        "dashboard/tenants.html",
        {
            "listing": listing,
            "query": urlencode(listing.query.as_query()),
            "actions": tenant_usage.recent_actions(),
            "now": timezone.now(),
            "section": "tenants",
        },
    )


@staff_required
@require_POST
def tenant_action(request: HttpRequest, slug: str, action: str) -> HttpResponse:
    tenant = tenant_usage.tenant_by_slug(slug)
    if tenant is None:
        raise Http404("No such tenant.")
    if action == "pause":
        tenant_pause(tenant=tenant)
        messages.success(request, f"Paused {tenant.slug}: its ready steps wait until resumed.")
    else:
        tenant_resume(tenant=tenant)
        messages.success(request, f"Resumed {tenant.slug}.")
    operator_action_record(user=request.user, action=f"tenant.{action}", target=tenant.slug)
    return redirect("dashboard:tenants")


@staff_required
def runs(request: HttpRequest) -> HttpResponse:
    filters = run_queries.RunFilters.from_query(request.GET)
    page = run_queries.runs_page(
        filters, after=request.GET.get("after"), before=request.GET.get("before")
    )
    query = filters.as_query()
    return render(
        request,
        "dashboard/runs.html",
        {
            "filters": filters,
            "page": page,
            "query": urlencode(query),
            "statuses": RunStatus.values,
            "lanes": Lane.values,
            "now": timezone.now(),
            "section": "runs",
        },
    )


def _run_or_404(run_id: str):
    run = run_queries.run_by_public_id(run_id)
    if run is None:
        raise Http404("No such run.")
    return run


@staff_required
def run_page(request: HttpRequest, run_id: str) -> HttpResponse:
    run = _run_or_404(run_id)
    context = {
        "run": run,
        **run_queries.run_detail(run),
        "now": timezone.now(),
        "section": "runs",
    }
    if request.GET.get("fragment"):
        return render(request, "dashboard/_run_live.html", context)
    return render(request, "dashboard/run.html", context)


@staff_required
@require_POST
def run_action(request: HttpRequest, run_id: str, action: str) -> HttpResponse:
    run = _run_or_404(run_id)
    by = operator_name(request.user)
    detail: dict[str, Any] = {}
    try:
        if action == "cancel":
            run_cancel(run=run, reason=f"cancelled by {by}", by=by)
            messages.success(request, "Run cancelled.")
        elif action == "retry":
            run_retry(run=run, by=by)
            messages.success(request, "Retrying the failed steps; earlier checkpoints are kept.")
        else:
            step_id = request.POST.get("step", "")
            updated = run_rerun_from(run=run, step_id=step_id, by=by)
            detail = {"from": step_id}
            messages.success(
                request,
                f"Re-running from {step_id}: it and what depends on it start again "
                f"({updated.status}).",
            )
    except RunError as exc:
        messages.error(request, f"Not done: {exc.message}")
        return redirect("dashboard:run", run_id=run.public_id)
    operator_action_record(
        user=request.user, action=f"run.{action}", target=str(run.public_id), detail=detail
    )
    return redirect("dashboard:run", run_id=run.public_id)


@staff_required
def bulk(request: HttpRequest) -> HttpResponse:
    """Bulk retry or cancel of the runs matching a filter: GET confirms, POST acts."""
    source = request.POST if request.method == "POST" else request.GET
    action = source.get("action")
    if action not in ("retry", "cancel"):
        raise Http404("Unknown bulk action.")
    filters = run_queries.RunFilters.from_query(source)
    cap = settings.SWITCHYARD_DASHBOARD_BULK_MAX
    action_filter = bulk_action_filter(action)
    if request.method != "POST":
        count = run_queries.runs_count(filters, action_filter=action_filter, cap=cap)
        return render(
            request,
            "dashboard/bulk_confirm.html",
            {
                "action": action,
                "filters": filters,
                "count": min(count, cap),
                "more": count > cap,
                "cap": cap,
                "query": urlencode(filters.as_query()),
                "section": "runs",
            },
        )
    by = operator_name(request.user)
    targets = run_queries.runs_for_bulk(filters, action_filter=action_filter, cap=cap)
    if action == "retry":
        result = runs_bulk_retry(runs=targets, by=by)
    else:
        result = runs_bulk_cancel(runs=targets, by=by)
    verb = "Retried" if action == "retry" else "Cancelled"
    note = f" ({len(result.skipped)} skipped: they changed meanwhile)" if result.skipped else ""
    messages.success(request, f"{verb} {len(result.done)} run(s){note}.")
    operator_action_record(
        user=request.user,
        action=f"runs.bulk_{action}",
        target=urlencode(filters.as_query()) or "all runs",
        detail={"done": len(result.done), "skipped": len(result.skipped)},
    )
    return redirect(f"{reverse('dashboard:runs')}?{urlencode(filters.as_query())}")


@staff_required
def failures(request: HttpRequest) -> HttpResponse:
    window = request.GET.get("window") if request.GET.get("window") in FAILURE_WINDOWS else "24h"
    since = timezone.now() - FAILURE_WINDOWS[window]
    return render(
        request,
        "dashboard/failures.html",
        {
            "groups": run_queries.failure_groups(since=since),
            "window": window,
            "windows": list(FAILURE_WINDOWS),
            "since": since,
            "now": timezone.now(),
            "section": "failures",
        },
    )
