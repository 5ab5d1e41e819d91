"""Tools named in an agent's `approve_tools` wait for a reviewer: approved, edited (checked
against the tool's schema) or rejected with a comment that the model reads as the result;
through the API, in this process (the inbox in a browser: tests/browser)."""

from __future__ import annotations

import json

import pytest

from approvals.models import Approval
from jobs.demo import AGENT_REQUESTS, DEMO_DOCUMENTS, SUPPORT_AGENT
from jobs.models import Event
from jobs.services.documents import documents_add
from tests.support.agents import children, drive, model_was_told, refund_agent
from tests.support.workflows import assert_gapless, submit


@pytest.fixture
def waiting(owner, ledger):
    """A run whose agent waits for a reviewer on its refund call (the echo call ran)."""
    run = drive(submit(owner.tenant, refund_agent()))
    assert run.status == "waiting"
    approval = Approval.objects.get(run=run)
    return run, approval


def decide(owner, approval, **body):
    return owner.api.post(f"/api/v1/approvals/{approval.public_id}/decision/", body, format="json")


def test_the_request_shows_the_tool_its_arguments_and_the_models_reasoning(owner, waiting):
    run, approval = waiting
    body = owner.api.get(f"/api/v1/approvals/{approval.public_id}/").json()
    assert body["context"] == {
        "tool": "test.refund",
        "arguments": {"order": 7, "amount": 120},
        "reasoning": "The order arrived broken; I will refund it.",
    }
    assert body["form"]["values"] == {"order": 7, "amount": 120}
    assert [s.kind for s in children(run)] == ["llm", "tool", "approval"]


def test_an_approved_call_runs_with_the_arguments_the_model_gave(owner, waiting):
    run, approval = waiting
    assert decide(owner, approval, decision="approve").status_code == 200
    run = drive(run)
    assert run.status == "succeeded", run.error
    assert model_was_told(run)["refunded"] == {"order": 7, "amount": 120}
    assert [s.kind for s in children(run)] == ["llm", "tool", "approval", "tool", "llm"]
    assert_gapless(run)


def test_edited_arguments_are_checked_against_the_tools_schema_then_used(owner, waiting):
    run, approval = waiting
    refused = decide(owner, approval, decision="approve", data={"amount": 900})
    assert refused.status_code == 400
    assert "amount" in json.dumps(refused.json())
    assert decide(owner, approval, decision="approve", data={"amount": 60}).status_code == 200
    run = drive(run)
    assert run.status == "succeeded", run.error
    assert model_was_told(run)["refunded"] == {"order": 7, "amount": 60}
    transcript = owner.api.get(f"/api/v1/runs/{run.public_id}/").json()["agents"]["helper"]
    refund = transcript[0]["tool_calls"][1]
    assert refund["approval"]["edited_args"] == {"order": 7, "amount": 60}
    assert refund["status"] == "succeeded"


def test_a_rejection_goes_back_to_the_model_as_the_result_and_the_tool_never_runs(owner, waiting):
    run, approval = waiting
    comment = "Ask the customer for a photo first."
    assert decide(owner, approval, decision="reject", comment=comment).status_code == 200
    run = drive(run)
    assert run.status == "succeeded", run.error
    told = model_was_told(run)
    assert told["rejected"] is True and told["comment"] == comment
    assert [s.kind for s in children(run)] == ["llm", "tool", "approval", "llm"]
    results = Event.objects.filter(run=run, type="agent.tool_result").order_by("seq")
    assert [(e.data["tool"], e.data["ok"]) for e in results] == [
        ("echo", True),
        ("test.refund", False),
    ]


def test_the_demo_support_agent_searches_looks_up_the_order_and_asks_before_refunding(owner):
    documents_add(tenant=owner.tenant, documents=DEMO_DOCUMENTS)
    run = drive(submit(owner.tenant, SUPPORT_AGENT, AGENT_REQUESTS[0]))
    assert run.status == "waiting"
    approval = Approval.objects.get(run=run)
    assert approval.context["tool"] == "demo.refund"
    assert decide(owner, approval, decision="approve").status_code == 200
    run = drive(run)
    assert run.status == "succeeded", run.error
    assert run.output["refunded"] is True
    transcript = owner.api.get(f"/api/v1/runs/{run.public_id}/").json()["agents"]["agent"]
    found = transcript[0]["tool_calls"][0]["result"]["documents"]
    assert found[0]["title"] == "Refund policy"
    assert transcript[0]["tool_calls"][1]["result"]["order"] == "A-1042"
    assert transcript[1]["tool_calls"][0]["result"]["refunded_eur"] == 39.5
