"""Shared fixtures: an owner tenant and an outsider tenant, each with an API key."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

import tests.support.tools  # noqa: F401 - registers the test tools in this process


class TenantClient:
    def __init__(self, tenant, raw_key: str):
        self.tenant = tenant
        self.raw_key = raw_key
        self.api = APIClient()
        self.api.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")


def make_tenant_client(slug: str, **fields) -> TenantClient:
    from tenants.services import tenant_create

    tenant, issued = tenant_create(slug=slug, name=slug.title())
    for name, value in fields.items():
        setattr(tenant, name, value)
    if fields:
        tenant.save()
    return TenantClient(tenant, issued.raw_key)


@pytest.fixture
def owner(db) -> TenantClient:
    return make_tenant_client("owner")


@pytest.fixture
def outsider(db) -> TenantClient:
    return make_tenant_client("outsider")


@pytest.fixture
def ledger(tmp_path, monkeypatch):
    path = tmp_path / "ledger"
    path.mkdir()
    monkeypatch.setenv("SWITCHYARD_TEST_LEDGER", str(path))
    return path


@pytest.fixture
def scheduler_only(settings):
    """Admission by the scheduler's cycle alone (no direct admission): for the tests of the
    scheduler's own path. Everything else runs as in production, with direct admission on."""
    settings.SWITCHYARD_DIRECT_ADMISSION = False
