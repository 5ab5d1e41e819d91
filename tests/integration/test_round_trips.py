"""Round trips to PostgreSQL per transition of the hot path (docs/performance.md).

Each transition has a budget; a change that adds a round trip fails the test that names it.
Counted as Django sees the statements (`CaptureQueriesContext`), with direct admission on as
in production and the per-process caches warm. A report is a transaction of two statements:
with its BEGIN and COMMIT, four round trips on the wire.
"""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from jobs.models import Run, StepRun
from jobs.transitions.steps import step_claim, step_complete, step_fail
from tests.support.workflows import submit, tool_step

pytestmark = pytest.mark.django_db(transaction=True)

CHAIN = {
    "name": "chain",
    "steps": [
        tool_step("a", "echo"),
        tool_step("b", "echo", after=["a"], args={"previous": "{{ steps.a.output }}"}),
        tool_step("c", "echo", after=["b"], retry={"max_attempts": 3}),
    ],
}


@pytest.fixture(autouse=True)
def _direct_admission(settings):
    settings.SWITCHYARD_DIRECT_ADMISSION = True


def _statements(queries: CaptureQueriesContext) -> list[str]:
    return [query["sql"].split("(", 1)[0] for query in queries.captured_queries]


def _claim_next(run: Run):
    step = StepRun.objects.get(run=run, status="queued")
    return step_claim(step_run_id=step.pk, dispatch_token=str(step.dispatch_token), worker="w/1")


def test_a_claim_is_one_statement(owner):
    run = submit(owner.tenant, CHAIN)
    step = StepRun.objects.get(run=run, status="queued")
    with CaptureQueriesContext(connection) as queries:
        claim = step_claim(
            step_run_id=step.pk, dispatch_token=str(step.dispatch_token), worker="w/1"
        )
    assert claim is not None
    assert _statements(queries) == ["SELECT switchyard_step_claim"]


def test_a_report_that_advances_a_chain_is_two_statements(owner):
    run = submit(owner.tenant, CHAIN)
    claim = _claim_next(run)
    with CaptureQueriesContext(connection) as queries:
        assert step_complete(claim=claim, output={"text": "done"})
    # The report's compare-and-set, then the apply (the engine's advance and the direct
    # admission of the next step), in one transaction.
    assert _statements(queries) == [
        "BEGIN",
        "SELECT switchyard_step_report",
        "SELECT switchyard_run_apply",
        "COMMIT",
    ]
    assert StepRun.objects.get(run=run, step_id="b").status == "queued"


def test_the_report_that_ends_a_run_is_two_statements(owner):
    run = submit(owner.tenant, CHAIN)
    for _ in range(2):
        assert step_complete(claim=_claim_next(run), output={})
    claim = _claim_next(run)
    with CaptureQueriesContext(connection) as queries:
        assert step_complete(claim=claim, output={"text": "last"})
    assert _statements(queries) == [
        "BEGIN",
        "SELECT switchyard_step_report",
        "SELECT switchyard_run_apply",
        "COMMIT",
    ]
    run.refresh_from_db()
    assert run.status == "succeeded"


def test_a_failed_attempt_that_will_retry_is_two_statements(owner):
    run = submit(owner.tenant, CHAIN)
    for _ in range(2):
        assert step_complete(claim=_claim_next(run), output={})
    claim = _claim_next(run)
    with CaptureQueriesContext(connection) as queries:
        assert step_fail(claim=claim, error="flaky", code="error", retryable=True)
    assert _statements(queries) == [
        "BEGIN",
        "SELECT switchyard_step_report",
        "SELECT switchyard_run_apply",
        "COMMIT",
    ]
    assert StepRun.objects.get(run=run, step_id="c").status == "retry_wait"


def test_a_submission_through_the_api_is_one_statement(owner):
    owner.api.post("/api/v1/workflows/", CHAIN, format="json")
    warm = owner.api.post("/api/v1/runs/", {"workflow": "chain", "input": {}}, format="json")
    assert warm.status_code == 202, warm.content
    with CaptureQueriesContext(connection) as queries:
        response = owner.api.post(
            "/api/v1/runs/",
            {"workflow": "chain", "input": {}},
            format="json",
            HTTP_IDEMPOTENCY_KEY="order-42",
        )
    assert response.status_code == 202, response.content
    # The key, the version (both cached), the idempotency key, the queued-run quota, the run,
    # its steps, its events and the direct admission of its first step: one statement. Two
    # reads a process makes on its own clock may fall in the window: the platform backlog
    # (once a second) and the key's refresh (its cache entry lives a second).
    periodic = ('SELECT COUNT(*) AS "__count" FROM (SELECT', 'SELECT "tenants_apikey"')
    statements = [
        query["sql"] for query in queries.captured_queries if not query["sql"].startswith(periodic)
    ]
    assert [sql.split("(", 1)[0] for sql in statements] == ["SELECT switchyard_run_submit"]
    run = Run.objects.get(public_id=response.json()["id"])
    assert StepRun.objects.get(run=run, step_id="a").status == "queued"
