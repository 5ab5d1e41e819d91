"""The synchronous baseline: the agent workflow executed inside the HTTP request.

What a typical first deployment of an agent looks like: a WSGI endpoint (gunicorn, a fixed
number of worker threads) that runs the workflow's steps one after another while the client
waits, then answers with the result. It runs the same step handlers as Switchyard's workers
(`jobs.steps.llm`, the `echo` tool, `jobs.steps.retrieval` against the same documents), with
the same scaled latencies; only the orchestration differs.

`POST /workflow` with `{"request_id": "...", "ticket": "..."}` answers 200 with the reply.
When a workflow finishes, the process appends `<request_id> <unix time>` to the ledger file
`$BENCH_SYNC_LEDGER` before it writes the response: the bench counts a result as lost when the
work finished here but the client had already given up (the gateway timed out). Nothing here
notices a client that went away: WSGI gives an application no way to, so a request that waited
in the queue past its client's patience still runs to the end.
"""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import timedelta
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator.settings")

import django

django.setup()

from django.db import close_old_connections  # noqa: E402
from django.utils import timezone  # noqa: E402

from jobs import engine  # noqa: E402
from jobs.statuses import StepStatus  # noqa: E402
from jobs.steps import registry  # noqa: E402
from jobs.steps.registry import StepContext  # noqa: E402
from jobs.transitions.txn import definition_of  # noqa: E402

_ledger_lock = threading.Lock()
_definition = None


def _workflow():
    """The tenant's agent workflow as Switchyard stores it (so both run the same steps)."""
    global _definition
    if _definition is None:
        from jobs.models import WorkflowVersion

        version = (
            WorkflowVersion.objects.select_related("workflow__tenant")
            .filter(workflow__name=os.environ["BENCH_SYNC_WORKFLOW"])
            .order_by("-pk")
            .first()
        )
        _definition = (version.workflow.tenant_id, definition_of(version))
    return _definition


def run_workflow(request_id: str, ticket: str) -> Any:
    """Run the workflow to its end in this thread: the pure engine decides what is ready, the
    kinds' handlers run one step after the other (the agent workflow is a sequence)."""
    tenant_id, definition = _workflow()
    run_input = {"ticket": ticket}
    states = engine.initial_states(definition)
    while True:
        plan = engine.advance(definition, run_input, states)
        if plan.run_status is not None:
            if plan.run_error:
                raise RuntimeError(plan.run_error)
            return plan.run_output
        states = engine.apply(states, plan)
        for ready in plan.ready:
            step_id, _ = ready.key
            context = StepContext(
                run_id=request_id,
                tenant_id=tenant_id,
                step_id=step_id,
                map_index=None,
                kind=ready.kind,
                attempt=1,
                input=ready.input,
                idempotency_key=f"{request_id}:{step_id}",
                deadline=timezone.now() + timedelta(seconds=300),
            )
            output = registry.kind(ready.kind).load_handler()(context)
            states[ready.key] = engine.StepState(StepStatus.SUCCEEDED, output=output)


def _record(request_id: str) -> None:
    line = f"{request_id} {time.time():.6f}\n"
    with _ledger_lock, open(os.environ["BENCH_SYNC_LEDGER"], "a") as ledger:
        ledger.write(line)


def application(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path == "/healthz":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]
    if path != "/workflow" or environ.get("REQUEST_METHOD") != "POST":
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found"]
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = json.loads(environ["wsgi.input"].read(length) or b"{}")
    close_old_connections()
    try:
        output = run_workflow(body["request_id"], body["ticket"])
    finally:
        close_old_connections()
    _record(body["request_id"])
    payload = json.dumps({"request_id": body["request_id"], "output": output}).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
    )
    return [payload]
