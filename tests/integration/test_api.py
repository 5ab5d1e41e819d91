"""The minimal client API (docs/api.md) against the real database, as a tenant's app uses it."""

from __future__ import annotations

import pytest

from jobs.models import Run, StepRun, Workflow, WorkflowVersion
from jobs.transitions.steps import step_claim, step_fail
from tenants.models import ApiKey
from tenants.services import api_key_revoke
from tests.support.workflows import dispatch_token_of

ECHO = {
    "name": "greet",
    "input_schema": {
        "type": "object",
        "required": ["who"],
        "properties": {"who": {"type": "string"}, "times": {"type": "integer"}},
    },
    "steps": [
        {"id": "hello", "kind": "tool", "tool": "echo", "args": {"text": "hi {{ input.who }}"}},
        {
            "id": "bye",
            "kind": "tool",
            "tool": "echo",
            "after": ["hello"],
            "args": {"text": "bye {{ input.who }}"},
        },
    ],
    "output": "{{ steps.bye.output.args.text }}",
}


@pytest.fixture
def greet(owner):
    response = owner.api.post("/api/v1/workflows/", ECHO, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def submit(client, body=None, **headers):
    body = body or {"workflow": "greet", "input": {"who": "ann"}}
    return client.api.post("/api/v1/runs/", body, format="json", **headers)


# --- workflows ------------------------------------------------------------------------------


def test_creating_a_workflow_returns_its_first_version(greet):
    assert greet["name"] == "greet" and greet["version"] == 1
    assert greet["definition"]["steps"][0]["id"] == "hello"


def test_uploading_the_same_name_again_creates_the_next_version(owner, greet):
    response = owner.api.post("/api/v1/workflows/", ECHO, format="json")
    assert response.status_code == 201
    assert response.json()["version"] == 2
    detail = owner.api.get("/api/v1/workflows/greet/").json()
    assert detail["version"] == 2
    assert owner.api.get("/api/v1/workflows/greet/?version=1").json()["version"] == 1


def test_a_bad_definition_is_refused_with_the_path_of_every_fault(owner):
    bad = {
        "name": "broken",
        "steps": [
            {"id": "a", "kind": "llm", "prompt": "x"},
            {"id": "b", "kind": "tool", "tool": "echo", "after": ["serch"]},
            {"id": "a", "kind": "llmm"},
        ],
    }
    response = owner.api.post("/api/v1/workflows/", bad, format="json")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_definition"
    paths = {fault["path"] for fault in error["details"]}
    assert "steps[1].after[0]" in paths
    assert any(p.startswith("steps[2]") for p in paths)
    assert "unknown step 'serch'" in error["message"]
    assert not Workflow.objects.exists() and not WorkflowVersion.objects.exists()


def test_a_yaml_definition_is_accepted(owner):
    yaml_text = "name: yam\nsteps:\n  - id: one\n    kind: tool\n    tool: echo\n"
    response = owner.api.post("/api/v1/workflows/", yaml_text, content_type="application/yaml")
    assert response.status_code == 201, response.content
    assert response.json()["name"] == "yam"


def test_workflows_are_listed_per_tenant(owner, outsider, greet):
    assert [w["name"] for w in owner.api.get("/api/v1/workflows/").json()["workflows"]] == ["greet"]
    assert outsider.api.get("/api/v1/workflows/").json()["workflows"] == []
    assert outsider.api.get("/api/v1/workflows/greet/").status_code == 404


# --- runs -----------------------------------------------------------------------------------


def test_submitting_a_run_answers_202_with_links_and_location(owner, greet):
    response = submit(owner)
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "accepted"
    assert response["Location"] == body["links"]["self"]
    assert body["links"]["self"].endswith(f"/api/v1/runs/{body['id']}/")
    assert body["links"]["events"].endswith(f"/api/v1/runs/{body['id']}/events/")
    run = Run.objects.get(public_id=body["id"])
    statuses = dict(StepRun.objects.filter(run=run).values_list("step_id", "status"))
    # Nothing else waits: the first step is admitted at once (direct admission).
    assert statuses == {"hello": "queued", "bye": "pending"}


def test_input_that_breaks_the_schema_is_a_400_naming_the_field(owner, greet):
    response = submit(owner, {"workflow": "greet", "input": {"who": 5, "times": "x"}})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_input"
    assert {f["path"] for f in error["details"]} == {"input.who", "input.times"}
    assert not Run.objects.exists()


def test_a_missing_required_field_and_a_malformed_body_are_400s(owner, greet):
    response = submit(owner, {"workflow": "greet", "input": {}})
    assert response.status_code == 400
    assert "'who' is a required property" in response.json()["error"]["message"]
    response = owner.api.post("/api/v1/runs/", "{not json", content_type="application/json")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "malformed_request"
    response = submit(owner, {"input": {}})
    assert response.status_code == 400
    assert response.json()["error"]["details"][0]["path"] == "workflow"
    assert not Run.objects.exists()


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"workflow": 5, "input": {"who": "ann"}}, "workflow"),
        ({"workflow": "greet", "input": ["ann"]}, "input"),
        ({"workflow": "greet", "input": None}, "input"),
        ({"workflow": "greet", "input": {"who": "ann"}, "webhook_url": 7}, "webhook_url"),
        ({"workflow": "greet", "version": 0, "input": {"who": "ann"}}, "version"),
    ],
)
def test_a_submission_the_schema_forbids_is_a_400_naming_the_field(owner, greet, body, path):
    """What the schema says is refused: strings only as strings, `input` an object, version ≥ 1."""
    response = submit(owner, body)
    assert response.status_code == 400, response.content
    assert [fault["path"] for fault in response.json()["error"]["details"]] == [path]
    assert not Run.objects.exists()


