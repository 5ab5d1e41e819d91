from django import forms
from django.contrib import admin, messages
from django.db import models
from django.db.models import Count, IntegerField, OuterRef, Subquery, Sum, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from jobs.models import Run, StepRun
from jobs.selectors import in_flight_steps
from tenants.models import ApiKey, Membership, Tenant, TenantTokenUse, TenantUsageDay
from tenants.origins import validate_allowed_origins
from tenants.quotas import usage_day
from tenants.services import (
    api_key_fill,
    tenant_pause,
    tenant_resume,
    tenant_webhook_secret_rotate,
)


def _count(queryset) -> Coalesce:
    """A per-tenant count as a subquery (several of them in one changelist query)."""
    counted = queryset.filter(tenant=OuterRef("pk")).values("tenant").annotate(n=Count("id"))
    return Coalesce(Subquery(counted.values("n"), output_field=IntegerField()), Value(0))


def with_usage(queryset):
    """Tenants annotated with their live usage: what the scheduler measures quotas against."""
    today = usage_day(timezone.now())
    tokens = TenantUsageDay.objects.filter(tenant=OuterRef("pk"), day=today)
    # Token uses not rolled up yet (tenants.quotas): read in the same statement.
    uses = (
        TenantTokenUse.objects.filter(tenant=OuterRef("pk"), day=today)
        .values("tenant")
        .annotate(total=Sum("llm_tokens"))
        .values("total")
    )
    return queryset.annotate(
        running_steps=_count(in_flight_steps().filter(status="running")),
        in_flight_steps=_count(in_flight_steps()),
        ready_steps=_count(StepRun.objects.filter(status="ready")),
        active_runs=_count(Run.objects.filter(status__in=["running", "waiting"])),
        queued_runs=_count(Run.objects.filter(status="accepted")),
        tokens_today=Coalesce(
            Subquery(tokens.values("llm_tokens")[:1], output_field=IntegerField()), Value(0)
        )
        + Coalesce(Subquery(uses, output_field=IntegerField()), Value(0)),
    )


class ApiKeyInline(admin.TabularInline):
    model = ApiKey
    fields = ("name", "prefix", "created_at", "last_used_at", "revoked_at")
    readonly_fields = ("name", "prefix", "created_at", "last_used_at")
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False  # keys are issued from the API key page, which shows the secret once


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ("user",)


class OriginsField(forms.Field):
    """`Tenant.allowed_origins` as a text area, one origin per line."""

    widget = forms.Textarea(attrs={"rows": 3, "placeholder": "https://app.example.com"})

    def prepare_value(self, value):
        return "\n".join(value) if isinstance(value, list) else value

    def to_python(self, value) -> list[str]:
        return [line.strip() for line in (value or "").splitlines() if line.strip()]

    def validate(self, value: list[str]) -> None:
        super().validate(value)
        validate_allowed_origins(value)


