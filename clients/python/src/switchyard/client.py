"""`Switchyard`: the blocking client."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, TypeVar

import httpx

from switchyard import _core
from switchyard._core import Plan, Request, Retries, Sleep
from switchyard.models import (
    Approval,
    ApprovalPage,
    Delta,
    Event,
    EventPage,
    Run,
    RunAccepted,
    RunPage,
    RunSummary,
    Workflow,
    WorkflowList,
)

T = TypeVar("T")


class Switchyard:
    """A tenant's client of a Switchyard server.

    >>> sy = Switchyard("http://127.0.0.1:8000", api_key="sy_...")
    >>> run = sy.runs.submit("greet", {"who": "Ann"})
    >>> sy.runs.wait(run.id, timeout=60).output

    `retries` bounds the automatic retries (429 and 503 after their Retry-After, a lost
    connection for reads and submissions); `timeout` is each request's, in seconds, on top
    of the time a `?wait=` holds it.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        retries: Retries | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        self._retries = retries or Retries()
        self._timeout = timeout
        self._http = http or httpx.Client()
        _core.configure(self._http, base_url, api_key)
        self.workflows = Workflows(self)
        self.runs = Runs(self)
        self.approvals = Approvals(self)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Switchyard:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _send(self, request: Request) -> httpx.Response:
        return self._http.request(
            request.method,
            request.path,
            params=request.params,
            json=request.json,
            headers=request.headers,
            timeout=self._timeout + request.server_wait_s,
        )

    def _drive(self, plan: Plan[T]) -> T:
        """Carry out a plan (`switchyard._core`) with blocking calls."""
        try:
            step = next(plan)
            while True:
                if isinstance(step, Sleep):
                    time.sleep(step.seconds)
                    step = plan.send(None)
                    continue
                try:
                    outcome: httpx.Response | httpx.TransportError = self._send(step)
                except httpx.TransportError as exc:
                    outcome = exc
                step = plan.send(outcome)
        except StopIteration as done:
            return done.value


class Workflows:
    def __init__(self, client: Switchyard) -> None:
        self._client = client

    def create(self, definition: dict[str, Any]) -> Workflow:
        """Create a workflow, or the next version of one with the same name."""
        return self._client._drive(_core.workflow_create(definition, self._client._retries))

    def get(self, name: str, version: int | None = None) -> Workflow:
        """A workflow's latest version, or `version`."""
        return self._client._drive(_core.workflow_get(name, version, self._client._retries))

    def list(self) -> WorkflowList:
        return self._client._drive(_core.workflow_list(self._client._retries))


class Runs:
    def __init__(self, client: Switchyard) -> None:
        self._client = client

    def submit(
        self,
        workflow: str,
        input: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        version: int | None = None,
        lane: str | None = None,
        webhook_url: str | None = None,
    ) -> RunAccepted:
        """Submit a run. Retried with the same Idempotency-Key (yours, or a new one) after a
        429, a 503 or a lost answer: never two runs for one call."""
        plan = _core.run_submit(
            workflow,
            input,
            idempotency_key=idempotency_key,
            version=version,
            lane=lane,
            webhook_url=webhook_url,
            retries=self._client._retries,
        )
        return self._client._drive(plan)

    def get(self, run_id: str) -> Run:
        return self._client._drive(_core.run_get(str(run_id), self._client._retries))

    def wait(self, run_id: str, timeout: float = 60.0) -> Run:
        """The run once it has ended; `WaitTimeout` (with the run as it stands) after
        `timeout` seconds. The server holds each request until the run ends: no polling."""
        return self._client._drive(_core.run_wait(str(run_id), timeout, self._client._retries))

    def list(
        self, *, status: str | None = None, workflow: str | None = None, limit: int | None = None
    ) -> RunPage:
        plan = _core.run_list(self._client._retries, status=status, workflow=workflow, limit=limit)
        return self._client._drive(plan)

    def events(self, run_id: str, after: int = 0) -> EventPage:
        """The stored events after seq `after` (a page; `last_seq` is where to go on)."""
        return self._client._drive(_core.run_events(str(run_id), after, self._client._retries))

    def cancel(self, run_id: str) -> RunSummary:
        return self._client._drive(_core.run_cancel(str(run_id), self._client._retries))

    def retry(self, run_id: str) -> RunSummary:
        return self._client._drive(_core.run_retry(str(run_id), self._client._retries))

    def stream(self, run_id: str, after: int = 0) -> Iterator[Event | Delta]:
        """Every event after seq `after` to the run's final one, live: stored events (`Event`,
        with `seq`) and LLM text as it is written (`Delta`). A dropped connection or a server
        that goes away is reconnected with Last-Event-ID: no event is lost or repeated."""
        cursor = _core.StreamCursor(str(run_id), self._client._retries, last_seq=after)
        http = self._client._http
        while not cursor.finished:
            request = cursor.request()
            cause: Exception | None = None
            try:
                with http.stream(
                    request.method,
                    request.path,
                    headers=request.headers,
                    timeout=httpx.Timeout(self._client._timeout, read=_core.STREAM_READ_S),
                ) as response:
                    if response.status_code in (429, 503):
                        response.read()
                        time.sleep(cursor.refused(response))
                        continue
                    if response.is_error:
                        response.read()
                    if not cursor.opened(response):
                        return
                    parser = _core.SseParser()
                    for line in response.iter_lines():
                        if frame := parser.feed(line):
                            yield cursor.event(frame)
                            if cursor.finished:
                                return
            except httpx.TransportError as exc:
                cause = exc
            time.sleep(cursor.interrupted(cause))


class Approvals:
    def __init__(self, client: Switchyard) -> None:
        self._client = client

    def list(self, *, status: str | None = "pending") -> ApprovalPage:
        """The tenant's approval requests (pending ones unless `status` says otherwise)."""
        return self._client._drive(_core.approval_list(self._client._retries, status=status))

    def decide(
        self,
        approval_id: str,
        decision: str,
        *,
        comment: str = "",
        data: dict[str, Any] | None = None,
    ) -> Approval:
        """Vote `approve` or `reject`; `data` edits the form's fields with `approve`."""
        plan = _core.approval_decide(
            str(approval_id), decision, comment=comment, data=data, retries=self._client._retries
        )
        return self._client._drive(plan)
