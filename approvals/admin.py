"""Admin pages for approvals and their votes: the audit of human decisions.

Read-only (docs/approvals.md, "Audit"): nothing about a request or its decision can be edited here,
and nothing can be added or deleted. Decisions are made in the inbox or through the API
(`approvals.services`); every decision, expiry and escalation is also an event in the
run's log (the run's admin page).
"""

from django.contrib import admin
from django.urls import reverse
from django.utils.html import format_html

from approvals.models import Approval, ApprovalVote
from jobs.admin import ReadOnlyAdmin, pretty


class ApprovalVoteInline(admin.TabularInline):
    model = ApprovalVote
    fields = ("reviewer", "decision", "comment", "data", "at")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(Approval)
class ApprovalAdmin(ReadOnlyAdmin):
    list_display = (
        "public_id",
        "tenant",
        "workflow",
        "step",
        "status",
        "reviewers",
        "required_approvals",
        "escalated",
        "created_at",
        "due_at",
        "decided_at",
        "decided_by",
    )
    list_filter = ("status", "decision", "escalated", "tenant", "reviewers", "created_at")
    search_fields = ("public_id", "run__public_id", "prompt", "decided_by", "comment")
    date_hierarchy = "created_at"
    list_select_related = ("tenant", "run__workflow_version__workflow", "step_run")
    fieldsets = (
        (None, {"fields": ("public_id", "tenant", "run_link", "step", "attempt", "status")}),
        ("Request", {"fields": ("prompt", "context_pretty", "form_pretty")}),
        (
            "Who and when",
            {
                "fields": (
                    "reviewers",
                    "required_approvals",
                    "created_at",
                    "due_at",
                    "on_timeout",
                    "on_reject",
                    "escalate_to",
                    "escalate_at",
                    "escalated",
                    "escalated_at",
                )
            },
        ),
        (
            "Decision",
            {"fields": ("decision", "decided_by", "decided_at", "comment", "data_pretty")},
        ),
    )
    readonly_fields = (
        "public_id",
        "tenant",
        "run_link",
        "step",
        "attempt",
        "status",
        "prompt",
        "context_pretty",
        "form_pretty",
        "reviewers",
        "required_approvals",
        "created_at",
        "due_at",
        "on_timeout",
        "on_reject",
        "escalate_to",
        "escalate_at",
        "escalated",
        "escalated_at",
        "decision",
        "decided_by",
        "decided_at",
        "comment",
        "data_pretty",
    )
    inlines = [ApprovalVoteInline]

    @admin.display(description="workflow", ordering="run__workflow_version__workflow__name")
    def workflow(self, obj: Approval) -> str:
        return obj.run.workflow_version.workflow.name

    @admin.display(description="step")
    def step(self, obj: Approval) -> str:
        return obj.step_run.key

    @admin.display(description="run")
    def run_link(self, obj: Approval) -> str:
        url = reverse("admin:jobs_run_change", args=[obj.run_id])
        return format_html('<a href="{}">{}</a> ({})', url, obj.run.public_id, obj.run.status)

    @admin.display(description="context")
    def context_pretty(self, obj: Approval) -> str:
        return pretty(obj.context)

    @admin.display(description="form")
    def form_pretty(self, obj: Approval) -> str:
        if obj.form_schema is None:
            return "-"
        return pretty({"schema": obj.form_schema, "values": obj.form_values})

    @admin.display(description="data as decided")
    def data_pretty(self, obj: Approval) -> str:
        return pretty(obj.data)


@admin.register(ApprovalVote)
class ApprovalVoteAdmin(ReadOnlyAdmin):
    list_display = ("approval", "reviewer", "decision", "at")
    list_filter = ("decision", "approval__tenant", "at")
    search_fields = ("reviewer", "comment", "approval__public_id")
    list_select_related = ("approval",)
    readonly_fields = (
        "approval",
        "user",
        "api_key_name",
        "reviewer",
        "decision",
        "comment",
        "data",
        "at",
    )
    fields = readonly_fields