@pytest.mark.parametrize(
    "url",
    [
        "/api/v1/runs/?workflow=",
        "/api/v1/runs/?status=",
        "/api/v1/runs/?lane=",
        "/api/v1/runs/?limit=",
        "/api/v1/runs/?limit=0",
        "/api/v1/runs/?limit=201",
        "/api/v1/runs/?workflow=%0A",
        "/api/v1/workflows/greet/?version=0",
        "/api/v1/workflows/greet/?version=",
    ],
)
def test_an_empty_or_out_of_range_filter_is_a_400_not_ignored(owner, greet, url):
    response = owner.api.get(url)
    assert response.status_code == 400, response.content
    assert response.json()["error"]["code"] == "invalid_request"


def test_an_unknown_workflow_is_a_404(owner, greet):
    response = submit(owner, {"workflow": "nope", "input": {}})
    assert response.status_code == 404
    assert response.json()["error"] == {"code": "not_found", "message": "workflow 'nope' not found"}


def test_another_tenants_workflow_cannot_be_run(outsider, greet):
    assert submit(outsider).status_code == 404


def test_a_run_shows_its_steps_and_the_list_is_newest_first(owner, greet):
    first = submit(owner).json()["id"]
    second = submit(owner).json()["id"]
    detail = owner.api.get(f"/api/v1/runs/{first}/").json()
    assert detail["id"] == first and detail["input"] == {"who": "ann"}
    assert [s["id"] for s in detail["steps"]] == ["hello", "bye"]
    assert detail["steps"][0]["input"] == {"tool": "echo", "args": {"text": "hi ann"}}
    listing = owner.api.get("/api/v1/runs/?limit=1").json()
    assert [r["id"] for r in listing["runs"]] == [second]
    page2 = owner.api.get(listing["next"]).json()
    assert [r["id"] for r in page2["runs"]] == [first]
    assert owner.api.get("/api/v1/runs/?status=succeeded").json()["runs"] == []


