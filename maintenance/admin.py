"""The housekeeping's timers, read-only. Each run's outcome is a task result of
django-celery-results (the admin's "Task results" of "Celery Results", filtered by task name)."""

from django.contrib import admin

from jobs.admin import ReadOnlyAdmin
from maintenance.models import HousekeepingTimer


@admin.register(HousekeepingTimer)
class HousekeepingTimerAdmin(ReadOnlyAdmin):
    list_display = ("job", "next_at", "last_enqueued_at")
    readonly_fields = list_display
    fields = list_display
