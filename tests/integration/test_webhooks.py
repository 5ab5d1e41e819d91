"""Webhooks end to end (docs/api.md, "7. Webhooks"): a run submitted through the API ends on
real workers, the scheduler's sweep publishes its delivery on the `webhooks` queue, a webhooks
worker POSTs it to a real receiver on 127.0.0.1, signed; failed attempts are retried from the
database.
"""

from __future__ import annotations

import json

import pytest

from jobs.models import Run, WebhookDelivery, WebhookStatus
from tests.support.cluster import Cluster
from tests.support.receiver import WebhookReceiver
from tests.support.signatures import documented_verifier

pytestmark = pytest.mark.cluster

GREET = {
    "name": "greet",
    "steps": [
        {"id": "hello", "kind": "tool", "tool": "echo", "args": {"text": "hi {{ input.who }}"}}
    ],
    "output": "{{ steps.hello.output.args.text }}",
}


@pytest.fixture
def webhook_cluster(transactional_db, tmp_path, ledger, settings):
    """A scheduler, a tool pool and a webhooks pool that may POST to 127.0.0.1, with short
    retry delays; this process (the API) accepts loopback webhook URLs too."""
    settings.SWITCHYARD_ALLOW_PRIVATE_URLS = True
    harness = Cluster(
        tmp_path,
        ledger,
        SWITCHYARD_ALLOW_PRIVATE_URLS="true",
        SWITCHYARD_WEBHOOK_BACKOFF_S="0.2",
    )
    try:
        harness.start_scheduler()
        harness.start_worker("steps.tool", pool="threads", concurrency=2)
        harness.start_worker("webhooks", pool="threads", concurrency=2)
        yield harness
    finally:
        harness.stop_all()


def _submit(owner, url: str) -> Run:
    assert owner.api.post("/api/v1/workflows/", GREET, format="json").status_code == 201
    response = owner.api.post(
        "/api/v1/runs/",
        {"workflow": "greet", "input": {"who": "ann"}, "webhook_url": url},
        format="json",
    )
    assert response.status_code == 202, response.content
    return Run.objects.get(public_id=response.json()["id"])


def _delivered(cluster: Cluster, run: Run, attempts: int) -> WebhookDelivery:
    def done():
        delivery = WebhookDelivery.objects.filter(run=run).first()
        return delivery if delivery and delivery.status == WebhookStatus.SUCCEEDED else None

    delivery = cluster.wait_until(done, 30, f"webhook of run {run.public_id} not delivered")
    assert delivery.attempts == attempts
    return delivery


def test_a_receiver_on_loopback_gets_the_finished_run_correctly_signed(owner, webhook_cluster):
    verify = documented_verifier()
    secret = owner.api.get("/api/v1/webhook-secret/").json()["secret"]
    with WebhookReceiver() as receiver:
        run = _submit(owner, receiver.url)
        [request] = receiver.wait_for(1)
        delivery = _delivered(webhook_cluster, run, attempts=1)
    assert verify(secret, request.headers, request.body)
    body = json.loads(request.body)
    assert request.headers["Switchyard-Event-Id"] == body["id"] == str(delivery.event_id)
    assert body["type"] == "run.succeeded"
    assert body["run"]["id"] == str(run.public_id)
    assert body["run"]["status"] == "succeeded" and body["run"]["output"] == "hi ann"
    attempt = delivery.attempt_log.get()
    assert attempt.status_code == 200 and attempt.worker.startswith("webhooks-")


def test_a_receiver_that_fails_twice_gets_the_third_attempt(owner, webhook_cluster):
    verify = documented_verifier()
    secret = owner.api.get("/api/v1/webhook-secret/").json()["secret"]
    with WebhookReceiver(answers=[500, 500]) as receiver:
        run = _submit(owner, receiver.url)
        requests = receiver.wait_for(3)
        _delivered(webhook_cluster, run, attempts=3)
    assert len(requests) == 3
    assert len({r.headers["Switchyard-Event-Id"] for r in requests}) == 1
    assert len({r.body for r in requests}) == 1  # retries send the same body
    assert all(verify(secret, r.headers, r.body) for r in requests)
    # Backoff from the database: 0.2 s, then 0.4 s (plus the sweep's polling).
    assert requests[1].at - requests[0].at >= 0.2
    assert requests[2].at - requests[1].at >= 0.4
    detail = owner.api.get(f"/api/v1/runs/{run.public_id}/").json()["webhook"]
    assert detail["status"] == "succeeded"
    assert [a["status_code"] for a in detail["attempts"]] == [500, 500, 200]