def test_the_event_log_pages_with_after(owner, greet):
    run_id = submit(owner).json()["id"]
    events = owner.api.get(f"/api/v1/runs/{run_id}/events/").json()["events"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "run.accepted"
    later = owner.api.get(f"/api/v1/runs/{run_id}/events/?after=1").json()["events"]
    assert [e["seq"] for e in later] == [e["seq"] for e in events[1:]]
    assert owner.api.get(f"/api/v1/runs/{run_id}/events/?after=x").status_code == 400
    # Last-Event-ID, as on the stream, and newer than the URL's ?after=.
    resumed = owner.api.get(f"/api/v1/runs/{run_id}/events/?after=0", HTTP_LAST_EVENT_ID="1")
    assert [e["seq"] for e in resumed.json()["events"]] == [e["seq"] for e in events[1:]]
    refused = owner.api.get(f"/api/v1/runs/{run_id}/events/", HTTP_LAST_EVENT_ID="^")
    assert refused.status_code == 400
    assert refused.json()["error"]["details"] == [
        {"path": "Last-Event-ID", "message": "must be a non-negative integer (an event seq)"}
    ]


def test_cancel_stops_a_run_once(owner, greet):
    run_id = submit(owner).json()["id"]
    response = owner.api.post(f"/api/v1/runs/{run_id}/cancel/")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    statuses = set(StepRun.objects.filter(run__public_id=run_id).values_list("status", flat=True))
    assert statuses == {"cancelled"}
    again = owner.api.post(f"/api/v1/runs/{run_id}/cancel/")
    assert again.status_code == 409
    assert again.json()["error"]["message"] == "run already cancelled"


def _fail_first_step(run_id: str) -> None:
    step = StepRun.objects.get(run__public_id=run_id, step_id="hello")
    claim = step_claim(step_run_id=step.pk, dispatch_token=dispatch_token_of(step), worker="test")
    step_fail(claim=claim, error="boom", code="boom", retryable=False)


def test_retry_puts_the_failed_steps_back_and_keeps_the_rest(owner, greet):
    run_id = submit(owner).json()["id"]
    assert owner.api.post(f"/api/v1/runs/{run_id}/retry/").status_code == 409
    _fail_first_step(run_id)
    detail = owner.api.get(f"/api/v1/runs/{run_id}/").json()
    assert detail["status"] == "failed" and "step 'hello' failed: boom" in detail["error"]
    response = owner.api.post(f"/api/v1/runs/{run_id}/retry/")
    assert response.status_code == 202
    statuses = dict(StepRun.objects.filter(run__public_id=run_id).values_list("step_id", "status"))
    assert statuses == {"hello": "queued", "bye": "pending"}  # ready, and admitted at once
    assert owner.api.get(f"/api/v1/runs/{run_id}/").json()["status"] == "running"


def test_another_tenants_run_is_a_404_on_every_endpoint(owner, outsider, greet):
    run_id = submit(owner).json()["id"]
    for path in ("", "events/"):
        response = outsider.api.get(f"/api/v1/runs/{run_id}/{path}")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
    for path in ("cancel/", "retry/"):
        assert outsider.api.post(f"/api/v1/runs/{run_id}/{path}").status_code == 404
    assert outsider.api.get("/api/v1/runs/").json()["runs"] == []
    assert owner.api.get(f"/api/v1/runs/{run_id}/").status_code == 200
    assert Run.objects.get(public_id=run_id).status == "accepted"  # the outsider changed nothing


def test_a_malformed_run_id_is_a_404(owner):
    assert owner.api.get("/api/v1/runs/not-a-uuid/").status_code == 404


def test_requests_without_a_valid_key_are_401(owner, greet):
    from rest_framework.test import APIClient

    anonymous = APIClient()
    response = anonymous.get("/api/v1/runs/")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthenticated"
    anonymous.credentials(HTTP_AUTHORIZATION="Bearer sy_nope_nope")
    assert anonymous.get("/api/v1/runs/").status_code == 401
    api_key_revoke(api_key=ApiKey.objects.get(tenant=owner.tenant))
    assert owner.api.get("/api/v1/runs/").status_code == 401


def test_the_same_idempotency_key_returns_the_same_run(owner, greet):
    first = submit(owner, HTTP_IDEMPOTENCY_KEY="order-1")
    again = submit(owner, HTTP_IDEMPOTENCY_KEY="order-1")
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    other = submit(
        owner, {"workflow": "greet", "input": {"who": "bob"}}, HTTP_IDEMPOTENCY_KEY="order-1"
    )
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert Run.objects.count() == 1


def test_documents_are_added_for_the_callers_tenant(owner, outsider):
    response = owner.api.post(
        "/api/v1/documents/",
        {"documents": [{"title": "Refunds", "text": "Refunds take five days."}]},
        format="json",
    )
    assert response.status_code == 201
    assert response.json()["documents"][0]["title"] == "Refunds"
    assert owner.tenant.documents.count() == 1 and outsider.tenant.documents.count() == 0
    bad = owner.api.post("/api/v1/documents/", {"documents": [{"title": "x"}]}, format="json")
    assert bad.status_code == 400
    assert bad.json()["error"]["details"][0]["path"] == "documents[0].text"
    for body in ({"documents": []}, {"documents": [{"text": 5}]}):
        refused = owner.api.post("/api/v1/documents/", body, format="json")
        assert refused.status_code == 400, body
    assert owner.tenant.documents.count() == 1
