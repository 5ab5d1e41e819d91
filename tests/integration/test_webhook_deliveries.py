"""Webhook deliveries step by step, in this process: creation at the run's end, the signed POST
to a real receiver, backoff and giving up (in the database), lost claims, stale messages, the
outbound URL policy at delivery, and what the API and the admin show of it.

The same path through the broker, the scheduler's sweep and a `webhooks` worker is proven in
test_webhooks.py.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.utils import timezone

from jobs.models import Run, WebhookAttempt, WebhookDelivery, WebhookStatus
from jobs.services.webhooks import (
    LOST_ATTEMPT_ERROR,
    webhook_delivery_claim,
    webhook_delivery_dispatch,
    webhook_delivery_redeliver,
)
from jobs.transitions.runs import run_cancel
from jobs.webhooks import webhook_deliver
from tests.support.receiver import WebhookReceiver
from tests.support.signatures import documented_verifier

ECHO = {
    "name": "hook",
    "steps": [{"id": "only", "kind": "tool", "tool": "echo", "args": {"n": 1}}],
}


@pytest.fixture
def hook(owner):
    response = owner.api.post("/api/v1/workflows/", ECHO, format="json")
    assert response.status_code == 201
    return owner


@pytest.fixture
def private_ok(settings):
    settings.SWITCHYARD_ALLOW_PRIVATE_URLS = True
    return settings


def _submit(client, url: str) -> Run:
    response = client.api.post(
        "/api/v1/runs/", {"workflow": "hook", "webhook_url": url}, format="json"
    )
    assert response.status_code == 202, response.content
    return Run.objects.get(public_id=response.json()["id"])


def _ended_run(client, url: str) -> tuple[Run, WebhookDelivery]:
    run = _submit(client, url)
    run_cancel(run=run, reason="ended for the test")
    return run, WebhookDelivery.objects.get(run=run)


def _attempt_now(delivery: WebhookDelivery) -> WebhookDelivery:
    """Make the delivery due, dispatch it and deliver the message as a worker would."""
    WebhookDelivery.objects.filter(pk=delivery.pk).update(next_attempt_at=timezone.now())
    dispatch = webhook_delivery_dispatch(delivery_id=delivery.pk)
    assert dispatch is not None
    webhook_deliver(
        delivery_id=dispatch.delivery_id,
        dispatch_token=str(dispatch.dispatch_token),
        worker="test",
    )
    delivery.refresh_from_db()
    return delivery


def test_a_run_that_ends_gets_one_delivery_with_the_run_as_its_body(hook, private_ok):
    run, delivery = _ended_run(hook, "http://127.0.0.1:9/hooks")
    assert delivery.status == WebhookStatus.PENDING and delivery.attempts == 0
    assert delivery.url == "http://127.0.0.1:9/hooks" and delivery.tenant == hook.tenant
    assert delivery.next_attempt_at <= timezone.now()
    body = json.loads(delivery.payload)
    assert body["id"] == str(delivery.event_id) and body["type"] == "run.cancelled"
    assert body["run"]["id"] == str(run.public_id)
    assert body["run"]["status"] == "cancelled"
    assert body["run"]["error"] == "ended for the test"
    assert body["run"]["steps"][0]["id"] == "only"
    assert body["run"]["links"]["self"].endswith(f"/api/v1/runs/{run.public_id}/")


def test_a_run_without_a_webhook_url_gets_no_delivery(hook):
    response = hook.api.post("/api/v1/runs/", {"workflow": "hook"}, format="json")
    run = Run.objects.get(public_id=response.json()["id"])
    run_cancel(run=run)
    assert not WebhookDelivery.objects.exists()


def test_the_post_is_signed_so_that_the_documented_snippet_verifies_it(hook, private_ok):
    verify = documented_verifier()
    secret = hook.api.get("/api/v1/webhook-secret/").json()["secret"]
    with WebhookReceiver() as receiver:
        run, delivery = _ended_run(hook, receiver.url)
        delivery = _attempt_now(delivery)
        [request] = receiver.received
    assert delivery.status == WebhookStatus.SUCCEEDED and delivery.last_status_code == 200
    assert request.path == "/hooks/switchyard"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Switchyard-Event-Id"] == str(delivery.event_id)
    assert verify(secret, request.headers, request.body)
    assert not verify(secret, request.headers, request.body + b" ")
    assert not verify("whsec_another", request.headers, request.body)
    assert json.loads(request.body)["run"]["id"] == str(run.public_id)


def test_a_rotated_secret_signs_the_next_attempts(hook, private_ok):
    verify = documented_verifier()
    old = hook.api.get("/api/v1/webhook-secret/").json()["secret"]
    with WebhookReceiver(answers=[500]) as receiver:
        _, delivery = _ended_run(hook, receiver.url)
        _attempt_now(delivery)
        new = hook.api.post("/api/v1/webhook-secret/rotate/").json()["secret"]
        _attempt_now(delivery)
        first, second = receiver.received
    assert new != old
    assert verify(old, first.headers, first.body) and not verify(new, first.headers, first.body)
    assert verify(new, second.headers, second.body)


def test_failures_back_off_exponentially_in_the_database_then_give_up(hook, private_ok):
    private_ok.SWITCHYARD_WEBHOOK_BACKOFF_S = 30
    private_ok.SWITCHYARD_WEBHOOK_MAX_BACKOFF_S = 200
    with WebhookReceiver(answers=[500] * 10) as receiver:
        _, delivery = _ended_run(hook, receiver.url)
        delays = []
        for _ in range(5):
            delivery = _attempt_now(delivery)
            assert delivery.status == WebhookStatus.FAILED
            delays.append((delivery.next_attempt_at - delivery.last_attempt_at).total_seconds())
        assert delays == [30, 60, 120, 200, 200]  # doubling, capped
        assert delivery.last_status_code == 500
        assert delivery.last_error == "HTTP 500: receiver is down"
        # The first attempt was a day ago: the window has passed, this failure is the last.
        WebhookDelivery.objects.filter(pk=delivery.pk).update(
            first_attempt_at=timezone.now() - timedelta(days=1)
        )
        delivery = _attempt_now(delivery)
    assert delivery.status == WebhookStatus.GAVE_UP
    assert delivery.next_attempt_at is None and delivery.finished_at is not None
    assert delivery.attempts == 6 and len(receiver.received) == 6
    assert webhook_delivery_dispatch(delivery_id=delivery.pk) is None


def test_an_unreachable_receiver_is_a_failed_attempt_with_the_error(hook, private_ok):
    private_ok.SWITCHYARD_WEBHOOK_TIMEOUT_S = 2
    with WebhookReceiver() as receiver:
        url = receiver.url
    _, delivery = _ended_run(hook, url)  # nothing listens there any more
    delivery = _attempt_now(delivery)
    attempt = delivery.attempt_log.get()
    assert delivery.status == WebhookStatus.FAILED
    assert attempt.status_code is None and "ConnectError" in attempt.error


def test_a_private_address_is_refused_again_at_delivery(hook, private_ok):
    with WebhookReceiver() as receiver:
        _, delivery = _ended_run(hook, receiver.url)
        private_ok.SWITCHYARD_ALLOW_PRIVATE_URLS = False
        delivery = _attempt_now(delivery)
        assert receiver.received == []
    assert delivery.status == WebhookStatus.GAVE_UP
    assert "127.0.0.1 is a loopback address" in delivery.last_error


def test_a_claim_whose_worker_never_reported_is_recorded_as_a_lost_attempt(hook, private_ok):
    _, delivery = _ended_run(hook, "http://127.0.0.1:9/hooks")
    dispatch = webhook_delivery_dispatch(delivery_id=delivery.pk)
    claim = webhook_delivery_claim(
        delivery_id=delivery.pk, dispatch_token=str(dispatch.dispatch_token)
    )
    assert claim is not None and claim.attempt == 1
    # A redelivered copy of the message finds the delivery claimed: dropped.
    assert (
        webhook_delivery_claim(delivery_id=delivery.pk, dispatch_token=str(claim.dispatch_token))
        is None
    )
    # The worker died; its lease runs out.
    WebhookDelivery.objects.filter(pk=delivery.pk).update(next_attempt_at=timezone.now())
    assert webhook_delivery_dispatch(delivery_id=delivery.pk) is None
    delivery.refresh_from_db()
    assert delivery.status == WebhookStatus.FAILED and delivery.attempts == 1
    assert delivery.attempt_log.get().error == LOST_ATTEMPT_ERROR
    assert delivery.next_attempt_at > timezone.now()  # after its backoff, like any failure


def test_an_old_message_is_dropped_once_the_delivery_was_dispatched_again(hook, private_ok):
    _, delivery = _ended_run(hook, "http://127.0.0.1:9/hooks")
    first = webhook_delivery_dispatch(delivery_id=delivery.pk)
    assert webhook_delivery_dispatch(delivery_id=delivery.pk) is None  # not due: in flight
    WebhookDelivery.objects.filter(pk=delivery.pk).update(next_attempt_at=timezone.now())
    second = webhook_delivery_dispatch(delivery_id=delivery.pk)  # the first message was lost
    assert second.dispatch_token != first.dispatch_token
    assert (
        webhook_delivery_claim(delivery_id=delivery.pk, dispatch_token=str(first.dispatch_token))
        is None
    )
    assert not WebhookAttempt.objects.exists()


def test_an_operator_can_deliver_a_delivery_that_gave_up_again(hook, private_ok):
    with WebhookReceiver(answers=[500]) as receiver:
        _, delivery = _ended_run(hook, receiver.url)
        private_ok.SWITCHYARD_WEBHOOK_RETRY_WINDOW_S = 0
        assert _attempt_now(delivery).status == WebhookStatus.GAVE_UP
        webhook_delivery_redeliver(delivery=delivery)
        delivery = _attempt_now(delivery)
        assert len({r.headers["Switchyard-Event-Id"] for r in receiver.received}) == 1
    assert delivery.status == WebhookStatus.SUCCEEDED and delivery.attempts == 2


def test_the_run_detail_shows_the_delivery_and_each_attempt(hook, outsider, private_ok):
    with WebhookReceiver(answers=[503]) as receiver:
        run, delivery = _ended_run(hook, receiver.url)
        _attempt_now(delivery)
        _attempt_now(delivery)
    detail = hook.api.get(f"/api/v1/runs/{run.public_id}/").json()
    webhook = detail["webhook"]
    assert webhook["url"] == receiver.url and webhook["status"] == "succeeded"
    assert webhook["event"] == "run.cancelled" and webhook["event_id"] == str(delivery.event_id)
    assert [a["status_code"] for a in webhook["attempts"]] == [503, 200]
    assert webhook["attempts"][0]["error"] == "HTTP 503: receiver is down"
    assert webhook["attempts"][1]["error"] is None
    assert all(a["latency_ms"] > 0 for a in webhook["attempts"])
    assert outsider.api.get(f"/api/v1/runs/{run.public_id}/").status_code == 404
    plain = hook.api.post("/api/v1/runs/", {"workflow": "hook"}, format="json").json()
    assert hook.api.get(f"/api/v1/runs/{plain['id']}/").json()["webhook"] is None


def test_a_running_runs_webhook_has_no_status_yet(hook, private_ok):
    run = _submit(hook, "http://127.0.0.1:9/hooks")
    webhook = hook.api.get(f"/api/v1/runs/{run.public_id}/").json()["webhook"]
    assert webhook == {
        "url": "http://127.0.0.1:9/hooks",
        "status": None,
        "event_id": None,
        "event": None,
        "next_attempt_at": None,
        "attempts": [],
    }


def test_deliveries_and_attempts_are_visible_in_the_admin(hook, private_ok, admin_client):
    with WebhookReceiver(answers=[500]) as receiver:
        run, delivery = _ended_run(hook, receiver.url)
        _attempt_now(delivery)
    listing = admin_client.get("/admin/jobs/webhookdelivery/?status__exact=failed")
    assert listing.status_code == 200
    assert str(run.public_id) in listing.content.decode()
    page = admin_client.get(f"/admin/jobs/webhookdelivery/{delivery.pk}/change/").content.decode()
    assert "HTTP 500: receiver is down" in page and str(delivery.event_id) in page
    run_page = admin_client.get(f"/admin/jobs/run/{run.pk}/change/").content.decode()
    assert "run.cancelled" in run_page and receiver.url in run_page
    response = admin_client.post(
        "/admin/jobs/webhookdelivery/",
        {"action": "deliver_again", "_selected_action": [delivery.pk]},
        follow=True,
    )
    assert "1 deliveries will be attempted again." in response.content.decode()
    delivery.refresh_from_db()
    assert delivery.status == WebhookStatus.PENDING
