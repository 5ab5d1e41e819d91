"""The OpenAPI description (docs/api.md): it validates, describes every endpoint, its docs page
loads nothing from another host, and the live API keeps to it under Schemathesis."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urlsplit

import httpx
import pytest
import schemathesis
import yaml
from django.contrib.staticfiles import finders
from django.core.management import call_command
from django.utils import timezone
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import checks

from jobs.models import WebhookDelivery
from jobs.services.webhooks import (
    webhook_attempt_record,
    webhook_delivery_claim,
    webhook_delivery_dispatch,
)
from jobs.transitions.runs import run_cancel
from schedules.services import schedule_create
from tenants.services import api_key_issue
from tests.support.approvals import refund_workflow, run_ready_steps
from tests.support.workflows import submit

ENDPOINTS = {
    "/api/v1/workflows/": {"get", "post"},
    "/api/v1/workflows/{name}/": {"get"},
    "/api/v1/runs/": {"get", "post"},
    "/api/v1/runs/{run_id}/": {"get"},
    "/api/v1/runs/{run_id}/events/": {"get"},
    "/api/v1/runs/{run_id}/cancel/": {"post"},
    "/api/v1/runs/{run_id}/retry/": {"post"},
    "/api/v1/runs/{run_id}/stream-token/": {"post"},
    "/api/v1/documents/": {"post"},
    "/api/v1/keys/": {"get", "post"},
    "/api/v1/keys/{key_id}/": {"delete"},
    "/api/v1/webhook-secret/": {"get"},
    "/api/v1/webhook-secret/rotate/": {"post"},
    "/api/v1/approvals/": {"get"},
    "/api/v1/approvals/{approval_id}/": {"get"},
    "/api/v1/approvals/{approval_id}/decision/": {"post"},
    "/api/v1/schedules/": {"get", "post"},
    "/api/v1/schedules/{schedule_id}/": {"get", "patch", "delete"},
    "/api/v1/schedules/{schedule_id}/pause/": {"post"},
    "/api/v1/schedules/{schedule_id}/resume/": {"post"},
    "/api/v1/schedules/{schedule_id}/trigger/": {"post"},
    "/api/v1/schedules/{schedule_id}/backfill/": {"post"},
    "/api/v1/schedules/{schedule_id}/fires/": {"get"},
    "/api/v1/events/": {"get", "post"},
}


@pytest.fixture
def schema_document(tmp_path) -> dict:
    path = tmp_path / "schema.yaml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(path))
    return yaml.safe_load(path.read_text())


def test_the_schema_validates_without_warnings_and_covers_every_endpoint(schema_document):
    paths = schema_document["paths"]
    assert {path: set(ops) - {"parameters"} for path, ops in paths.items()} == ENDPOINTS
    for path, operations in paths.items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert operation["security"] == [{"ApiKey": []}], (path, method)
            assert "401" in responses, (path, method)
            for code, response in responses.items():
                if code.startswith(("4", "5")):
                    ref = response["content"]["application/json"]["schema"]["$ref"]
                    assert ref == "#/components/schemas/Error", (path, method, code)
    envelope = schema_document["components"]["schemas"]["ErrorBody"]
    assert envelope["required"] == ["code", "message"]
    scheme = schema_document["components"]["securitySchemes"]["ApiKey"]
    assert scheme == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "sy_<prefix>_<secret>",
        "description": "A tenant's API key: `Authorization: Bearer sy_...`.",
    }


def test_run_submission_documents_backpressure_idempotency_and_waiting(schema_document):
    post = schema_document["paths"]["/api/v1/runs/"]["post"]
    assert {"200", "202", "400", "401", "404", "409", "413", "429", "503"} == set(post["responses"])
    assert "Retry-After" in post["responses"]["429"]["description"]
    assert [p["name"] for p in post["parameters"]] == ["Idempotency-Key", "wait"]


def test_the_schema_types_what_the_server_answers_and_refuses(schema_document):
    paths, components = schema_document["paths"], schema_document["components"]["schemas"]
    submit = paths["/api/v1/runs/"]["post"]
    detail = "#/components/schemas/RunDetailOut"
    # A 200 to a submission is the run's whole detail (output, steps, error), as GET answers.
    assert submit["responses"]["200"]["content"]["application/json"]["schema"]["$ref"] == detail
    assert "400" in paths["/api/v1/runs/{run_id}/"]["get"]["responses"]  # a bad ?wait=
    # Any request may find no database connection: a 503 with Retry-After, nothing recorded.
    assert all(
        "503" in operation["responses"]
        for methods in paths.values()
        for operation in methods.values()
        if isinstance(operation, dict)
    )
    body = components["RunSubmitRequest"]["properties"]
    assert body["input"]["type"] == "object" and body["version"]["minimum"] == 1
    assert components["DocumentsAddRequest"]["properties"]["documents"]["minItems"] == 1
    [version] = [
        p for p in paths["/api/v1/workflows/{name}/"]["get"]["parameters"] if p["name"] == "version"
    ]
    assert version["schema"]["minimum"] == 1
    filters = {p["name"]: p["schema"] for p in paths["/api/v1/runs/"]["get"]["parameters"]}
    assert all(schema.get("minLength") == 1 for name, schema in filters.items() if name != "limit")
    assert (filters["limit"]["minimum"], filters["limit"]["maximum"]) == (1, 200)
    events = paths["/api/v1/runs/{run_id}/events/"]["get"]["parameters"]
    assert {p["name"]: p["schema"].get("minimum") for p in events if p["in"] != "path"} == {
        "after": 0,
        "Last-Event-ID": 0,
    }


def test_links_lead_from_a_submission_to_its_run_events_cancel_and_retry(schema_document):
    operations = {
        operation["operationId"]
        for methods in schema_document["paths"].values()
        for operation in methods.values()
        if isinstance(operation, dict)
    }
    submit = schema_document["paths"]["/api/v1/runs/"]["post"]
    for status in ("200", "202"):
        links = submit["responses"][status]["links"]
        assert {name: link["operationId"] for name, link in links.items()} == {
            "GetRun": "runs_retrieve",
            "GetRunEvents": "runs_events_list",
            "CancelRun": "runs_cancel",
            "RetryRun": "runs_retry",
            "GetStreamToken": "runs_stream_token",
        }
        assert {link["parameters"]["run_id"] for link in links.values()} == {"$response.body#/id"}
    run = schema_document["paths"]["/api/v1/runs/{run_id}/"]["get"]["responses"]["200"]
    assert {"GetRunEvents", "CancelRun", "RetryRun"} <= set(run["links"])
    every_link = [
        link
        for methods in schema_document["paths"].values()
        for operation in methods.values()
        if isinstance(operation, dict)
        for response in operation["responses"].values()
        for link in response.get("links", {}).values()
    ]
    assert {link["operationId"] for link in every_link} <= operations


def test_an_unknown_api_path_is_a_404_in_the_envelope(owner):
    response = owner.api.get("/api/v1/nope/")
    assert response.status_code == 404
    assert response.json() == {
        "error": {"code": "not_found", "message": "no API endpoint at /api/v1/nope/"}
    }


class _References(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def _external(urls: list[str]) -> list[str]:
    return [url for url in urls if urlsplit(url).netloc or url.startswith("//")]


def test_the_docs_page_loads_its_assets_from_this_server_only(client):
    response = client.get("/api/docs/")
    assert response.status_code == 200
    html = response.content.decode()
    parser = _References()
    parser.feed(html)
    assert len(parser.urls) >= 4  # css, favicon, two scripts
    assert _external(parser.urls) == []
    assert not re.search(r"https?://", html), "the page names an outside host"
    for url in parser.urls:
        assert url.startswith("/static/drf_spectacular_sidecar/swagger-ui-dist/")
        assert finders.find(url.removeprefix("/static/")), f"{url} is not a local static file"
    assert '"url": "/api/schema/"' in html or 'url: "/api/schema/"' in html


@pytest.mark.cluster
def test_the_docs_page_and_its_assets_are_served_by_the_web_process(cluster):
    base_url = cluster.start_web(DEBUG="false")
    page = httpx.get(f"{base_url}/api/docs/", timeout=10)
    assert page.status_code == 200
    parser = _References()
    parser.feed(page.text)
    for url in parser.urls:
        asset = httpx.get(base_url + url, timeout=10)
        assert asset.status_code == 200, url
        assert len(asset.content) > 100
    schema = httpx.get(f"{base_url}/api/schema/", timeout=10)
    assert schema.status_code == 200 and "openapi: 3" in schema.text


# --- Schemathesis against the live API --------------------------------------------------------

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]
EXAMPLES_PER_OPERATION = 20


def _fixtures(owner) -> dict[str, str]:
    """Real objects for path parameters, so that 200 answers are checked too."""
    assert owner.api.post("/api/v1/workflows/", _GREET, format="json").status_code == 201
    running = submit(owner.tenant, _GREET, {"who": "ann"})
    ended = submit(owner.tenant, _GREET, {"who": "bob"}, webhook_url="https://hooks.example.com/in")
    run_cancel(run=ended, reason="for the schema")
    delivery = WebhookDelivery.objects.get(run=ended)
    dispatch = webhook_delivery_dispatch(delivery_id=delivery.pk)
    claim = webhook_delivery_claim(
        delivery_id=delivery.pk, dispatch_token=str(dispatch.dispatch_token)
    )
    webhook_attempt_record(claim=claim, at=delivery.created_at, status_code=500, latency_ms=3.5)
    spare = api_key_issue(tenant=owner.tenant, name="spare").api_key  # DELETE may revoke it
    [approval] = run_ready_steps(
        submit(owner.tenant, refund_workflow(), {"customer": "Ann", "amount": 1})
    )
    schedule = schedule_create(
        tenant=owner.tenant, name="hourly", workflow="greet", now=timezone.now(), cron="0 * * * *"
    )
    return {
        "schedule_id": str(schedule.public_id),
        "run_id": str(running.public_id),
        "ended_run_id": str(ended.public_id),
        "name": "greet",
        "key_id": str(spare.public_id),
        "approval_id": str(approval.public_id),
    }


_GREET = {
    "name": "greet",
    "input_schema": {"type": "object", "properties": {"who": {"type": "string"}}},
    "steps": [{"id": "hello", "kind": "tool", "tool": "echo", "args": {"who": "{{ input.who }}"}}],
}


def _strategy(operation, known: dict[str, str]):
    """Random cases, and as many with real ids in the path where the path takes one."""
    names = {parameter.name for parameter in operation.path_parameters}
    strategies = [operation.as_strategy()]
    for name in names & {"run_id", "name", "key_id", "approval_id", "schedule_id"}:
        strategies.append(operation.as_strategy(path_parameters={name: known[name]}))
    if "run_id" in names:
        strategies.append(operation.as_strategy(path_parameters={"run_id": known["ended_run_id"]}))
    if operation.label == "POST /api/v1/runs/":
        strategies.append(operation.as_strategy().map(_of_known_workflow))
    if operation.label == "POST /api/v1/workflows/":
        strategies.append(
            operation.as_strategy(body=_GREET, media_type="application/json"),
        )
    return st.one_of(strategies)


def _of_known_workflow(case):
    if isinstance(case.body, dict):
        case.body["workflow"] = "greet"
        case.body.pop("version", None)  # greet has one
    return case


def _exercise(operation, strategy, *, base_url: str, headers: dict[str, str]) -> list[str]:
    """Run up to EXAMPLES_PER_OPERATION cases of one operation; returns the failures."""
    failures: list[str] = []

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,  # the same cases on every run: CI stays reproducible
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def check(case):
        if case.query and "wait" in case.query:
            case.query["wait"] = 0  # waiting is tested elsewhere; here it would only be slow
        response = case.call(base_url=base_url, headers=headers, timeout=15)
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except Exception as exc:
            failures.append(f"{operation.label}: {str(exc)[:3000]}")
            raise

    try:
        check()
    except Exception:
        if not failures:
            raise  # not a check that failed: the test itself is broken
    return failures


@pytest.mark.cluster
def test_schemathesis_finds_no_server_error_and_no_answer_outside_the_schema(owner, cluster):
    base_url = cluster.start_web(DEBUG="false")
    known = _fixtures(owner)
    schema = schemathesis.openapi.from_url(f"{base_url}/api/schema/")
    # JSON answers: an SSE stream of a run that never ends would only time out.
    headers = {"Authorization": f"Bearer {owner.raw_key}", "Accept": "application/json"}
    labels, failures = [], []
    for result in schema.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)
        failures += _exercise(
            operation, _strategy(operation, known), base_url=base_url, headers=headers
        )
    assert len(labels) == sum(len(methods) for methods in ENDPOINTS.values()), labels
    assert failures == [], "\n\n".join(failures[:5])


# --- Schemathesis's stateful phase: following the links ----------------------------------------

# Links that a walk from a submission must follow: to the run, its events, cancel and retry.
SUBMISSION_LINKS = {
    f"POST /api/v1/runs/ -> [202] {name} -> {target}"
    for name, target in [
        ("GetRun", "GET /api/v1/runs/{run_id}/"),
        ("GetRunEvents", "GET /api/v1/runs/{run_id}/events/"),
        ("CancelRun", "POST /api/v1/runs/{run_id}/cancel/"),
        ("RetryRun", "POST /api/v1/runs/{run_id}/retry/"),
    ]
}


@pytest.mark.cluster
def test_schemathesis_walks_the_links_from_a_submission_to_its_run(owner, cluster):
    """The stateful phase chains operations by the schema's links, each answer checked as
    above. Submissions name a workflow that exists (random names would only find 404s), so
    that the walk goes on from the submission to the run, its events, cancel and retry."""
    base_url = cluster.start_web(DEBUG="false")
    _fixtures(owner)
    schema = schemathesis.openapi.from_url(f"{base_url}/api/schema/")
    headers = {"Authorization": f"Bearer {owner.raw_key}", "Accept": "application/json"}
    schema.config.update(headers=headers, base_url=base_url)
    walked: set[str] = set()
    failures: list[str] = []

    class Walk(schema.as_state_machine()):
        def before_call(self, case):
            if case.query and "wait" in case.query:
                case.query["wait"] = 0
            if case.operation.label == "POST /api/v1/runs/":
                _of_known_workflow(case)

        def step(self, input):
            output = super().step(input)
            if input.transition is not None and input.is_applied:
                walked.add(input.transition.id)
            return output

        def validate_response(self, response, case, **kwargs):
            # Collected, not raised: Hypothesis would replay the scenario to confirm a failure,
            # against a server whose state has moved on.
            try:
                case.validate_response(response, checks=CHECKS, headers=headers)
            except Exception as exc:
                failures.append(f"{case.operation.label}: {str(exc)[:3000]}")

    Walk.run(
        settings=settings(
            max_examples=100,
            stateful_step_count=6,
            deadline=None,
            derandomize=True,
            database=None,
            # No shrinking: a failure is replayed against a server whose state has moved on.
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
    )
    assert failures == [], "\n\n".join(failures[:5])
    # Which links a walk takes depends on the server's timing (a run may end before its cancel
    # is tried), so the walk must cover most of a submission's links and a dozen in all.
    assert len(walked & SUBMISSION_LINKS) >= 3, "\n".join(sorted(walked))
    assert len(walked) >= 12, "\n".join(sorted(walked))
