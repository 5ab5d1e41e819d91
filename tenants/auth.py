"""API-key authentication for the client API: `Authorization: Bearer sy_<prefix>_<secret>`."""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone
from rest_framework import authentication, exceptions, permissions

from tenants.keycache import cached_key, remember_key
from tenants.models import ApiKey, Scope
from tenants.services import hash_key

# last_used_at is a hint for admins, not an audit log: write it at most once a minute per key.
_LAST_USED_RESOLUTION = timedelta(minutes=1)


def api_key_lookup(raw_key: str) -> ApiKey | None:
    """The live key for `raw_key`, with its tenant, or None (cached: `tenants.keycache`)."""
    if not raw_key.startswith("sy_"):
        return None
    key_hash = hash_key(raw_key)
    api_key = cached_key(key_hash)
    if api_key is not None:
        return api_key
    api_key = (
        ApiKey.objects.select_related("tenant")
        .filter(key_hash=key_hash, revoked_at__isnull=True)
        .first()
    )
    if api_key is None:
        return None
    remember_key(api_key)
    now = timezone.now()
    if api_key.last_used_at is None or now - api_key.last_used_at > _LAST_USED_RESOLUTION:
        ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=now)
    return api_key


class TenantPrincipal:
    """`request.user` for API calls: the tenant behind the key (never a Django user)."""

    is_authenticated = True
    is_anonymous = False
    is_staff = False

    def __init__(self, api_key: ApiKey):
        self.api_key = api_key
        self.tenant = api_key.tenant

    def __str__(self) -> str:
        return f"tenant:{self.tenant.slug}"

    def has_scope(self, scope: str) -> bool:
        return scope in (self.api_key.scopes or [])


class ApiKeyAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).decode(errors="replace")
        if not header:
            return None
        scheme, _, raw_key = header.partition(" ")
        if scheme != self.keyword or not raw_key.strip():
            raise exceptions.AuthenticationFailed(
                "Authorization header must be 'Bearer <API key>'."
            )
        api_key = api_key_lookup(raw_key.strip())
        if api_key is None:
            raise exceptions.AuthenticationFailed("Unknown or revoked API key.")
        return TenantPrincipal(api_key), api_key

    def authenticate_header(self, request) -> str:
        return self.keyword


class HasAdminScope(permissions.BasePermission):
    """The caller's API key has the `admin` scope (managing keys and the webhook secret)."""

    message = "this API key lacks the 'admin' scope"

    def has_permission(self, request, view) -> bool:
        user = request.user
        return isinstance(user, TenantPrincipal) and user.has_scope(Scope.ADMIN)
