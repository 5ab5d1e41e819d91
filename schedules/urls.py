"""The schedules and events API, under /api/v1/ (schedules.api)."""

from django.urls import path

from schedules import api

app_name = "schedules-api"

urlpatterns = [
    path("schedules/", api.ScheduleListView.as_view(), name="schedule-list"),
    path("schedules/<str:schedule_id>/", api.ScheduleDetailView.as_view(), name="schedule-detail"),
    path(
        "schedules/<str:schedule_id>/pause/",
        api.SchedulePauseView.as_view(),
        name="schedule-pause",
    ),
    path(
        "schedules/<str:schedule_id>/resume/",
        api.ScheduleResumeView.as_view(),
        name="schedule-resume",
    ),
    path(
        "schedules/<str:schedule_id>/trigger/",
        api.ScheduleTriggerView.as_view(),
        name="schedule-trigger",
    ),
    path(
        "schedules/<str:schedule_id>/backfill/",
        api.ScheduleBackfillView.as_view(),
        name="schedule-backfill",
    ),
    path(
        "schedules/<str:schedule_id>/fires/",
        api.ScheduleFiresView.as_view(),
        name="schedule-fires",
    ),
    path("events/", api.EventListView.as_view(), name="event-list"),
]
