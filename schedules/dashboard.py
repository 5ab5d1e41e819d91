"""The operators' Schedules and Events pages (`/dashboard/schedules/`, `/dashboard/events/`).

They live with the schedules, and follow the dashboard's pattern (`dashboard.views`): staff
only, thin views over `schedules.selectors`, actions through `schedules.services` recorded in
the operators' audit trail, and a live part that `dashboard.consumers` pushes (the views
`schedules` and `events`) rendered by the same fragments as the first load.
"""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.utils import timezone
from django.views.decorators.http import require_POST

from dashboard.services import operator_action_record
from dashboard.views import staff_required
from schedules import selectors
from schedules.models import FireStatus
from schedules.services import schedule_fire_now, schedule_pause, schedule_resume


def schedules_context() -> dict[str, Any]:
    schedules = selectors.all_schedules()
    last = selectors.last_fires(schedules)
    return {
        "rows": [(schedule, last.get(schedule.pk)) for schedule in schedules],
        "fires": selectors.recent_fires(),
        "now": timezone.now(),
    }


def schedules_frame() -> dict[str, Any]:
    context = schedules_context()
    figures = {
        "schedules": {
            str(schedule.public_id): {
                "paused": schedule.paused,
                "next_fire_at": schedule.next_fire_at.isoformat()
                if schedule.next_fire_at
                else None,
                "last_status": fire.status if fire else None,
                "last_run": str(fire.run.public_id) if fire and fire.run else None,
            }
            for schedule, fire in context["rows"]
        },
        "fires_submitted": sum(f.status == FireStatus.SUBMITTED for f in context["fires"]),
    }
    html = render_to_string("dashboard/_schedules_live.html", context)
    return {"html": html, "figures": figures}


def events_context() -> dict[str, Any]:
    return {"events": selectors.recent_events(), "now": timezone.now()}


def events_frame() -> dict[str, Any]:
    context = events_context()
    figures = {"events": [str(event.public_id) for event in context["events"]]}
    return {"html": render_to_string("dashboard/_events_live.html", context), "figures": figures}


@staff_required
def schedules_page(request: HttpRequest) -> HttpResponse:
    return render(
        request, "dashboard/schedules.html", {**schedules_context(), "section": "schedules"}
    )


@staff_required
def events_page(request: HttpRequest) -> HttpResponse:
    return render(request, "dashboard/events.html", {**events_context(), "section": "events"})


@staff_required
@require_POST
def schedule_action(request: HttpRequest, schedule_id: str, action: str) -> HttpResponse:
    schedule = selectors.schedule_by_public_id(schedule_id)
    if schedule is None:
        raise Http404("No such schedule.")
    now = timezone.now()
    label = f"{schedule.tenant.slug}/{schedule.name}"
    detail: dict[str, Any] = {}
    if action == "pause":
        schedule_pause(schedule=schedule, now=now)
        messages.success(request, f"Paused {label}: no fire time is recorded until resumed.")
    elif action == "resume":
        schedule = schedule_resume(schedule=schedule, now=now)
        messages.success(
            request, f"Resumed {label}: next fire {schedule.next_fire_at:%Y-%m-%d %H:%M:%S} UTC."
        )
    else:
        fire = schedule_fire_now(schedule=schedule, now=now)
        detail = {"fire": str(fire.public_id), "status": fire.status}
        if fire.run is not None:
            messages.success(request, f"Fired {label} now: run {fire.run.public_id}.")
        else:
            messages.warning(request, f"Fired {label} now: {fire.status} ({fire.reason}).")
    operator_action_record(
        user=request.user, action=f"schedule.{action}", target=label, detail=detail
    )
    return redirect("dashboard:schedules")
