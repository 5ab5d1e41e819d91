"""Secrets never leak (docs/security.md): an API key and a webhook signing secret, created
through the API, are shown once, in the response that creates them, and then appear nowhere:
not in any column of any table (keys are stored as SHA-256, webhook secrets Fernet-encrypted),
not in the event log, not in any later API answer, not in error messages (a wrong or malformed
key is never echoed), not on the admin's pages, not in the logs of any of these flows (at
DEBUG, a failed webhook delivery included).

The one deliberate exception: `GET /api/v1/webhook-secret/` answers the secret to a key with
the `admin` scope, because a receiver needs it to verify signatures (docs/api.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from jobs.models import Event, Run, WebhookDelivery
from jobs.services.webhooks import webhook_delivery_dispatch
from jobs.transitions.runs import run_cancel
from jobs.webhooks import webhook_deliver
from orchestrator.encryption import decrypt
from tenants.models import ApiKey, Tenant
from tests.support.dashboard import chain
from tests.support.receiver import WebhookReceiver


@dataclass
class Flow:
    tenant: Tenant
    raw_key: str  # issued through POST /api/v1/keys/
    secret: str  # issued through POST /api/v1/webhook-secret/rotate/
    run: Run
    delivery: WebhookDelivery
    answers: dict[str, str]  # what the API answered after creation, by request
    errors: dict[str, str]  # error answers to requests with wrong or malformed keys
    log: str  # every record logged during the flows, formatted, DEBUG and up

    @property
    def secrets(self) -> dict[str, str]:
        # Also the parts a careless message might quote: the key's secret part.
        return {
            "API key": self.raw_key,
            "API key secret part": self.raw_key.split("_", 2)[2],  # sy_<prefix>_<secret>
            "webhook secret": self.secret,
            "webhook secret body": self.secret.removeprefix("whsec_"),
        }

    def leaks(self, text: str) -> list[str]:
        return [name for name, value in self.secrets.items() if value in text]


def _text(response) -> str:
    return response.content.decode(errors="replace")


def _deliver_the_first_attempt(run: Run) -> WebhookDelivery:
    """End `run` and make its webhook's first attempt at once, in this process."""
    run_cancel(run=run, reason="ended for the test")
    delivery = WebhookDelivery.objects.get(run=run)
    WebhookDelivery.objects.filter(pk=delivery.pk).update(next_attempt_at=timezone.now())
    dispatch = webhook_delivery_dispatch(delivery_id=delivery.pk)
    webhook_deliver(
        delivery_id=dispatch.delivery_id,
        dispatch_token=str(dispatch.dispatch_token),
        worker="test",
    )
    return delivery


@pytest.fixture
def flow(owner, settings, caplog) -> Flow:
    """Create a key and a secret through the API, use them, fail with them, and deliver a
    webhook that the receiver refuses."""
    settings.SWITCHYARD_ALLOW_PRIVATE_URLS = True
    caplog.set_level(logging.DEBUG)
    admin = owner.api  # the tenant's first key (admin scope)

    created = admin.post("/api/v1/keys/", {"name": "ci", "scopes": ["admin"]}, format="json")
    assert created.status_code == 201
    raw_key = created.json()["key"]
    rotated = admin.post("/api/v1/webhook-secret/rotate/")
    assert rotated.status_code == 200
    secret = rotated.json()["secret"]
    assert raw_key.startswith("sy_") and secret.startswith("whsec_")

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    definition = chain("hook", "only")
    assert client.post("/api/v1/workflows/", definition, format="json").status_code == 201
    with WebhookReceiver(answers=[500]) as receiver:
        submitted = client.post(
            "/api/v1/runs/", {"workflow": "hook", "webhook_url": receiver.url}, format="json"
        )
        assert submitted.status_code == 202, submitted.content
        run = Run.objects.get(public_id=submitted.json()["id"])
        delivery = _deliver_the_first_attempt(run)
        [request] = receiver.received
    delivery.refresh_from_db()
    assert delivery.last_status_code == 500 and delivery.attempts == 1
    assert request.headers["Switchyard-Signature"].startswith("v1=")

    run_id = run.public_id
    answers = {
        name: _text(client.get(path))
        for name, path in {
            "keys list": "/api/v1/keys/",
            "workflows": "/api/v1/workflows/",
            "workflow": "/api/v1/workflows/hook/",
            "runs": "/api/v1/runs/",
            "run": f"/api/v1/runs/{run_id}/",
            "events": f"/api/v1/runs/{run_id}/events/",
            "approvals": "/api/v1/approvals/",
        }.items()
    }
    answers["keys list (admin)"] = _text(admin.get("/api/v1/keys/"))

    errors = {}
    attempts = {
        "wrong key": f"Bearer {raw_key}x",
        "key cut short": f"Bearer {raw_key[:-3]}",
        "secret as a key": f"Bearer {secret}",
        "basic scheme": f"Basic {raw_key}",
        "no scheme": raw_key,
        "key twice": f"Bearer {raw_key} {raw_key}",
    }
    for name, header in attempts.items():
        for path in ("/api/v1/runs/", f"/api/v1/runs/{run_id}/events/"):
            response = Client(HTTP_AUTHORIZATION=header).get(path)
            assert response.status_code == 401, (name, response.status_code)
            errors[f"{name} {path}"] = _text(response) + json.dumps(dict(response.headers))
    return Flow(
        tenant=owner.tenant,
        raw_key=raw_key,
        secret=secret,
        run=run,
        delivery=delivery,
        answers=answers,
        errors=errors,
        log="\n".join(_formatted(record) for record in caplog.records),
    )


def _formatted(record: logging.LogRecord) -> str:
    text = f"{record.name} {record.levelname} {record.getMessage()}"
    if record.exc_text:
        text += record.exc_text
    return text + " " + repr(record.__dict__)


