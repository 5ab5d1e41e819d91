from django.contrib import admin, messages

from tenants.models import ApiKey, Membership, Tenant
from tenants.services import api_key_fill


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


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = (
        "slug",
        "name",
        "weight",
        "default_lane",
        "max_lane",
        "max_concurrent_steps",
        "max_active_runs",
        "max_queued_runs",
        "steps_per_minute",
        "llm_tokens_per_day",
        "is_active",
    )
    list_filter = ("is_active", "default_lane", "max_lane")
    search_fields = ("slug", "name")
    readonly_fields = ("public_id", "created_at")
    inlines = [ApiKeyInline, MembershipInline]
    fieldsets = (
        (None, {"fields": ("name", "slug", "is_active", "public_id", "created_at")}),
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
