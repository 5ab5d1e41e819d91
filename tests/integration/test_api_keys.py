"""API keys and the webhook secret through the API (keys with the `admin` scope) and the admin."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from jobs.models import Run
from tenants.models import ApiKey, Tenant
from tenants.services import api_key_issue, tenant_create


def _client(raw_key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    return client


@pytest.fixture
def plain_key(owner) -> APIClient:
    """A key of the owner tenant without the admin scope."""
    return _client(api_key_issue(tenant=owner.tenant, name="app").raw_key)


def test_a_new_tenants_default_key_may_manage_keys(db):
    tenant, issued = tenant_create(slug="initech")
    assert issued.api_key.scopes == ["admin"]
    assert _client(issued.raw_key).get("/api/v1/keys/").status_code == 200
    assert tenant.webhook_secret_encrypted  # a tenant is born with a webhook secret


def test_creating_a_key_returns_the_whole_key_once(owner):
    response = owner.api.post("/api/v1/keys/", {"name": "ci", "scopes": []}, format="json")
    assert response.status_code == 201
    created = response.json()
    raw_key = created["key"]
    assert raw_key.startswith(f"sy_{created['prefix']}_")
    assert created["name"] == "ci" and created["scopes"] == []
    assert created["revoked_at"] is None and created["last_used_at"] is None
    stored = ApiKey.objects.get(public_id=created["id"])
    assert raw_key not in (stored.key_hash, stored.prefix)
    assert _client(raw_key).get("/api/v1/runs/").status_code == 200
    listing = owner.api.get("/api/v1/keys/").json()["keys"]
    assert {key["name"] for key in listing} == {"default", "ci"}
    assert all("key" not in key for key in listing)  # never shown again
    assert raw_key not in str(owner.api.get("/api/v1/keys/").content)


def test_the_list_shows_name_prefix_scopes_and_times(owner):
    [default] = owner.api.get("/api/v1/keys/").json()["keys"]
    stored = ApiKey.objects.get(tenant=owner.tenant)
    assert default == {
        "id": str(stored.public_id),
        "name": "default",
        "prefix": stored.prefix,
        "scopes": ["admin"],
        "created_at": stored.created_at.isoformat(),
        "last_used_at": stored.last_used_at.isoformat(),  # this very request used it
        "revoked_at": None,
    }


def test_an_unknown_scope_is_refused(owner):
    response = owner.api.post("/api/v1/keys/", {"name": "x", "scopes": ["root"]}, format="json")
    assert response.status_code == 400
    assert response.json()["error"]["details"][0]["path"] == "scopes[0]"


def test_revoking_a_key_makes_it_401_and_shows_in_the_list(owner):
    created = owner.api.post("/api/v1/keys/", {"name": "old"}, format="json").json()
    response = owner.api.delete(f"/api/v1/keys/{created['id']}/")
    assert response.status_code == 200
    revoked_at = response.json()["revoked_at"]
    assert revoked_at is not None
    assert _client(created["key"]).get("/api/v1/runs/").status_code == 401
    again = owner.api.delete(f"/api/v1/keys/{created['id']}/")  # idempotent
    assert again.status_code == 200 and again.json()["revoked_at"] == revoked_at
    listing = {k["name"]: k for k in owner.api.get("/api/v1/keys/").json()["keys"]}
    assert listing["old"]["revoked_at"] == revoked_at


def test_a_key_without_the_admin_scope_gets_403_in_the_envelope(owner, plain_key):
    for response in (
        plain_key.get("/api/v1/keys/"),
        plain_key.post("/api/v1/keys/", {"name": "x"}, format="json"),
        plain_key.delete(f"/api/v1/keys/{ApiKey.objects.first().public_id}/"),
        plain_key.get("/api/v1/webhook-secret/"),
        plain_key.post("/api/v1/webhook-secret/rotate/"),
    ):
        assert response.status_code == 403
        assert response.json()["error"] == {
            "code": "forbidden",
            "message": "this API key lacks the 'admin' scope",
        }
    assert ApiKey.objects.filter(revoked_at__isnull=False).count() == 0
    assert plain_key.get("/api/v1/runs/").status_code == 200  # the client API is unaffected


def test_another_tenants_key_is_a_404(owner, outsider):
    theirs = ApiKey.objects.get(tenant=outsider.tenant)
    response = owner.api.delete(f"/api/v1/keys/{theirs.public_id}/")
    assert response.status_code == 404
    assert response.json()["error"] == {"code": "not_found", "message": "API key not found"}
    theirs.refresh_from_db()
    assert theirs.revoked_at is None
    assert owner.api.delete("/api/v1/keys/not-a-uuid/").status_code == 404
    names = [k["id"] for k in owner.api.get("/api/v1/keys/").json()["keys"]]
    assert str(theirs.public_id) not in names


def test_last_used_is_written_at_most_once_a_minute(owner, settings):
    # Each lookup reads the key (no per-process cache): the test moves last_used_at itself.
    settings.SWITCHYARD_API_KEY_CACHE_S = 0
    key = ApiKey.objects.get(tenant=owner.tenant)
    owner.api.get("/api/v1/runs/")
    key.refresh_from_db()
    first = key.last_used_at
    assert first is not None
    owner.api.get("/api/v1/runs/")
    key.refresh_from_db()
    assert key.last_used_at == first  # no write on every request
    ApiKey.objects.filter(pk=key.pk).update(last_used_at=timezone.now() - timedelta(minutes=2))
    owner.api.get("/api/v1/runs/")
    key.refresh_from_db()
    assert key.last_used_at > timezone.now() - timedelta(seconds=30)  # written again


def test_the_webhook_secret_is_readable_rotatable_and_encrypted_at_rest(owner, outsider):
    secret = owner.api.get("/api/v1/webhook-secret/").json()
    assert secret["secret"].startswith("whsec_") and secret["rotated_at"]
    stored = Tenant.objects.get(pk=owner.tenant.pk).webhook_secret_encrypted
    assert secret["secret"] not in stored and secret["secret"][6:] not in stored
    rotated = owner.api.post("/api/v1/webhook-secret/rotate/").json()
    assert rotated["secret"] != secret["secret"]
    assert owner.api.get("/api/v1/webhook-secret/").json()["secret"] == rotated["secret"]
    assert outsider.api.get("/api/v1/webhook-secret/").json()["secret"] not in (
        secret["secret"],
        rotated["secret"],
    )


def test_a_tenant_made_in_the_admin_gets_a_secret_on_first_use(owner):
    Tenant.objects.filter(pk=owner.tenant.pk).update(webhook_secret_encrypted="")
    first = owner.api.get("/api/v1/webhook-secret/").json()["secret"]
    assert owner.api.get("/api/v1/webhook-secret/").json()["secret"] == first


def test_the_admin_rotates_a_webhook_secret_and_shows_it_once(owner, admin_client):
    old = owner.api.get("/api/v1/webhook-secret/").json()["secret"]
    response = admin_client.post(
        "/admin/tenants/tenant/",
        {"action": "rotate_webhook_secret", "_selected_action": [owner.tenant.pk]},
        follow=True,
    )
    text = response.content.decode()
    new = text.split("New webhook secret of owner: ")[1].split(" ")[0]
    assert new.startswith("whsec_") and new != old
    assert owner.api.get("/api/v1/webhook-secret/").json()["secret"] == new
    page = admin_client.get(f"/admin/tenants/tenant/{owner.tenant.pk}/change/").content.decode()
    assert new not in page and "set (encrypted), rotated" in page


def test_a_key_revoked_in_another_process_is_refused_within_the_cache_bound(owner, settings):
    settings.SWITCHYARD_API_KEY_CACHE_S = 1.0
    workflow = {"name": "hello", "steps": [{"id": "a", "kind": "tool", "tool": "echo"}]}
    assert owner.api.post("/api/v1/workflows/", workflow, format="json").status_code == 201
    assert owner.api.get("/api/v1/runs/").status_code == 200  # the key is cached now
    # Revoked as another process would: this process's cache is not told.
    ApiKey.objects.filter(tenant=owner.tenant).update(revoked_at=timezone.now())
    revoked_at = time.monotonic()

    # A submission checks its key in its own statement: refused at once, nothing created.
    refused = owner.api.post("/api/v1/runs/", {"workflow": "hello"}, format="json")
    assert refused.status_code == 401
    assert not Run.objects.filter(tenant=owner.tenant).exists()
    # Every other request within the cache's bound (1 s).
    time.sleep(max(0.0, revoked_at + 1.05 - time.monotonic()))
    assert owner.api.get("/api/v1/runs/").status_code == 401
