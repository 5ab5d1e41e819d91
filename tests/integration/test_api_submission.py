"""Submitting runs (docs/api.md, "2. Submit a run"): idempotency keys under concurrency and
after 24 h, backpressure (429 and 503 with Retry-After), the body size limit (413), and the
outbound URL policy on `webhook_url`, all against the real database.
"""

from __future__ import annotations

import sys
import threading
from datetime import timedelta

import httpx
import pytest
from django.db import connections
from django.utils import timezone
from rest_framework.test import APIClient

from jobs.models import Run, StepRun
from jobs.services import submission
from jobs.transitions.steps import step_claim
from tenants.services import tenant_pause
from tests.support.cluster import free_port
from tests.support.workflows import dispatch_token_of

GREET = {
    "name": "greet",
    "input_schema": {
        "type": "object",
        "required": ["who"],
        "properties": {"who": {"type": "string"}},
    },
    "steps": [{"id": "hello", "kind": "tool", "tool": "echo", "args": {"who": "{{ input.who }}"}}],
}
BODY = {"workflow": "greet", "input": {"who": "ann"}}


@pytest.fixture
def greet(owner, outsider):
    for client in (owner, outsider):
        assert client.api.post("/api/v1/workflows/", GREET, format="json").status_code == 201
    return owner


def submit(client, body=None, **headers):
    return client.api.post("/api/v1/runs/", body or BODY, format="json", **headers)


def _start(run_id: str) -> None:
    """Let a worker claim the run's first step: the run is no longer queued."""
    step = StepRun.objects.get(run__public_id=run_id, step_id="hello")
    step_claim(step_run_id=step.pk, dispatch_token=dispatch_token_of(step), worker="test")


# --- idempotency ----------------------------------------------------------------------------


def _concurrently(count: int, raw_key: str, body: dict, key: str) -> list[tuple[int, dict]]:
    """`count` submissions released at once, each on its own thread and DB connection."""
    barrier = threading.Barrier(count)
    answers: list[tuple[int, dict]] = []
    lock = threading.Lock()

    def one() -> None:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
        try:
            barrier.wait(timeout=30)
            response = client.post("/api/v1/runs/", body, format="json", HTTP_IDEMPOTENCY_KEY=key)
            with lock:
                answers.append((response.status_code, response.json()))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(answers) == count, f"{count - len(answers)} submissions never answered"
    return answers


@pytest.mark.django_db(transaction=True)
def test_twenty_concurrent_submissions_with_one_key_create_exactly_one_run(greet):
    answers = _concurrently(20, greet.raw_key, BODY, "order-42")
    assert [status for status, _ in answers] == [202] * 20, answers
    ids = {body["id"] for _, body in answers}
    assert len(ids) == 1
    assert Run.objects.filter(tenant=greet.tenant).count() == 1
    assert str(Run.objects.get(idempotency_key="order-42").public_id) == ids.pop()


def test_a_replay_of_a_finished_run_is_200_and_another_body_is_a_409(greet):
    first = submit(greet, HTTP_IDEMPOTENCY_KEY="k1")
    run = Run.objects.get(public_id=first.json()["id"])
    greet.api.post(f"/api/v1/runs/{run.public_id}/cancel/")
    again = submit(greet, HTTP_IDEMPOTENCY_KEY="k1")
    assert again.status_code == 200
    assert again.json()["id"] == str(run.public_id) and again.json()["status"] == "cancelled"
    # The run's whole detail, as the schema says of a 200 (a `?wait=` that saw it end too).
    assert again.json()["input"] == {"who": "ann"}
    assert [step["status"] for step in again.json()["steps"]] == ["cancelled"]
    assert again.json()["error"] == "cancelled by the client"
    assert again["Location"].endswith(f"/api/v1/runs/{run.public_id}/")
    other = submit(greet, {"workflow": "greet", "input": {"who": "bob"}}, HTTP_IDEMPOTENCY_KEY="k1")
    assert other.status_code == 409
    assert other.json()["error"] == {
        "code": "idempotency_key_reused",
        "message": "this Idempotency-Key was used with a different request body",
        "details": {"run": str(run.public_id)},
    }


