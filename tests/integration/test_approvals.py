"""Approval steps through the services, in this process (PostgreSQL, no broker): the request,
decisions, four-eyes, races, deadlines, escalation, cancellation, retries and the webhook.

The same path through the real scheduler, control worker and web process is proven in
test_approvals_cluster.py; these tests pin every rule down quickly. The clock of the sweeps
is controlled by passing `now`.
"""

from __future__ import annotations

import json
import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from approvals.models import Approval, ApprovalStatus, ApprovalVote
from approvals.services import (
    ApprovalError,
    approval_decide,
    approvals_escalate_due,
    approvals_expire_due,
)
from jobs.models import Run, StepRun, WebhookDelivery, WebhookStatus
from jobs.services.webhooks import webhook_delivery_dispatch
from jobs.transitions.runs import run_cancel, run_retry
from jobs.webhooks import webhook_deliver
from tenants.services import tenant_webhook_secret_ensure
from tests.support.approvals import as_reviewer, make_reviewer, refund_workflow, run_ready_steps
from tests.support.receiver import WebhookReceiver
from tests.support.signatures import documented_verifier
from tests.support.workflows import assert_gapless, event_types, submit

INPUT = {"customer": "Ann", "amount": 120}


def start(tenant, name="refund", **review) -> tuple[Run, Approval]:
    run = submit(tenant, refund_workflow(name, **review), INPUT)
    [approval] = run_ready_steps(run)
    run.refresh_from_db()
    return run, approval


@pytest.fixture
def ann(owner):
    return make_reviewer("ann", owner.tenant)


@pytest.fixture
def bob(owner):
    return make_reviewer("bob", owner.tenant)


def finish(run: Run) -> Run:
    run_ready_steps(run)
    run.refresh_from_db()
    return run


# --- the request -----------------------------------------------------------------------------


def test_a_run_pauses_at_an_approval_with_what_the_reviewer_needs(owner):
    run, approval = start(owner.tenant, timeout_s=3600)

    assert run.status == "waiting"
    step = StepRun.objects.get(run=run, step_id="review")
    assert step.status == "waiting" and step.lease_expires_at is None
    assert step.timeout_s == 300  # the attempt's lease, not the one-hour deadline
    assert approval.status == ApprovalStatus.PENDING and approval.tenant == owner.tenant
    assert approval.prompt == "Refund 120 EUR to Ann?"
    assert approval.context == {"customer": "Ann", "quote": {"args": {"amount": 120}}}
    assert approval.form_values == {"amount": 120, "reply": "Dear Ann, we refund 120 EUR."}
    assert approval.reviewers == "reviewer" and approval.required_approvals == 1
    assert approval.on_timeout == "reject" and approval.on_reject == "fail"
    assert abs((approval.due_at - approval.created_at).total_seconds() - 3600) < 2
    types = event_types(run)
    assert types[-3:] == ["step.waiting", "approval.requested", "run.waiting"]
    assert_gapless(run)


def test_approving_with_edited_data_feeds_the_next_steps(owner, ann):
    run, approval = start(owner.tenant)

    decided = approval_decide(
        approval=approval,
        reviewer=as_reviewer(ann),
        decision="approve",
        comment="shorter reply",
        data={"reply": "Dear Ann, refunded."},
    )

    assert decided.status == ApprovalStatus.APPROVED and decided.decided_by == "ann"
    send = StepRun.objects.get(run=run, step_id="send")
    assert send.status == "queued"  # ready, and admitted at once (nothing else waits)
    assert send.input["args"] == {"reply": "Dear Ann, refunded.", "amount": 120}
    review = StepRun.objects.get(run=run, step_id="review")
    assert review.output == {
        "approved": True,
        "decision": "approve",
        "comment": "shorter reply",
        "reviewers": ["ann"],
        "data": {"amount": 120, "reply": "Dear Ann, refunded."},
        "timed_out": False,
    }
    run = finish(run)
    assert run.status == "succeeded"
    assert run.output["sent"] == {"reply": "Dear Ann, refunded.", "amount": 120}
    assert "approval.decided" in event_types(run)
    assert_gapless(run)


