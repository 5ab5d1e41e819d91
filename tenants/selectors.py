"""Reads of the tenants app, scoped by the caller's tenant (the one door to tenant data)."""

from __future__ import annotations

import uuid

from django.db.models import QuerySet

from tenants.models import ApiKey, Tenant


def api_keys_for(*, tenant: Tenant) -> QuerySet[ApiKey]:
    """The tenant's keys, revoked ones included, newest first."""
    return ApiKey.objects.filter(tenant=tenant).order_by("-created_at", "-id")


def api_key_for(*, tenant: Tenant, key_id: str | uuid.UUID) -> ApiKey | None:
    """The tenant's key with this public id; None for a malformed id or another tenant's key."""
    try:
        public_id = uuid.UUID(str(key_id))
    except ValueError:
        return None
    return ApiKey.objects.filter(tenant=tenant, public_id=public_id).first()
