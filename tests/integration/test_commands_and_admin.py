"""The operators' scripting surface (README.md, "Operating it") and the admin pages."""

from __future__ import annotations

from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from rest_framework.test import APIClient

from jobs.models import Document, Run, Workflow
from tenants.models import ApiKey, Membership, Tenant


def _run(*args) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


@pytest.mark.django_db
def test_create_tenant_prints_a_working_key_alone_on_the_last_line():
    output = _run("create_tenant", "initech", "--name", "Initech", "--weight", "2")
    key = output.strip().splitlines()[-1]
    assert key.startswith("sy_")
    tenant = Tenant.objects.get(slug="initech")
    assert tenant.name == "Initech" and tenant.weight == 2
    assert key not in str(list(ApiKey.objects.values_list("key_hash", "prefix")))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    assert client.get("/api/v1/runs/").status_code == 200
    with pytest.raises(CommandError, match="already exists"):
        _run("create_tenant", "initech")


@pytest.mark.django_db
def test_seed_demo_is_idempotent_and_prints_working_keys():
    first = _run("seed_demo")
    second = _run("seed_demo")
    assert Tenant.objects.filter(slug__in=["acme", "globex"]).count() == 2
    assert Workflow.objects.filter(name="support-triage").count() == 2
    # Per tenant, only on the first call: three support-triage runs, two refund reviews, one
    # support agent.
    assert Run.objects.count() == 12
    assert Workflow.objects.filter(name="refund-review").count() == 2
    assert Workflow.objects.filter(name="support-agent").count() == 2
    assert Document.objects.filter(tenant__slug="acme").count() == 4
    assert Membership.objects.filter(user__username="reviewer").count() == 2
    assert get_user_model().objects.get(username="operator").is_staff
    old_key = first.split("API key for acme: ")[1].split()[0]
    new_key = second.split("API key for acme: ")[1].split()[0]
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {new_key}")
    assert client.get("/api/v1/workflows/support-triage/").status_code == 200
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {old_key}")
    assert client.get("/api/v1/runs/").status_code == 401  # rotated


@pytest.mark.django_db
def test_every_admin_list_and_detail_page_renders_for_staff(client):
    _run("seed_demo")
    client.login(username="operator", password="switchyard-operator")
    run = Run.objects.first()
    pages = [
        "/admin/tenants/tenant/",
        "/admin/tenants/apikey/",
        "/admin/tenants/membership/",
        "/admin/jobs/workflow/",
        "/admin/jobs/workflowversion/",
        "/admin/jobs/run/",
        "/admin/jobs/steprun/",
        "/admin/jobs/stepattempt/",
        "/admin/jobs/event/",
        "/admin/jobs/document/",
        f"/admin/jobs/run/{run.pk}/change/",
        f"/admin/tenants/tenant/{run.tenant_id}/change/",
        "/admin/jobs/run/?status__exact=accepted",
        "/admin/tenants/apikey/add/",
    ]
    for page in pages:
        response = client.get(page)
        assert response.status_code == 200, page
    assert b"support-triage" in client.get("/admin/jobs/workflow/").content


@pytest.mark.django_db
def test_a_key_created_in_the_admin_is_shown_once_and_stored_hashed(client):
    _run("seed_demo")
    client.login(username="operator", password="switchyard-operator")
    tenant = Tenant.objects.get(slug="acme")
    response = client.post(
        "/admin/tenants/apikey/add/",
        {"tenant": tenant.pk, "name": "ci", "scopes": "[]"},
        follow=True,
    )
    assert response.status_code == 200
    text = response.content.decode()
    key = text.split("The new API key is ")[1].split(" ")[0]
    assert key.startswith("sy_")
    stored = ApiKey.objects.get(name="ci")
    assert key not in (stored.key_hash, stored.prefix)
    page = client.get(f"/admin/tenants/apikey/{stored.pk}/change/").content.decode()
    assert key not in page
