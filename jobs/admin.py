"""Admin pages for workflows, runs, steps, attempts, events and documents.

Run history is written by the engine only: runs, steps, attempts and events are read-only here
(an operator acts through the dashboard's actions, which call the services).
"""

import json

from django.contrib import admin
from django.utils.html import format_html

from jobs.models import (
    Document,
    Event,
    Run,
    StepAttempt,
    StepRun,
    WebhookAttempt,
    WebhookDelivery,
    Workflow,
    WorkflowVersion,
)
from jobs.services.webhooks import webhook_delivery_redeliver


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


def pretty(value) -> str:
    return format_html(
        "<pre style='white-space:pre-wrap'>{}</pre>", json.dumps(value, indent=2, sort_keys=True)
    )


class VersionInline(admin.TabularInline):
    model = WorkflowVersion
    fields = ("version", "created_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Workflow)
class WorkflowAdmin(admin.ModelAdmin):
    list_display = ("name", "tenant", "created_at")
    list_filter = ("tenant",)
    search_fields = ("name",)
    readonly_fields = ("public_id", "tenant", "name", "created_at")
    inlines = [VersionInline]


@admin.register(WorkflowVersion)
class WorkflowVersionAdmin(ReadOnlyAdmin):
    list_display = ("workflow", "version", "created_at")
    list_filter = ("workflow__tenant",)
    search_fields = ("workflow__name",)
    readonly_fields = ("workflow", "version", "created_at", "definition_pretty")
    exclude = ("definition",)

    @admin.display(description="definition")
    def definition_pretty(self, obj):
        return pretty(obj.definition)


class StepRunInline(admin.TabularInline):
    model = StepRun
    fields = (
        "step_id",
        "map_index",
        "kind",
        "status",
        "attempt",
        "worker",
        "started_at",
        "finished_at",
        "error",
    )
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False


class EventInline(admin.TabularInline):
    model = Event
    fields = ("seq", "type", "step_id", "map_index", "data", "created_at")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


class WebhookDeliveryInline(admin.TabularInline):
    model = WebhookDelivery
    fields = (
        "event_type",
        "event_id",
        "url",
        "status",
        "attempts",
        "last_status_code",
        "last_error",
        "next_attempt_at",
        "created_at",
    )
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Run)
class RunAdmin(ReadOnlyAdmin):
    list_display = (
        "public_id",
        "tenant",
        "workflow_version",
        "status",
        "lane",
        "created_at",
        "finished_at",
    )
    list_filter = ("status", "lane", "tenant", "created_at")
    search_fields = ("public_id", "idempotency_key", "error")
    date_hierarchy = "created_at"
    list_select_related = ("tenant", "workflow_version__workflow")
    readonly_fields = (
        "public_id",
        "tenant",
        "workflow_version",
        "status",
        "lane",
        "input_pretty",
        "output_pretty",
        "error",
        "idempotency_key",
        "webhook_url",
        "parent_step",
        "created_at",
        "started_at",
        "finished_at",
    )
    exclude = ("input", "output", "request_hash", "next_seq")
    inlines = [StepRunInline, WebhookDeliveryInline, EventInline]

    @admin.display(description="input")
    def input_pretty(self, obj):
        return pretty(obj.input)

    @admin.display(description="output")
    def output_pretty(self, obj):
        return pretty(obj.output)


class AttemptInline(admin.TabularInline):
    model = StepAttempt
    fields = ("number", "outcome", "worker", "error", "started_at", "duration_ms")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(StepRun)
class StepRunAdmin(ReadOnlyAdmin):
    list_display = (
        "run",
        "step_id",
        "map_index",
        "kind",
        "status",
        "attempt",
        "queue",
        "tenant",
        "lane",
        "worker",
    )
    list_filter = ("status", "kind", "queue", "lane", "tenant")
    search_fields = ("step_id", "run__public_id", "error")
    list_select_related = ("run", "tenant")
    inlines = [AttemptInline]


@admin.register(StepAttempt)
class StepAttemptAdmin(ReadOnlyAdmin):
    list_display = ("step_run", "number", "outcome", "worker", "started_at", "duration_ms")
    list_filter = ("outcome",)
    search_fields = ("worker", "error")


@admin.register(Event)
class EventAdmin(ReadOnlyAdmin):
    list_display = ("run", "seq", "type", "step_id", "map_index", "created_at")
    list_filter = ("type",)
    search_fields = ("run__public_id", "type", "step_id")


class WebhookAttemptInline(admin.TabularInline):
    model = WebhookAttempt
    fields = ("number", "at", "status_code", "latency_ms", "error", "worker")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(ReadOnlyAdmin):
    list_display = (
        "event_type",
        "run",
        "tenant",
        "url",
        "status",
        "attempts",
        "last_status_code",
        "next_attempt_at",
        "created_at",
    )
    list_filter = ("status", "event_type", "tenant", "created_at")
    search_fields = ("event_id", "url", "run__public_id", "last_error")
    date_hierarchy = "created_at"
    list_select_related = ("run", "tenant")
    readonly_fields = (
        "event_id",
        "run",
        "tenant",
        "event_type",
        "url",
        "status",
        "attempts",
        "next_attempt_at",
        "first_attempt_at",
        "last_attempt_at",
        "last_status_code",
        "last_error",
        "created_at",
        "finished_at",
        "payload_pretty",
    )
    exclude = ("payload", "dispatch_token", "dispatched_at", "claimed_at")
    inlines = [WebhookAttemptInline]
    actions = ["deliver_again"]

    @admin.display(description="payload")
    def payload_pretty(self, obj):
        return pretty(json.loads(obj.payload))

    @admin.action(description="Deliver again now (same event id, fresh retry window)")
    def deliver_again(self, request, queryset):
        for delivery in queryset:
            webhook_delivery_redeliver(delivery=delivery)
        self.message_user(request, f"{queryset.count()} deliveries will be attempted again.")


@admin.register(Document)
class DocumentAdmin(admin.ModelAdmin):
    list_display = ("title", "tenant", "created_at")
    list_filter = ("tenant",)
    search_fields = ("title", "text")
    readonly_fields = ("public_id", "created_at")