class TenantForm(forms.ModelForm):
    allowed_origins = OriginsField(
        required=False,
        help_text=(
            "One origin per line, as browsers send it: scheme://host[:port], no path, no "
            "wildcard. Pages there may follow this tenant's runs with a stream token."
        ),
    )

    class Meta:
        model = Tenant
        fields = ("allowed_origins",)  # the admin adds the fieldsets' fields


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    form = TenantForm
    list_display = (
        "slug",
        "name",
        "is_active",
        "weight",
        "default_lane",
        "max_lane",
        "steps_usage",
        "active_runs_usage",
        "queued_runs_usage",
        "tokens_usage",
        "ready_backlog",
        "steps_per_minute",
    )
    list_filter = ("is_active", "default_lane", "max_lane")
    search_fields = ("slug", "name")
    readonly_fields = ("public_id", "created_at", "webhook_secret", "live_usage")
    inlines = [ApiKeyInline, MembershipInline]
    actions = ["pause", "resume", "rotate_webhook_secret"]
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}
    fieldsets = (
        (None, {"fields": ("name", "slug", "is_active", "public_id", "created_at")}),
        (
            "Live usage",
            {
                "fields": ("live_usage",),
                "description": "Quota edits take effect at the scheduler's next cycle.",
            },
        ),
        ("Webhooks", {"fields": ("webhook_secret", "approval_webhook_url")}),
        ("Browsers", {"fields": ("allowed_origins",)}),
        ("Scheduling", {"fields": ("weight", "default_lane", "max_lane")}),
        (
            "Quotas",
            {
                "fields": (
                    "max_concurrent_steps",
                    "max_active_runs",
                    "max_queued_runs",
                    "steps_per_minute",
                    "llm_tokens_per_day",
                )
            },
        ),
        ("Retention", {"fields": ("retention_days",)}),
    )

    def get_queryset(self, request):
        return with_usage(super().get_queryset(request))

    @admin.display(description="steps in flight / max")
    def steps_usage(self, obj: Tenant) -> str:
        return f"{obj.in_flight_steps} / {obj.max_concurrent_steps} ({obj.running_steps} running)"

    @admin.display(description="active runs / max")
    def active_runs_usage(self, obj: Tenant) -> str:
        return f"{obj.active_runs} / {obj.max_active_runs}"

    @admin.display(description="queued runs / max")
    def queued_runs_usage(self, obj: Tenant) -> str:
        return f"{obj.queued_runs} / {obj.max_queued_runs}"

    @admin.display(description="LLM tokens today / max")
    def tokens_usage(self, obj: Tenant) -> str:
        return f"{obj.tokens_today:,} / {obj.llm_tokens_per_day:,}"

    @admin.display(description="ready backlog")
    def ready_backlog(self, obj: Tenant) -> int:
        return obj.ready_steps

    @admin.display(description="usage now")
    def live_usage(self, obj: Tenant) -> str:
        if obj.pk is None:
            return "-"
        obj = with_usage(Tenant.objects.filter(pk=obj.pk)).get()
        return (
            f"steps in flight {self.steps_usage(obj)}; active runs {self.active_runs_usage(obj)};"
            f" queued runs {self.queued_runs_usage(obj)}; LLM tokens today "
            f"{self.tokens_usage(obj)}; ready backlog {obj.ready_steps}"
        )

    @admin.action(description="Pause (nothing new starts; ready steps wait)")
    def pause(self, request, queryset):
        for tenant in queryset:
            tenant_pause(tenant=tenant)
        messages.success(request, f"Paused {queryset.count()} tenant(s).")

    @admin.action(description="Resume")
    def resume(self, request, queryset):
        for tenant in queryset:
            tenant_resume(tenant=tenant)
        messages.success(request, f"Resumed {queryset.count()} tenant(s).")

    @admin.display(description="webhook secret")
    def webhook_secret(self, obj: Tenant) -> str:
        # The secret itself is shown once, when rotated (the "Rotate" action), never on a page.
        if not obj.webhook_secret_encrypted:
            return "none yet: created on first use, or with the “Rotate webhook secret” action"
        return (
            f"set (encrypted), rotated {obj.webhook_secret_rotated_at:%Y-%m-%d %H:%M} UTC; "
            "use the “Rotate webhook secret” action on the tenant list to replace it"
        )

    @admin.action(description="Rotate webhook secret (shows the new secret once)")
    def rotate_webhook_secret(self, request, queryset):
        for tenant in queryset:
            secret = tenant_webhook_secret_rotate(tenant=tenant)
            messages.warning(
                request,
                f"New webhook secret of {tenant.slug}: {secret} — copy it now: it will not "
                "be shown again. Deliveries from now on are signed with it.",
            )


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("name", "tenant", "prefix", "created_at", "last_used_at", "revoked_at")
    list_filter = ("tenant", ("revoked_at", admin.EmptyFieldListFilter))
    search_fields = ("name", "prefix", "tenant__slug")
    readonly_fields = ("prefix", "created_at", "last_used_at")
    fields = ("tenant", "name", "scopes", "prefix", "created_at", "last_used_at", "revoked_at")

    def save_model(self, request, obj, form, change):
        if not change:
            raw_key = api_key_fill(obj)
            obj.save()
            messages.warning(
                request,
                f"The new API key is {raw_key} — copy it now: it is stored hashed and will "
                "not be shown again.",
            )
            return
        super().save_model(request, obj, form, change)


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ("user", "tenant", "role", "created_at")
    list_filter = ("role", "tenant")
    search_fields = ("user__username", "tenant__slug")
    autocomplete_fields = ("user",)
