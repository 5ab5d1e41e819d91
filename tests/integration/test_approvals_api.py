"""The approvals API: list, detail and decision, scoped to the caller's tenant."""

from __future__ import annotations

import pytest

from approvals.models import ApprovalStatus
from jobs.models import Run
from tests.support.approvals import refund_workflow, run_ready_steps
from tests.support.workflows import submit

INPUT = {"customer": "Ann", "amount": 120}


def start(tenant, name="refund", **review):
    run = submit(tenant, refund_workflow(name, **review), INPUT)
    [approval] = run_ready_steps(run)
    return run, approval


@pytest.fixture
def pending(owner):
    return start(owner.tenant, timeout_s=3600)


def test_the_list_shows_the_tenants_requests_filtered_by_status(owner, outsider, pending):
    run, approval = pending
    start(outsider.tenant)  # another tenant's request never shows

    response = owner.api.get("/api/v1/approvals/?status=pending")

    assert response.status_code == 200
    [item] = response.json()["approvals"]
    assert item["id"] == str(approval.public_id)
    assert item["status"] == "pending" and item["run"] == str(run.public_id)
    assert item["prompt"] == "Refund 120 EUR to Ann?"
    assert item["form"]["values"] == {"amount": 120, "reply": "Dear Ann, we refund 120 EUR."}
    assert item["links"]["inbox"] == f"http://testserver/inbox/{approval.public_id}/"
    assert owner.api.get("/api/v1/approvals/?status=approved").json()["approvals"] == []
    assert owner.api.get("/api/v1/approvals/?status=maybe").status_code == 400
    empty = owner.api.get("/api/v1/approvals/?status=")  # not taken for "no filter"
    assert empty.status_code == 400
    assert empty.json()["error"]["details"][0]["path"] == "status"


def test_another_tenants_request_is_a_404_for_reading_and_deciding(outsider, pending):
    _, approval = pending
    detail = outsider.api.get(f"/api/v1/approvals/{approval.public_id}/")
    decision = outsider.api.post(
        f"/api/v1/approvals/{approval.public_id}/decision/", {"decision": "approve"}, format="json"
    )
    assert detail.status_code == 404 and decision.status_code == 404
    assert detail.json()["error"]["code"] == "not_found"
    approval.refresh_from_db()
    assert approval.status == ApprovalStatus.PENDING
    assert outsider.api.get("/api/v1/approvals/not-a-uuid/").status_code == 404


def test_an_api_key_decides_by_its_name_and_the_run_goes_on(owner, pending):
    run, approval = pending

    response = owner.api.post(
        f"/api/v1/approvals/{approval.public_id}/decision/",
        {"decision": "approve", "comment": "fine", "data": {"amount": 99}},
        format="json",
    )

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "approved" and body["decided_by"] == "api key default"
    assert body["data"] == {"amount": 99, "reply": "Dear Ann, we refund 120 EUR."}
    assert body["votes"][0]["reviewer"] == "api key default"
    run_ready_steps(run)
    run.refresh_from_db()
    assert run.status == "succeeded" and run.output["sent"]["amount"] == 99


def test_deciding_twice_is_a_409(owner, pending):
    _, approval = pending
    url = f"/api/v1/approvals/{approval.public_id}/decision/"
    assert owner.api.post(url, {"decision": "reject"}, format="json").status_code == 200

    again = owner.api.post(url, {"decision": "approve"}, format="json")

    assert again.status_code == 409
    assert again.json()["error"]["code"] == "not_pending"
    assert "already rejected by api key default" in again.json()["error"]["message"]


def test_the_same_key_approving_twice_is_a_409_and_counts_once(owner):
    _, approval = start(owner.tenant, required_approvals=2)
    url = f"/api/v1/approvals/{approval.public_id}/decision/"
    assert owner.api.post(url, {"decision": "approve"}, format="json").json()["approvals"] == 1

    again = owner.api.post(url, {"decision": "approve"}, format="json")

    assert again.status_code == 409 and again.json()["error"]["code"] == "already_voted"
    detail = owner.api.get(f"/api/v1/approvals/{approval.public_id}/").json()
    assert detail["approvals"] == 1 and detail["status"] == "pending"


def test_data_outside_the_form_is_a_400_naming_the_field(owner, pending):
    _, approval = pending
    response = owner.api.post(
        f"/api/v1/approvals/{approval.public_id}/decision/",
        {"decision": "approve", "data": {"reply": "Hi"}},
        format="json",
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_data"
    assert error["details"] == [{"path": "data.reply", "message": "'Hi' is too short"}]


def test_a_bad_decision_is_a_400(owner, pending):
    _, approval = pending
    response = owner.api.post(
        f"/api/v1/approvals/{approval.public_id}/decision/", {"decision": "maybe"}, format="json"
    )
    assert response.status_code == 400
    assert response.json()["error"]["details"][0]["path"] == "decision"


def test_the_run_detail_shows_the_waiting_step_and_its_events(owner, pending):
    run, approval = pending
    detail = owner.api.get(f"/api/v1/runs/{run.public_id}/").json()
    assert detail["status"] == "waiting"
    review = next(step for step in detail["steps"] if step["id"] == "review")
    assert review["status"] == "waiting"
    events = owner.api.get(f"/api/v1/runs/{run.public_id}/events/").json()["events"]
    requested = [e for e in events if e["type"] == "approval.requested"]
    assert requested[0]["data"]["approval"] == str(approval.public_id)
    assert Run.objects.get(pk=run.pk).status == "waiting"
