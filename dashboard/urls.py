"""Routes of the operators' dashboard, mounted at /dashboard/ (staff only)."""

from django.urls import path

from dashboard import views
from schedules import dashboard as schedules

app_name = "dashboard"

urlpatterns = [
    path("", views.overview, name="overview"),
    path("workers/", views.workers, name="workers"),
    path("tenants/", views.tenants, name="tenants"),
    path(
        "tenants/<slug:slug>/pause/",
        views.tenant_action,
        {"action": "pause"},
        name="tenant-pause",
    ),
    path(
        "tenants/<slug:slug>/resume/",
        views.tenant_action,
        {"action": "resume"},
        name="tenant-resume",
    ),
    path("runs/", views.runs, name="runs"),
    path("runs/bulk/", views.bulk, name="bulk"),
    path("runs/<str:run_id>/", views.run_page, name="run"),
    path("runs/<str:run_id>/cancel/", views.run_action, {"action": "cancel"}, name="run-cancel"),
    path("runs/<str:run_id>/retry/", views.run_action, {"action": "retry"}, name="run-retry"),
    path("runs/<str:run_id>/rerun/", views.run_action, {"action": "rerun"}, name="run-rerun"),
    path("failures/", views.failures, name="failures"),
    # Schedules and events (schedules.dashboard).
    path("schedules/", schedules.schedules_page, name="schedules"),
    path(
        "schedules/<str:schedule_id>/pause/",
        schedules.schedule_action,
        {"action": "pause"},
        name="schedule-pause",
    ),
    path(
        "schedules/<str:schedule_id>/resume/",
        schedules.schedule_action,
        {"action": "resume"},
        name="schedule-resume",
    ),
    path(
        "schedules/<str:schedule_id>/trigger/",
        schedules.schedule_action,
        {"action": "trigger"},
        name="schedule-trigger",
    ),
    path("events/", schedules.events_page, name="events"),
]