def test_keys_are_per_tenant(greet, outsider):
    mine = submit(greet, HTTP_IDEMPOTENCY_KEY="shared")
    theirs = submit(outsider, HTTP_IDEMPOTENCY_KEY="shared")
    assert mine.status_code == theirs.status_code == 202
    assert mine.json()["id"] != theirs.json()["id"]


def test_a_key_older_than_its_ttl_no_longer_matches(greet, settings):
    first = submit(greet, HTTP_IDEMPOTENCY_KEY="daily").json()["id"]
    Run.objects.filter(public_id=first).update(
        created_at=timezone.now() - timedelta(seconds=settings.SWITCHYARD_IDEMPOTENCY_TTL_S + 1)
    )
    # Even another body is fine now: the key is free again.
    second = submit(
        greet, {"workflow": "greet", "input": {"who": "bob"}}, HTTP_IDEMPOTENCY_KEY="daily"
    )
    assert second.status_code == 202 and second.json()["id"] != first
    assert Run.objects.get(public_id=first).idempotency_key == ""  # released
    replay = submit(
        greet, {"workflow": "greet", "input": {"who": "bob"}}, HTTP_IDEMPOTENCY_KEY="daily"
    )
    assert replay.json()["id"] == second.json()["id"]


def test_a_key_just_within_its_ttl_still_matches(greet, settings):
    settings.SWITCHYARD_IDEMPOTENCY_TTL_S = 3600
    first = submit(greet, HTTP_IDEMPOTENCY_KEY="hourly").json()["id"]
    Run.objects.filter(public_id=first).update(created_at=timezone.now() - timedelta(minutes=59))
    assert submit(greet, HTTP_IDEMPOTENCY_KEY="hourly").json()["id"] == first


@pytest.mark.django_db(transaction=True)
def test_concurrent_reuse_of_an_expired_key_creates_exactly_one_new_run(greet, settings):
    old = submit(greet, HTTP_IDEMPOTENCY_KEY="expired").json()["id"]
    Run.objects.filter(public_id=old).update(created_at=timezone.now() - timedelta(days=2))
    answers = _concurrently(10, greet.raw_key, BODY, "expired")
    assert [status for status, _ in answers] == [202] * 10, answers
    ids = {body["id"] for _, body in answers}
    assert len(ids) == 1 and old not in ids
    assert Run.objects.filter(tenant=greet.tenant).count() == 2
    assert str(Run.objects.get(idempotency_key="expired").public_id) == ids.pop()


# --- backpressure ---------------------------------------------------------------------------


def test_a_full_queued_run_quota_is_a_429_with_retry_after(greet, settings):
    settings.SWITCHYARD_API_RETRY_AFTER_S = 7
    greet.tenant.max_queued_runs = 2
    greet.tenant.save()
    first = submit(greet, HTTP_IDEMPOTENCY_KEY="a").json()["id"]
    assert submit(greet).status_code == 202
    refused = submit(greet)
    assert refused.status_code == 429
    assert refused["Retry-After"] == "7"
    assert refused.json()["error"] == {
        "code": "queued_runs_quota_full",
        "message": "tenant 'owner' has 2 queued runs, its max_queued_runs quota; retry after 7s",
    }
    assert Run.objects.filter(tenant=greet.tenant).count() == 2
    # A client retrying a submission that went through still gets its run.
    assert submit(greet, HTTP_IDEMPOTENCY_KEY="a").json()["id"] == first
    # A run that starts leaves the queue, which frees a place.
    _start(first)
    assert submit(greet).status_code == 202


def test_a_tenants_quota_does_not_refuse_another_tenant(greet, outsider):
    greet.tenant.max_queued_runs = 1
    greet.tenant.save()
    assert submit(greet).status_code == 202
    assert submit(greet).status_code == 429
    assert submit(outsider).status_code == 202


