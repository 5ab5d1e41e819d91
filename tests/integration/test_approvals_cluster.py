"""Approval steps through the real scheduler, control and tool workers, webhooks worker and
web process (daphne): a run pauses without holding a worker, resumes on a decision, expires
and escalates by the scheduler's sweeps, notifies its tenant's webhook, and the inbox's
socket announces requests live."""

from __future__ import annotations

import json
from datetime import timedelta

import httpx
import pytest
from django.test import Client
from django.utils import timezone
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from approvals.models import Approval, ApprovalStatus
from approvals.services import approval_decide
from jobs.models import Run, StepRun
from tenants.services import tenant_webhook_secret_ensure
from tests.support.approvals import PASSWORD, as_reviewer, make_reviewer, refund_workflow
from tests.support.receiver import WebhookReceiver
from tests.support.signatures import documented_verifier
from tests.support.workflows import assert_gapless, event_types, submit

pytestmark = pytest.mark.cluster


def approval_of(cluster, run: Run, timeout: float = 30) -> Approval:
    return cluster.wait_until(
        lambda: Approval.objects.filter(run=run, status=ApprovalStatus.PENDING).first(),
        timeout,
        f"run {run.public_id} never asked for an approval",
    )


def wait_status(cluster, run: Run, status: str, timeout: float = 30) -> Run:
    def reached():
        run.refresh_from_db()
        return run.status == status

    cluster.wait_until(reached, timeout, f"run {run.public_id} never became {status}")
    return run


@pytest.fixture
def approvals_cluster(cluster):
    """The scheduler, ONE control worker slot (so a held slot would block everything) and
    a tool pool."""
    cluster.start_scheduler()
    cluster.start_worker("steps.control", pool="threads", concurrency=1)
    cluster.start_worker("steps.tool", pool="threads", concurrency=2)
    return cluster


def test_a_waiting_run_holds_no_worker_and_resumes_with_the_decision(owner, approvals_cluster):
    cluster = approvals_cluster
    ann = make_reviewer("ann", owner.tenant)
    first = submit(owner.tenant, refund_workflow(), {"customer": "Ann", "amount": 120})
    first_approval = approval_of(cluster, first)
    wait_status(cluster, first, "waiting")
    review = StepRun.objects.get(run=first, step_id="review")
    assert review.status == "waiting" and review.lease_expires_at is None

    # The one control slot is free: other runs ask, are decided and finish meanwhile.
    second = submit(owner.tenant, refund_workflow(), {"customer": "Bob", "amount": 5})
    approval_decide(
        approval=approval_of(cluster, second), reviewer=as_reviewer(ann), decision="approve"
    )
    rejected = submit(owner.tenant, refund_workflow(), {"customer": "Cy", "amount": 400})
    approval_decide(
        approval=approval_of(cluster, rejected),
        reviewer=as_reviewer(ann),
        decision="reject",
        comment="Refunds over 300 EUR need a manager",
    )
    branching = submit(
        owner.tenant,
        refund_workflow("branching", on_reject="continue"),
        {"customer": "Di", "amount": 1},
    )
    approval_decide(
        approval=approval_of(cluster, branching), reviewer=as_reviewer(ann), decision="reject"
    )

    assert cluster.wait_run(second).status == "succeeded"
    assert second.output["sent"] == {"reply": "Dear Bob, we refund 5 EUR.", "amount": 5}
    assert cluster.wait_run(rejected).status == "failed"
    assert rejected.error == (
        "step 'review' failed: rejected by ann: Refunds over 300 EUR need a manager"
    )
    assert cluster.wait_run(branching).status == "succeeded"
    assert branching.output["approved"] is False and branching.output["sent"] is None
    first.refresh_from_db()
    assert first.status == "waiting"

    approval_decide(
        approval=first_approval,
        reviewer=as_reviewer(ann),
        decision="approve",
        data={"reply": "Dear Ann, 100 EUR are on their way.", "amount": 100},
    )

    first = cluster.wait_run(first)
    assert first.status == "succeeded", first.error
    assert first.output["sent"] == {"reply": "Dear Ann, 100 EUR are on their way.", "amount": 100}
    types = event_types(first)
    assert types.index("approval.requested") < types.index("run.waiting")
    assert types.index("approval.decided") < types.index("run.succeeded")
    assert_gapless(first)


