"""Every write to tenants and API keys."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from django.db import transaction
from django.utils import timezone

from tenants.models import ApiKey, Tenant


def hash_key(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


@dataclass(frozen=True)
class IssuedKey:
    api_key: ApiKey
    raw_key: str  # shown once, never stored


def api_key_fill(api_key: ApiKey) -> str:
    """Give an unsaved ApiKey a fresh secret; returns the raw key (to show once)."""
    prefix = secrets.token_hex(4)
    raw_key = f"sy_{prefix}_{secrets.token_urlsafe(32)}"
    api_key.prefix = prefix
    api_key.key_hash = hash_key(raw_key)
    return raw_key


def api_key_issue(*, tenant: Tenant, name: str, scopes: list[str] | None = None) -> IssuedKey:
    api_key = ApiKey(tenant=tenant, name=name, scopes=scopes or [])
    raw_key = api_key_fill(api_key)
    api_key.save()
    return IssuedKey(api_key=api_key, raw_key=raw_key)


def api_key_revoke(*, api_key: ApiKey) -> None:
    ApiKey.objects.filter(pk=api_key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())


@transaction.atomic
def tenant_create(*, slug: str, name: str = "", weight: int = 1) -> tuple[Tenant, IssuedKey]:
    tenant = Tenant.objects.create(slug=slug, name=name or slug, weight=weight)
    return tenant, api_key_issue(tenant=tenant, name="default")


def tenant_pause(*, tenant: Tenant) -> None:
    Tenant.objects.filter(pk=tenant.pk).update(is_active=False)


def tenant_resume(*, tenant: Tenant) -> None:
    Tenant.objects.filter(pk=tenant.pk).update(is_active=True)
