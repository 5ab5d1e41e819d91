"""The Python SDK (clients/python) against a live web process: what its README promises.

Workflows, runs and approvals round trips, typed errors from the error envelope, automatic
retries of a refused submission with one Idempotency-Key, and a stream that resumes by
Last-Event-ID after the server went away mid-run.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import threading
from pathlib import Path

import httpx
import pytest
from switchyard import (
    AsyncSwitchyard,
    Conflict,
    Delta,
    Event,
    InvalidRequest,
    NotFound,
    QuotaFull,
    Retries,
    RunStatus,
    Switchyard,
    Unauthenticated,
)

from jobs.models import Run
from jobs.transitions.runs import run_cancel
from tests.support.cluster import free_port

pytestmark = pytest.mark.cluster

README = Path(__file__).resolve().parents[2] / "clients" / "python" / "README.md"

GREET = {
    "name": "greet",
    "input_schema": {
        "type": "object",
        "required": ["who"],
        "properties": {"who": {"type": "string"}},
    },
    "steps": [
        {"id": "hello", "kind": "tool", "tool": "echo", "args": {"text": "hi {{ input.who }}"}}
    ],
    "output": "{{ steps.hello.output.args.text }}",
}

# Eight steps of 400 ms one after another: a run long enough to lose its server halfway.
SLOW_CHAIN = {
    "name": "slow-chain",
    "steps": [
        {
            "id": f"s{n}",
            "kind": "tool",
            "tool": "echo",
            "args": {"n": n, "delay_ms": 400},
            **({"after": [f"s{n - 1}"]} if n > 1 else {}),
        }
        for n in range(1, 9)
    ],
    "output": "{{ steps.s8.output.args.n }}",
}

REVIEWED = {
    "name": "reviewed",
    "steps": [
        {"id": "review", "kind": "approval", "prompt": "Send the reply?"},
        {"id": "send", "kind": "tool", "tool": "echo", "after": ["review"], "args": {"x": 1}},
    ],
    "output": "{{ steps.review.output.approved }}",
}


@pytest.fixture
def sdk(owner, web):
    with Switchyard(web, owner.raw_key) as client:
        yield client


def _stored(sdk: Switchyard, run_id) -> list[int]:
    return [event.seq for event in sdk.runs.events(run_id).events]


def test_a_workflow_is_created_submitted_waited_for_and_its_events_read(sdk, stepping):
    workflow = sdk.workflows.create(GREET)
    assert (workflow.name, workflow.version) == ("greet", 1)
    assert sdk.workflows.get("greet").version == 1

    accepted = sdk.runs.submit("greet", {"who": "Ann"}, idempotency_key="order-1")
    run = sdk.runs.wait(accepted.id, timeout=30)
    assert run.status is RunStatus.SUCCEEDED
    assert run.output == "hi Ann"
    assert [(step.id, step.status.value) for step in run.steps] == [("hello", "succeeded")]

    page = sdk.runs.events(run.id)
    assert page.events[0].type_ == "run.accepted"
    assert page.events[-1].type_ == "run.succeeded"
    assert [event.seq for event in page.events] == list(range(1, page.last_seq + 1))
    # The same key and body again: the original run, now ended.
    assert sdk.runs.submit("greet", {"who": "Ann"}, idempotency_key="order-1").id == run.id
    assert [summary.id for summary in sdk.runs.list(workflow="greet").runs] == [run.id]


def test_errors_are_typed_from_the_envelope(sdk, owner, web, stepping):
    sdk.workflows.create(GREET)
    with pytest.raises(InvalidRequest) as invalid:
        sdk.runs.submit("greet", {"who": 5})
    assert invalid.value.code == "invalid_input"
    assert [fault["path"] for fault in invalid.value.details] == ["input.who"]
    with pytest.raises(NotFound) as missing:
        sdk.runs.get("5b1e1c57-9f5c-4a43-9d56-0c1f3fb6a9a1")
    assert (missing.value.status, missing.value.code) == (404, "not_found")
    run = sdk.runs.wait(sdk.runs.submit("greet", {"who": "Bo"}).id, timeout=30)
    with pytest.raises(Conflict) as final:
        sdk.runs.cancel(run.id)
    assert final.value.code == "run_final"
    with Switchyard(web, "sy_nope_nope") as stranger, pytest.raises(Unauthenticated):
        stranger.workflows.list()
    with Switchyard(web, owner.raw_key) as same, pytest.raises(Conflict) as reused:
        same.runs.submit("greet", {"who": "Cy"}, idempotency_key="k")
        same.runs.submit("greet", {"who": "Di"}, idempotency_key="k")
    assert reused.value.code == "idempotency_key_reused"


def test_a_full_quota_is_retried_after_retry_after_with_the_same_idempotency_key(owner, cluster):
    """No worker: the first run stays queued and fills a quota of one. The second submission
    is refused with 429 until the first is cancelled, then accepted: one run, one key."""
    owner.tenant.max_queued_runs = 1
    owner.tenant.save()
    base_url = cluster.start_web(SWITCHYARD_API_RETRY_AFTER_S="1")
    sent: list[tuple[str, int | None]] = []

    def record(response: httpx.Response) -> None:
        if response.request.method == "POST":
            sent.append((response.request.headers.get("Idempotency-Key"), response.status_code))

    http = httpx.Client(event_hooks={"response": [record]})
    with Switchyard(base_url, owner.raw_key, http=http, retries=Retries(attempts=2)) as sdk:
        sdk.workflows.create(GREET)
        first = sdk.runs.submit("greet", {"who": "Ann"})
        with pytest.raises(QuotaFull) as refused:
            sdk.runs.submit("greet", {"who": "Bo"}, idempotency_key="bo-1")
        assert refused.value.retry_after == 1 and refused.value.code == "queued_runs_quota_full"
        assert sent[-2:] == [("bo-1", 429), ("bo-1", 429)]  # two attempts, then the error

        sent.clear()
        patient = Switchyard(base_url, owner.raw_key, http=http, retries=Retries(attempts=10))
        cancel = threading.Timer(
            1.5, lambda: run_cancel(run=Run.objects.get(public_id=first.id), reason="make room")
        )
        cancel.start()
        try:
            second = patient.runs.submit("greet", {"who": "Bo"})
        finally:
            cancel.join()
    statuses = [status for _, status in sent]
    assert statuses[0] == 429 and statuses[-1] == 202, sent
    assert len({key for key, _ in sent}) == 1  # every attempt carried the same key
    assert Run.objects.filter(tenant=owner.tenant, public_id=second.id).count() == 1
    assert Run.objects.filter(tenant=owner.tenant).count() == 2


def test_a_stream_resumes_by_last_event_id_after_the_server_went_away(owner, stepping):
    """The web process is killed while the SDK reads a run's events and started again on
    the same port: the SDK reconnects from the last seq it had, and its caller sees every
    stored event once, in order, to the final one."""
    port = free_port()
    base_url = stepping.start_web(port=port, SWITCHYARD_SSE_HEARTBEAT_S="1")
    resumed_from: list[str] = []

    def record(request: httpx.Request) -> None:
        if request.headers.get("Accept") == "text/event-stream":
            resumed_from.append(request.headers["Last-Event-ID"])

    http = httpx.Client(event_hooks={"request": [record]})
    retries = Retries(attempts=20, backoff_s=0.2, max_backoff_s=1.0)
    with Switchyard(base_url, owner.raw_key, http=http, retries=retries) as sdk:
        sdk.workflows.create(SLOW_CHAIN)
        run = sdk.runs.submit("slow-chain")
        seen: list[Event] = []
        for event in sdk.runs.stream(run.id):
            assert isinstance(event, Event | Delta)
            if isinstance(event, Event):
                seen.append(event)
            if len(seen) == 6 and len(resumed_from) == 1:
                stepping.kill(stepping.web)  # mid-run, mid-stream
                stepping.start_web(port=port, SWITCHYARD_SSE_HEARTBEAT_S="1")
        stored = _stored(sdk, run.id)
    assert [event.seq for event in seen] == stored == list(range(1, len(stored) + 1))
    assert seen[-1].type_ == "run.succeeded"
    # Connected once from the start, then again from where the cut-off stream had got to.
    assert resumed_from[0] == "0" and int(resumed_from[1]) >= 6, resumed_from


def test_the_async_client_does_the_same_round_trip(owner, web, stepping):
    async def round_trip() -> tuple[list[str], str]:
        async with AsyncSwitchyard(web, owner.raw_key) as sdk:
            await sdk.workflows.create(GREET)
            accepted = await sdk.runs.submit("greet", {"who": "Ann"})
            types = [
                event.type_
                async for event in sdk.runs.stream(accepted.id)
                if isinstance(event, Event)
            ]
            run = await sdk.runs.wait(accepted.id, timeout=10)
            return types, run.output

    types, output = asyncio.run(round_trip())
    assert types[0] == "run.accepted" and types[-1] == "run.succeeded"
    assert output == "hi Ann"


def test_approvals_are_listed_and_decided(sdk, stepping):
    stepping.start_worker("steps.control", pool="threads", concurrency=2)  # requests approvals
    sdk.workflows.create(REVIEWED)
    run = sdk.runs.submit("reviewed")
    stepping.wait_until(
        lambda: len(sdk.approvals.list().approvals) == 1, 30, "no approval was requested"
    )
    [approval] = sdk.approvals.list().approvals
    assert (str(approval.run), approval.step, approval.prompt) == (
        str(run.id),
        "review",
        "Send the reply?",
    )
    decided = sdk.approvals.decide(approval.id, "approve", comment="fine")
    assert decided.status.value == "approved"
    assert sdk.runs.wait(run.id, timeout=30).output is True
    with pytest.raises(Conflict) as again:
        sdk.approvals.decide(approval.id, "reject")
    assert again.value.code == "not_pending"


def test_the_readmes_quickstart_runs_as_written(owner, web, stepping):
    """The five lines of clients/python/README.md's quickstart, against this server."""
    [quickstart] = re.findall(r"## Quickstart\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert len(quickstart.strip().splitlines()) == 5
    code = quickstart.replace('"http://127.0.0.1:8000"', repr(web)).replace('"sy_..."', "KEY")
    with Switchyard(web, owner.raw_key) as sdk:
        sdk.workflows.create(GREET)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(code, {"KEY": owner.raw_key})
    assert printed.getvalue() == "hi Ann\n"
