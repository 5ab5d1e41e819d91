"""Admin pages for schedules (per tenant), their fires and events.

Schedules are created and changed through the API (`schedules.services` checks their timing
and plans their next fire), so they are read-only here; the actions pause, resume and fire
now call the same services as the API and the dashboard.
"""

from django.contrib import admin, messages
from django.utils import timezone

from jobs.admin import ReadOnlyAdmin, pretty
from schedules.models import Schedule, ScheduleFire, TriggerEvent
from schedules.services import schedule_fire_now, schedule_pause, schedule_resume


class FireInline(admin.TabularInline):
    model = ScheduleFire
    fields = ("fire_at", "kind", "status", "code", "reason", "attempts", "run", "submitted_at")
    readonly_fields = fields
    ordering = ("-fire_at",)
    extra = 0
    max_num = 0
    can_delete = False
    show_change_link = True


@admin.register(Schedule)
class ScheduleAdmin(ReadOnlyAdmin):
    list_display = (
        "name",
        "tenant",
        "workflow",
        "timing",
        "overlap",
        "paused",
        "next_fire_at",
    )
    list_filter = ("tenant", "paused", "overlap")
    search_fields = ("name", "workflow__name")
    readonly_fields = (
        "public_id",
        "tenant",
        "name",
        "workflow",
        "version",
        "input_pretty",
        "lane",
        "cron",
        "timezone",
        "interval_s",
        "starts_at",
        "ends_at",
        "overlap",
        "catchup_window_s",
        "jitter_s",
        "paused",
        "next_fire_at",
        "next_due_at",
        "created_at",
        "updated_at",
    )
    exclude = ("input",)
    inlines = [FireInline]
    actions = ["pause", "resume", "fire_now"]

    @admin.display(description="when")
    def timing(self, schedule: Schedule) -> str:
        if schedule.cron:
            return f"{schedule.cron} ({schedule.timezone})"
        return f"every {schedule.interval_s} s"

    @admin.display(description="input")
    def input_pretty(self, schedule: Schedule) -> str:
        return pretty(schedule.input)

    def has_change_permission(self, request, obj=None):
        # The actions need it; every field stays read-only.
        return request.user.has_perm("schedules.change_schedule")

    @admin.action(description="Pause the selected schedules", permissions=["change"])
    def pause(self, request, queryset):
        for schedule in queryset:
            schedule_pause(schedule=schedule, now=timezone.now())
        self.message_user(request, f"Paused {queryset.count()} schedule(s).")

    @admin.action(description="Resume the selected schedules", permissions=["change"])
    def resume(self, request, queryset):
        for schedule in queryset:
            schedule_resume(schedule=schedule, now=timezone.now())
        self.message_user(request, f"Resumed {queryset.count()} schedule(s).")

    @admin.action(description="Fire the selected schedules now", permissions=["change"])
    def fire_now(self, request, queryset):
        for schedule in queryset:
            fire = schedule_fire_now(schedule=schedule, now=timezone.now())
            level = messages.SUCCESS if fire.run else messages.WARNING
            self.message_user(request, f"{schedule}: {fire.status} {fire.reason}", level)


@admin.register(ScheduleFire)
class ScheduleFireAdmin(ReadOnlyAdmin):
    list_display = ("schedule", "fire_at", "kind", "status", "code", "attempts", "run")
    list_filter = ("status", "kind", "tenant")
    search_fields = ("schedule__name",)
    raw_id_fields = ("run",)


@admin.register(TriggerEvent)
class TriggerEventAdmin(ReadOnlyAdmin):
    list_display = ("name", "event_id", "tenant", "api_key", "created_at")
    list_filter = ("tenant",)
    search_fields = ("name", "event_id")
    readonly_fields = ("public_id", "tenant", "name", "event_id", "data", "api_key", "created_at")
    exclude = ("runs",)
