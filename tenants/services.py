"""Every write to tenants and API keys."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from django.db import connection, transaction
from django.utils import timezone

from orchestrator.encryption import decrypt, encrypt
from tenants.keycache import forget_key
from tenants.models import ApiKey, Scope, Tenant

WEBHOOK_SECRET_PREFIX = "whsec_"


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
    api_key = ApiKey(tenant=tenant, name=name, scopes=sorted(set(scopes or [])))
    raw_key = api_key_fill(api_key)
    api_key.save()
    return IssuedKey(api_key=api_key, raw_key=raw_key)


def api_key_revoke(*, api_key: ApiKey) -> ApiKey:
    """Revoke `api_key` (idempotent: a revoked key keeps its first revocation time)."""
    ApiKey.objects.filter(pk=api_key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    forget_key(api_key.key_hash)
    api_key.refresh_from_db(fields=["revoked_at"])
    return api_key


@transaction.atomic
def tenant_create(*, slug: str, name: str = "", weight: int = 1) -> tuple[Tenant, IssuedKey]:
    """A tenant with a webhook secret and a `default` key that may manage the tenant's keys."""
    tenant = Tenant.objects.create(slug=slug, name=name or slug, weight=weight)
    tenant_webhook_secret_rotate(tenant=tenant)
    return tenant, api_key_issue(tenant=tenant, name="default", scopes=[Scope.ADMIN])


def tenant_pause(*, tenant: Tenant) -> None:
    Tenant.objects.filter(pk=tenant.pk).update(is_active=False)
    # A scheduler cycle that decided before the pause decides again (jobs/scheduler.py).
    with connection.cursor() as cursor:
        cursor.execute("SELECT nextval('switchyard_admission_epoch')")


def tenant_resume(*, tenant: Tenant) -> None:
    Tenant.objects.filter(pk=tenant.pk).update(is_active=True)


# --- the webhook signing secret -------------------------------------------------------------


def _new_webhook_secret() -> str:
    return WEBHOOK_SECRET_PREFIX + secrets.token_urlsafe(32)


def tenant_webhook_secret_rotate(*, tenant: Tenant) -> str:
    """Replace the tenant's webhook secret; returns the new one (in plain text, to show).

    Deliveries attempted from now on are signed with the new secret, retries of older
    deliveries included.
    """
    secret = _new_webhook_secret()
    now = timezone.now()
    encrypted = encrypt(secret)
    Tenant.objects.filter(pk=tenant.pk).update(
        webhook_secret_encrypted=encrypted, webhook_secret_rotated_at=now
    )
    tenant.webhook_secret_encrypted = encrypted
    tenant.webhook_secret_rotated_at = now
    return secret


def tenant_webhook_secret_ensure(*, tenant_id: int) -> str:
    """The tenant's webhook secret in plain text, created on first use.

    Tenants made before webhooks existed, or in the admin, have none until they need one.
    Creation is a compare-and-set on the empty column, so concurrent first uses agree.
    """
    stored = Tenant.objects.filter(pk=tenant_id).values_list("webhook_secret_encrypted", flat=True)
    encrypted = stored.first()
    if encrypted:
        return decrypt(encrypted)
    secret = _new_webhook_secret()
    created = Tenant.objects.filter(pk=tenant_id, webhook_secret_encrypted="").update(
        webhook_secret_encrypted=encrypt(secret), webhook_secret_rotated_at=timezone.now()
    )
    if created:
        return secret
    return decrypt(stored.first())