def test_the_scheduler_expires_and_escalates_what_is_due(owner, approvals_cluster):
    cluster = approvals_cluster
    approve = submit(
        owner.tenant,
        refund_workflow("lenient", timeout_s=3600, on_timeout="approve"),
        {"customer": "Ann", "amount": 10},
    )
    failing = submit(
        owner.tenant,
        refund_workflow("strict", timeout_s=3600, on_timeout="fail"),
        {"customer": "Bob", "amount": 10},
    )
    escalating = submit(
        owner.tenant,
        refund_workflow("escalating", timeout_s=7200, escalate_after_s=1800, escalate_to="leads"),
        {"customer": "Cy", "amount": 10},
    )
    due = [approval_of(cluster, run) for run in (approve, failing)]
    to_escalate = approval_of(cluster, escalating)

    # The clock: move the deadlines and the escalation time into the past.
    past = timezone.now() - timedelta(seconds=1)
    Approval.objects.filter(pk__in=[a.pk for a in due]).update(due_at=past)
    Approval.objects.filter(pk=to_escalate.pk).update(escalate_at=past)

    assert cluster.wait_run(approve).status == "succeeded"
    assert approve.output["approved"] is True and approve.output["sent"]["amount"] == 10
    assert cluster.wait_run(failing).status == "failed"
    assert "no decision within" in failing.error and "(on_timeout: fail)" in failing.error
    cluster.wait_until(
        lambda: Approval.objects.get(pk=to_escalate.pk).escalated, 30, "never escalated"
    )
    assert "approval.escalated" in event_types(escalating)
    assert Run.objects.get(pk=escalating.pk).status == "waiting"
    assert "approval.expired" in event_types(approve)


def test_a_new_request_is_posted_signed_to_the_approval_webhook(owner, cluster):
    cluster.env["SWITCHYARD_ALLOW_PRIVATE_URLS"] = "true"
    cluster.start_scheduler()
    cluster.start_worker("steps.control", pool="threads", concurrency=1)
    cluster.start_worker("steps.tool", pool="threads", concurrency=2)
    cluster.start_worker("webhooks", pool="threads", concurrency=2)
    secret = tenant_webhook_secret_ensure(tenant_id=owner.tenant.pk)
    with WebhookReceiver() as receiver:
        owner.tenant.approval_webhook_url = receiver.url
        owner.tenant.save(update_fields=["approval_webhook_url"])
        run = submit(owner.tenant, refund_workflow(), {"customer": "Ann", "amount": 120})
        [request] = receiver.wait_for(1, timeout=30)

    approval = Approval.objects.get(run=run)
    assert documented_verifier()(secret, request.headers, request.body)
    body = json.loads(request.body)
    assert body["type"] == "approval.requested"
    assert body["approval"]["id"] == str(approval.public_id)
    assert body["approval"]["links"]["inbox"].endswith(f"/inbox/{approval.public_id}/")
    assert body["approval"]["prompt"] == "Refund 120 EUR to Ann?"


# --- the inbox's socket ----------------------------------------------------------------------


def session_cookie(user) -> str:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return f"sessionid={client.cookies['sessionid'].value}"


def inbox_socket(base_url: str, cookie: str | None):
    headers = {"Origin": base_url}
    if cookie:
        headers["Cookie"] = cookie
    return connect(
        base_url.replace("http://", "ws://") + "/ws/inbox/",
        additional_headers=headers,
        open_timeout=10,
    )


def next_frame(ws, timeout: float = 20) -> dict:
    return json.loads(ws.recv(timeout=timeout))


def test_the_inbox_socket_announces_new_and_decided_requests_to_the_tenant_only(
    owner, outsider, approvals_cluster
):
    base_url = approvals_cluster.start_web()
    ann = make_reviewer("ann", owner.tenant)
    zed = make_reviewer("zed", outsider.tenant)

    with (
        inbox_socket(base_url, session_cookie(ann)) as mine,
        inbox_socket(base_url, session_cookie(zed)) as theirs,
    ):
        assert next_frame(mine) == {"type": "hello", "groups": 1}
        assert next_frame(theirs)["type"] == "hello"
        run = submit(owner.tenant, refund_workflow(), {"customer": "Ann", "amount": 120})

        requested = next_frame(mine)
        approval = Approval.objects.get(run=run)
        assert requested == {
            "type": "approval.requested",
            "approval": str(approval.public_id),
            "status": "pending",
            "tenant": "owner",
        }
        # Decided through the web process (its channel layer is the cluster's).
        response = httpx.post(
            f"{base_url}/api/v1/approvals/{approval.public_id}/decision/",
            json={"decision": "reject"},
            headers={"Authorization": f"Bearer {owner.raw_key}"},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        decided = next_frame(mine)
        assert (decided["type"], decided["status"]) == ("approval.decided", "rejected")
        with pytest.raises(TimeoutError):
            theirs.recv(timeout=1)  # another tenant's reviewer hears nothing of it


def test_the_inbox_socket_refuses_anonymous_visitors(approvals_cluster):
    base_url = approvals_cluster.start_web()
    with inbox_socket(base_url, None) as ws, pytest.raises(ConnectionClosed):
        ws.recv(timeout=10)
    assert ws.close_code == 4401