def test_the_key_is_stored_as_its_hash_and_the_secret_encrypted(flow):
    key = ApiKey.objects.get(tenant=flow.tenant, name="ci")
    assert key.key_hash == hashlib.sha256(flow.raw_key.encode()).hexdigest()
    encrypted = Tenant.objects.get(pk=flow.tenant.pk).webhook_secret_encrypted
    assert flow.secret not in encrypted and decrypt(encrypted) == flow.secret


def test_no_column_of_any_table_holds_a_secret(flow):
    """Every text, character and JSON column of every table in the database, searched."""
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT table_name, column_name FROM information_schema.columns
            WHERE table_schema = current_schema()
              AND data_type IN ('text', 'character varying', 'character', 'json', 'jsonb')
            """
        )
        columns = cursor.fetchall()
        tables = {table for table, _ in columns}
        assert {"tenants_apikey", "tenants_tenant", "jobs_event", "django_session"} <= tables
        found = []
        for table, column in columns:
            for name, value in flow.secrets.items():
                cursor.execute(
                    f'SELECT count(*) FROM "{table}" WHERE "{column}"::text LIKE %s',
                    [f"%{value}%"],
                )
                if cursor.fetchone()[0]:
                    found.append(f"{table}.{column} holds the {name}")
    assert not found, found
    assert len(columns) > 50


def test_the_event_log_and_the_delivery_record_hold_no_secret(flow):
    events = list(Event.objects.filter(run=flow.run).values("type", "data"))
    assert events and not flow.leaks(json.dumps(events))
    delivery = WebhookDelivery.objects.get(pk=flow.delivery.pk)
    record = json.dumps(
        [delivery.payload, delivery.last_error, list(delivery.attempt_log.values())], default=str
    )
    assert "receiver is down" in record  # the refused attempt is what we looked at
    assert not flow.leaks(record)


def test_no_api_answer_after_creation_shows_a_secret(flow):
    for name, text in flow.answers.items():
        assert not flow.leaks(text), f"{name} shows {flow.leaks(text)}"
    assert '"prefix"' in flow.answers["keys list"]


def test_error_answers_never_echo_the_key(flow):
    for name, text in flow.errors.items():
        assert not flow.leaks(text), f"{name}: {flow.leaks(text)} in {text[:300]}"
    assert "Unknown or revoked API key." in flow.errors["wrong key /api/v1/runs/"]


def test_the_admin_pages_show_no_secret(flow):
    root = get_user_model().objects.create_superuser("root", password=None)
    client = Client()
    client.force_login(root)
    key = ApiKey.objects.get(tenant=flow.tenant, name="ci")
    pages = [
        "/admin/tenants/apikey/",
        f"/admin/tenants/apikey/{key.pk}/change/",
        "/admin/tenants/tenant/",
        f"/admin/tenants/tenant/{flow.tenant.pk}/change/",
        "/admin/jobs/webhookdelivery/",
        f"/admin/jobs/webhookdelivery/{flow.delivery.pk}/change/",
        f"/admin/jobs/run/{flow.run.pk}/change/",
        "/admin/jobs/event/",
    ]
    for page in pages:
        response = client.get(page)
        assert response.status_code == 200, page
        assert not flow.leaks(_text(response)), f"{page} shows {flow.leaks(_text(response))}"
    tenant_page = _text(client.get(f"/admin/tenants/tenant/{flow.tenant.pk}/change/"))
    assert "set (encrypted)" in tenant_page and key.prefix in _text(client.get(pages[0]))


def test_no_log_record_of_these_flows_holds_a_secret(flow):
    assert "webhook" in flow.log and "Unauthorized" in flow.log  # the flows did log
    assert not flow.leaks(flow.log), flow.leaks(flow.log)


def test_the_webhook_secret_is_read_back_only_by_an_admin_key(flow, owner):
    admin = owner.api
    assert admin.get("/api/v1/webhook-secret/").json()["secret"] == flow.secret
    plain = APIClient()
    from tenants.services import api_key_issue

    plain.credentials(
        HTTP_AUTHORIZATION=f"Bearer {api_key_issue(tenant=flow.tenant, name='p').raw_key}"
    )
    refused = plain.get("/api/v1/webhook-secret/")
    assert refused.status_code == 403 and not flow.leaks(_text(refused))


def test_a_failed_webhook_delivery_logs_its_url_without_userinfo_or_query(owner, settings, caplog):
    """A receiver's URL may carry credentials (`user:password@`, `?token=`): the log line of
    the attempt shows where it went, not them (jobs.steps.netguard.redact_url)."""
    settings.SWITCHYARD_ALLOW_PRIVATE_URLS = True
    caplog.set_level(logging.DEBUG)
    definition = chain("hook", "only")
    assert owner.api.post("/api/v1/workflows/", definition, format="json").status_code == 201
    with WebhookReceiver(answers=[500]) as receiver:
        url = receiver.url.replace("http://", "http://hook-user:hook-password@")
        submitted = owner.api.post(
            "/api/v1/runs/",
            {"workflow": "hook", "webhook_url": f"{url}?token=hook-token#hook-fragment"},
            format="json",
        )
        assert submitted.status_code == 202, submitted.content
        run = Run.objects.get(public_id=submitted.json()["id"])
        _deliver_the_first_attempt(run)
        assert len(receiver.received) == 1
    [line] = [r.getMessage() for r in caplog.records if " attempt 1 to " in r.getMessage()]
    shown = receiver.url.replace("http://", "http://***@") + "?***"
    assert f" to {shown}: " in line and "500" in line
    for credential in ("hook-user", "hook-password", "hook-token", "hook-fragment"):
        assert credential not in line