def test_a_rejection_fails_the_run_with_the_reviewers_comment(owner, ann):
    run, approval = start(owner.tenant)

    approval_decide(
        approval=approval, reviewer=as_reviewer(ann), decision="reject", comment="Over budget"
    )

    run.refresh_from_db()
    assert run.status == "failed"
    assert run.error == "step 'review' failed: rejected by ann: Over budget"
    assert StepRun.objects.get(run=run, step_id="send").status == "cancelled"


def test_a_rejection_with_on_reject_continue_takes_the_other_branch(owner, ann):
    run, approval = start(owner.tenant, on_reject="continue")

    approval_decide(approval=approval, reviewer=as_reviewer(ann), decision="reject", comment="No")

    run = finish(run)
    assert run.status == "succeeded"
    assert run.output == {"approved": False, "sent": None, "comment": "No"}
    assert StepRun.objects.get(run=run, step_id="send").status == "skipped"


def test_data_that_does_not_fit_the_form_is_refused_naming_the_field(owner, ann):
    _run, approval = start(owner.tenant)

    with pytest.raises(ApprovalError) as refused:
        approval_decide(
            approval=approval, reviewer=as_reviewer(ann), decision="approve", data={"amount": 9000}
        )

    assert refused.value.code == "invalid_data"
    assert refused.value.faults == [("amount", "9000 is greater than the maximum of 500")]
    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.PENDING and not approval.votes.exists()


# --- four eyes -------------------------------------------------------------------------------


def test_two_required_approvals_need_two_distinct_reviewers(owner, ann, bob):
    run, approval = start(owner.tenant, required_approvals=2)

    approval_decide(approval=approval, reviewer=as_reviewer(ann), decision="approve")
    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.PENDING  # one of two
    run.refresh_from_db()
    assert run.status == "waiting"

    with pytest.raises(ApprovalError) as again:
        approval_decide(approval=approval, reviewer=as_reviewer(ann), decision="approve")
    assert again.value.code == "already_voted"
    assert "ann has already approved this request; it needs 1 more approval" in str(again.value)
    assert approval.votes.count() == 1  # the same reviewer twice counts once

    decided = approval_decide(
        approval=approval, reviewer=as_reviewer(bob), decision="approve", data={"amount": 100}
    )
    assert decided.status == ApprovalStatus.APPROVED and decided.decided_by == "ann, bob"
    assert decided.data == {"amount": 100, "reply": "Dear Ann, we refund 120 EUR."}
    run = finish(run)
    assert run.output["sent"]["amount"] == 100


def test_one_rejection_rejects_a_four_eyes_request(owner, ann, bob):
    run, approval = start(owner.tenant, required_approvals=2)
    approval_decide(approval=approval, reviewer=as_reviewer(ann), decision="approve")

    decided = approval_decide(
        approval=approval, reviewer=as_reviewer(bob), decision="reject", comment="no"
    )

    assert decided.status == ApprovalStatus.REJECTED and decided.decided_by == "bob"
    run.refresh_from_db()
    assert run.status == "failed" and "rejected by bob: no" in run.error


# --- races and closed requests ---------------------------------------------------------------


