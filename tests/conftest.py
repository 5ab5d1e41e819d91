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


@pytest.fixture(autouse=True)
def _admission_by_the_scheduler_only(settings):
    """In-process tests drive each transition themselves (`step_admit` of ready steps); a
    direct admission would queue steps whose messages a test's rolled-back transaction never
    publishes. Cluster processes keep the default (on); tests/integration/test_direct_admission.py
    tests it, in process and with real workers."""
    settings.SWITCHYARD_DIRECT_ADMISSION = False