def test_a_platform_backlog_over_its_limit_is_a_503_with_retry_after(
    greet, outsider, settings, monkeypatch
):
    monkeypatch.setattr(submission, "PLATFORM_BACKLOG_CACHE_S", 0.0)
    settings.SWITCHYARD_PLATFORM_MAX_BACKLOG = 3
    settings.SWITCHYARD_API_RETRY_AFTER_S = 30
    for _ in range(3):  # each run has one ready step
        assert submit(greet).status_code == 202
    refused = submit(outsider)
    assert refused.status_code == 503
    assert refused["Retry-After"] == "30"
    assert refused.json()["error"] == {
        "code": "platform_backlog_full",
        "message": "the platform backlog is 3 steps waiting for a worker, at its limit "
        "(SWITCHYARD_PLATFORM_MAX_BACKLOG=3); retry after 30s",
    }
    # A paused tenant's backlog waits for its resumption and does not refuse anyone.
    tenant_pause(tenant=greet.tenant)
    assert submit(outsider).status_code == 202


def test_the_platform_backlog_is_counted_at_most_once_a_second(greet, settings):
    submission.platform_backlog_cache_clear()
    settings.SWITCHYARD_PLATFORM_MAX_BACKLOG = 1
    assert submit(greet).status_code == 202  # counted 0: cached for a second
    assert submit(greet).status_code == 202
    submission.platform_backlog_cache_clear()
    assert submit(greet).status_code == 503


# --- body size ------------------------------------------------------------------------------


def test_a_body_over_the_size_limit_is_a_413_in_the_envelope(greet, settings):
    settings.SWITCHYARD_API_MAX_BODY_BYTES = 2000
    big = {"workflow": "greet", "input": {"who": "x" * 2000}}
    response = submit(greet, big)
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "payload_too_large"
    assert "larger than the limit of 2000 bytes" in error["message"]
    assert not Run.objects.exists()
    assert greet.api.post("/api/v1/workflows/", big, format="json").status_code == 413
    assert submit(greet, {"workflow": "greet", "input": {"who": "x" * 1000}}).status_code == 202


def test_the_default_limit_is_one_mebibyte(greet, settings):
    assert settings.SWITCHYARD_API_MAX_BODY_BYTES == settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    assert settings.SWITCHYARD_API_MAX_BODY_BYTES == 1_048_576
    response = submit(greet, {"workflow": "greet", "input": {"who": "x" * 1_048_576}})
    assert response.status_code == 413


# --- webhook URLs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:8080/hook", "127.0.0.1 is a loopback address"),
        ("http://[::1]/hook", "::1 is a loopback address"),
        ("http://169.254.169.254/latest/meta-data", "169.254.169.254 is a link-local address"),
        ("http://10.1.2.3/hook", "10.1.2.3 is a private address"),
        ("http://localhost:9000/hook", "localhost resolves to"),
    ],
)
def test_a_private_webhook_url_is_refused_at_submission(greet, url, reason):
    response = submit(greet, {**BODY, "webhook_url": url})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "forbidden_webhook_url"
    assert error["details"][0]["path"] == "webhook_url"
    assert error["message"].startswith("webhook_url: refusing ")
    assert reason in error["message"]
    assert not Run.objects.exists()


def test_a_webhook_url_that_is_not_http_is_refused(greet):
    response = submit(greet, {**BODY, "webhook_url": "ftp://93.184.215.14/hook"})
    assert response.status_code == 400
    assert "URL scheme must be http or https" in response.json()["error"]["message"]


def test_private_webhook_urls_are_accepted_when_the_setting_allows_them(greet, settings):
    settings.SWITCHYARD_ALLOW_PRIVATE_URLS = True
    response = submit(greet, {**BODY, "webhook_url": "http://127.0.0.1:8080/hook"})
    assert response.status_code == 202
    assert Run.objects.get().webhook_url == "http://127.0.0.1:8080/hook"