def test_two_reviewers_deciding_at_the_same_moment_make_one_decision(transactional_db, owner):
    ann = make_reviewer("ann", owner.tenant)
    bob = make_reviewer("bob", owner.tenant)
    run, approval = start(owner.tenant)
    barrier = threading.Barrier(2)
    results: dict[str, object] = {}

    def decide(user, decision):
        try:
            barrier.wait()
            results[user.username] = approval_decide(
                approval=approval, reviewer=as_reviewer(user), decision=decision
            ).status
        except ApprovalError as exc:
            results[user.username] = exc
        finally:
            connection.close()

    threads = [
        threading.Thread(target=decide, args=(ann, "approve")),
        threading.Thread(target=decide, args=(bob, "reject")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    refusals = [r for r in results.values() if isinstance(r, ApprovalError)]
    assert len(results) == 2 and len(refusals) == 1
    assert refusals[0].code == "not_pending"
    assert "this request was already" in refusals[0].message
    approval.refresh_from_db()
    assert approval.status in (ApprovalStatus.APPROVED, ApprovalStatus.REJECTED)
    assert ApprovalVote.objects.filter(approval=approval).count() == 1
    assert event_types(run).count("approval.decided") == 1
    assert_gapless(run)


def test_deciding_twice_is_refused_and_changes_nothing(owner, ann, bob):
    _run, approval = start(owner.tenant)
    approval_decide(approval=approval, reviewer=as_reviewer(ann), decision="approve")

    with pytest.raises(ApprovalError) as refused:
        approval_decide(approval=approval, reviewer=as_reviewer(bob), decision="reject")

    assert refused.value.code == "not_pending"
    assert refused.value.message.startswith("this request was already approved by ann at ")
    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.APPROVED and approval.votes.count() == 1


# --- deadlines and escalation (a controllable clock) -----------------------------------------


@pytest.mark.parametrize(
    ("on_timeout", "run_status", "approved"),
    [("approve", "succeeded", True), ("reject", "failed", False), ("fail", "failed", None)],
)
def test_on_timeout_decides_at_the_deadline(owner, on_timeout, run_status, approved):
    run, approval = start(owner.tenant, timeout_s=600, on_timeout=on_timeout)
    assert approvals_expire_due(now=approval.due_at - timedelta(seconds=1)) == 0

    assert approvals_expire_due(now=approval.due_at + timedelta(seconds=1)) == 1

    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.EXPIRED and approval.decided_by == "timeout"
    assert approval.comment == f"no decision within 10 min (on_timeout: {on_timeout})"
    run = finish(run)
    assert run.status == run_status
    review = StepRun.objects.get(run=run, step_id="review")
    assert review.output["timed_out"] is True
    if approved:
        assert run.output["sent"] == {"reply": "Dear Ann, we refund 120 EUR.", "amount": 120}
    else:
        assert run.error == (
            f"step 'review' failed: no decision within 10 min (on_timeout: {on_timeout})"
        )
    expired = [e for e in run.events.filter(type="approval.expired")]
    assert len(expired) == 1 and expired[0].data["on_timeout"] == on_timeout


def test_reject_on_timeout_follows_on_reject_continue(owner):
    run, approval = start(owner.tenant, timeout_s=60, on_reject="continue")
    approvals_expire_due(now=approval.due_at)
    run = finish(run)
    assert run.status == "succeeded" and run.output["approved"] is False


def test_deciding_after_the_deadline_fired_is_refused(owner, ann):
    _run, approval = start(owner.tenant, timeout_s=60)
    approvals_expire_due(now=approval.due_at)

    with pytest.raises(ApprovalError) as refused:
        approval_decide(approval=approval, reviewer=as_reviewer(ann), decision="approve")

    assert refused.value.code == "not_pending"
    assert "expired" in refused.value.message and "on_timeout (reject)" in refused.value.message


def test_escalation_opens_the_request_to_the_second_group(owner):
    from approvals.access import reviewer_scope

    lead = make_reviewer("lead", owner.tenant, groups=["leads"])
    finance = make_reviewer("fin", owner.tenant, groups=["finance"])
    run, approval = start(
        owner.tenant, reviewers="finance", escalate_after_s=300, escalate_to="leads"
    )
    assert reviewer_scope(finance).decides(approval)
    assert reviewer_scope(lead).decide_refusal(approval) == (
        "only the 'finance' group decide this request"
    )
    assert approvals_escalate_due(now=approval.escalate_at - timedelta(seconds=1)) == 0

    assert approvals_escalate_due(now=approval.escalate_at) == 1
    assert approvals_escalate_due(now=approval.escalate_at + timedelta(hours=1)) == 0  # once

    approval.refresh_from_db()
    assert approval.escalated and approval.escalated_at == approval.escalate_at
    assert reviewer_scope(lead).decides(approval)
    [event] = run.events.filter(type="approval.escalated")
    assert event.data["to"] == "leads"
    approval_decide(approval=approval, reviewer=as_reviewer(lead), decision="approve")
    assert finish(run).status == "succeeded"


# --- cancellation and retries ----------------------------------------------------------------


def test_cancelling_the_run_withdraws_its_pending_approval(owner, ann):
    run, approval = start(owner.tenant)

    run_cancel(run=run, reason="customer withdrew")

    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.CANCELLED
    assert approval.comment == "the run was cancelled: customer withdrew"
    with pytest.raises(ApprovalError) as refused:
        approval_decide(approval=approval, reviewer=as_reviewer(ann), decision="approve")
    assert "withdrawn" in refused.value.message
    assert "approval.cancelled" in event_types(run)


def test_retrying_a_rejected_run_asks_again_and_keeps_the_first_decision(owner, ann):
    run, first = start(owner.tenant)
    approval_decide(approval=first, reviewer=as_reviewer(ann), decision="reject", comment="no")

    run_retry(run=Run.objects.get(pk=run.pk))
    [second] = run_ready_steps(run)

    assert second.pk != first.pk and second.attempt == first.attempt + 1
    assert second.status == ApprovalStatus.PENDING
    first.refresh_from_db()
    assert first.status == ApprovalStatus.REJECTED and first.comment == "no"
    approval_decide(approval=second, reviewer=as_reviewer(ann), decision="approve")
    assert finish(run).status == "succeeded"


# --- the approval webhook --------------------------------------------------------------------


def test_a_new_request_notifies_the_tenants_approval_webhook_signed(owner, settings):
    settings.SWITCHYARD_ALLOW_PRIVATE_URLS = True
    settings.SWITCHYARD_PUBLIC_URL = "https://switchyard.example"
    secret = tenant_webhook_secret_ensure(tenant_id=owner.tenant.pk)
    with WebhookReceiver() as receiver:
        owner.tenant.approval_webhook_url = receiver.url
        owner.tenant.save(update_fields=["approval_webhook_url"])
        run, approval = start(owner.tenant)
        delivery = WebhookDelivery.objects.get(run=run, event_type="approval.requested")
        dispatch = webhook_delivery_dispatch(delivery_id=delivery.pk)
        webhook_deliver(
            delivery_id=delivery.pk, dispatch_token=str(dispatch.dispatch_token), worker="test"
        )
        [request] = receiver.received

    delivery.refresh_from_db()
    assert delivery.status == WebhookStatus.SUCCEEDED
    assert documented_verifier()(secret, request.headers, request.body)
    body = json.loads(request.body)
    assert body["type"] == "approval.requested"
    assert body["approval"]["id"] == str(approval.public_id)
    assert body["approval"]["prompt"] == "Refund 120 EUR to Ann?"
    assert body["approval"]["links"]["inbox"] == (
        f"https://switchyard.example/inbox/{approval.public_id}/"
    )
    assert body["approval"]["run"] == str(run.public_id)


def test_no_approval_webhook_without_a_url(owner):
    run, _ = start(owner.tenant)
    assert not WebhookDelivery.objects.filter(run=run).exists()


def test_every_decision_is_in_the_runs_log(owner, ann, bob):
    run, approval = start(owner.tenant, required_approvals=2)
    approval_decide(approval=approval, reviewer=as_reviewer(ann), decision="approve")
    approval_decide(approval=approval, reviewer=as_reviewer(bob), decision="approve", comment="ok")

    log = list(run.events.filter(type__startswith="approval.").order_by("seq"))

    assert [e.type for e in log] == [
        "approval.requested",
        "approval.voted",
        "approval.voted",
        "approval.decided",
    ]
    assert [e.data.get("by") for e in log[1:]] == ["ann", "bob", "ann, bob"]
    assert log[-1].data["comment"] == "ok" and log[-1].data["decision"] == "approve"
    assert timezone.now() >= approval.created_at


# --- the admin: read-only audit --------------------------------------------------------------


def test_the_admin_lists_approvals_and_votes_and_edits_nothing(owner, ann, client):
    from django.contrib.auth import get_user_model

    _run, approval = start(owner.tenant)
    approval_decide(approval=approval, reviewer=as_reviewer(ann), decision="approve", comment="ok")
    get_user_model().objects.create_superuser("root", password="pw")
    client.login(username="root", password="pw")

    listing = client.get("/admin/approvals/approval/?status__exact=approved")
    detail = client.get(f"/admin/approvals/approval/{approval.pk}/change/")
    votes = client.get("/admin/approvals/approvalvote/")

    assert listing.status_code == detail.status_code == votes.status_code == 200
    assert str(approval.public_id) in listing.content.decode()
    page = detail.content.decode()
    assert "Refund 120 EUR to Ann?" in page and "ann" in page
    assert 'name="_save"' not in page  # nothing to save: every field is read-only
    assert client.post(f"/admin/approvals/approval/{approval.pk}/change/", {}).status_code == 403
    assert client.post(f"/admin/approvals/approval/{approval.pk}/delete/", {}).status_code == 403
    assert client.get("/admin/approvals/approval/add/").status_code == 403