# --- bodies PostgreSQL cannot store ------------------------------------------------------------


@pytest.mark.parametrize("escape", ["\\u0000", "\\ud800"])
def test_a_string_postgresql_cannot_store_is_a_400_not_a_500(greet, escape):
    raw = '{"workflow": "greet", "input": {"who": "a' + escape + 'b"}}'
    response = greet.api.post("/api/v1/runs/", raw, content_type="application/json")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "malformed_request"
    assert "(at $.input.who)" in error["message"]
    documents = '{"documents": [{"text": "x' + escape + '"}]}'
    response = greet.api.post("/api/v1/documents/", documents, content_type="application/json")
    assert response.status_code == 400
    assert not Run.objects.exists()


YAML_WORKFLOW = "name: {name}\nsteps:\n  - id: one\n    kind: tool\n    tool: echo\n    args:\n"


def test_a_yaml_workflow_with_a_value_json_cannot_hold_is_a_400(greet):
    text = YAML_WORKFLOW.format(name="binary") + "      blob: !!binary aGVsbG8=\n"
    response = greet.api.post("/api/v1/workflows/", text, content_type="application/yaml")
    assert response.status_code == 400
    assert "(at $.steps[0].args.blob)" in response.json()["error"]["message"]


def test_a_yaml_date_is_read_as_the_string_it_looks_like(greet):
    """YAML is read as JSON-like data: `2020-01-01` stays text, as it would in JSON."""
    text = YAML_WORKFLOW.format(name="dated") + "      when: 2020-01-01\n"
    response = greet.api.post("/api/v1/workflows/", text, content_type="application/yaml")
    assert response.status_code == 201, response.content
    assert response.json()["definition"]["steps"][0]["args"]["when"] == "2020-01-01"


def test_with_postgresql_unreachable_the_api_answers_503_with_retry_after(owner, cluster):
    """Nothing can be recorded, so nothing is accepted: the client is told to retry, in the
    envelope, instead of getting a bare 500."""
    port = free_port()  # nothing listens there
    web_port = free_port()
    cluster._spawn(
        "web-no-database",
        [
            sys.executable,
            "-m",
            "daphne",
            "-b",
            "127.0.0.1",
            "-p",
            str(web_port),
            "orchestrator.asgi:application",
        ],
        env={
            "DATABASE_URL": f"postgres://postgres@127.0.0.1:{port}/switchyard",
            "DATABASE_POOL_MAX_SIZE": "2",
            "DATABASE_POOL_TIMEOUT_S": "0.5",
        },
    )
    base_url = f"http://127.0.0.1:{web_port}"

    def health() -> int:
        try:
            return httpx.get(f"{base_url}/healthz", timeout=5).status_code
        except httpx.HTTPError:
            return 0

    cluster.wait_until(lambda: health() == 503, 30, "web never answered /healthz")
    response = httpx.post(
        f"{base_url}/api/v1/runs/",
        json=BODY,
        headers={"Authorization": f"Bearer {owner.raw_key}", "Idempotency-Key": "k-down"},
        timeout=30,
    )
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "1"
    assert response.json()["error"]["code"] == "database_unavailable"
    # The long-lived views (SSE, ?wait=) are async views of their own: the same answer.
    for path, accept in (
        ("/api/v1/runs/7d4f0e3e-53f4-4b53-9d0e-8a3f8f6d2a10/events/", "text/event-stream"),
        ("/api/v1/runs/7d4f0e3e-53f4-4b53-9d0e-8a3f8f6d2a10/?wait=5", "application/json"),
    ):
        response = httpx.get(
            f"{base_url}{path}",
            headers={"Authorization": f"Bearer {owner.raw_key}", "Accept": accept},
            timeout=30,
        )
        assert response.status_code == 503, (path, response.text)
        assert response.json()["error"]["code"] == "database_unavailable"
