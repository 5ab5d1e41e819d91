"""`AsyncSwitchyard`: the asyncio twin of `Switchyard`, with the same operations, retries and
resumable streams (both carry out the plans of `switchyard._core`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
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


class AsyncSwitchyard:
    """A tenant's client of a Switchyard server, for asyncio.

    >>> async with AsyncSwitchyard("http://127.0.0.1:8000", api_key="sy_...") as sy:
    ...     run = await sy.runs.submit("greet", {"who": "Ann"})
    ...     async for event in sy.runs.stream(run.id):
    ...         print(event)
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        retries: Retries | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self._retries = retries or Retries()
        self._timeout = timeout
        self._http = http or httpx.AsyncClient()
        _core.configure(self._http, base_url, api_key)
        self.workflows = AsyncWorkflows(self)
        self.runs = AsyncRuns(self)
        self.approvals = AsyncApprovals(self)

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncSwitchyard:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _send(self, request: Request) -> httpx.Response:
        return await self._http.request(
            request.method,
            request.path,
            params=request.params,
            json=request.json,
            headers=request.headers,
            timeout=self._timeout + request.server_wait_s,
        )

    async def _drive(self, plan: Plan[T]) -> T:
        """Carry out a plan (`switchyard._core`) with awaits."""
        try:
            step = next(plan)
            while True:
                if isinstance(step, Sleep):
                    await asyncio.sleep(step.seconds)
                    step = plan.send(None)
                    continue
                try:
                    outcome: httpx.Response | httpx.TransportError = await self._send(step)
                except httpx.TransportError as exc:
                    outcome = exc
                step = plan.send(outcome)
        except StopIteration as done:
            return done.value


class AsyncWorkflows:
    def __init__(self, client: AsyncSwitchyard) -> None:
        self._client = client

    async def create(self, definition: dict[str, Any]) -> Workflow:
        return await self._client._drive(_core.workflow_create(definition, self._client._retries))

    async def get(self, name: str, version: int | None = None) -> Workflow:
        return await self._client._drive(_core.workflow_get(name, version, self._client._retries))

    async def list(self) -> WorkflowList:
        return await self._client._drive(_core.workflow_list(self._client._retries))


class AsyncRuns:
    def __init__(self, client: AsyncSwitchyard) -> None:
        self._client = client

    async def submit(
        self,
        workflow: str,
        input: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        version: int | None = None,
        lane: str | None = None,
        webhook_url: str | None = None,
    ) -> RunAccepted:
        plan = _core.run_submit(
            workflow,
            input,
            idempotency_key=idempotency_key,
            version=version,
            lane=lane,
            webhook_url=webhook_url,
            retries=self._client._retries,
        )
        return await self._client._drive(plan)

    async def get(self, run_id: str) -> Run:
        return await self._client._drive(_core.run_get(str(run_id), self._client._retries))

    async def wait(self, run_id: str, timeout: float = 60.0) -> Run:
        plan = _core.run_wait(str(run_id), timeout, self._client._retries)
        return await self._client._drive(plan)

    async def list(
        self, *, status: str | None = None, workflow: str | None = None, limit: int | None = None
    ) -> RunPage:
        plan = _core.run_list(self._client._retries, status=status, workflow=workflow, limit=limit)
        return await self._client._drive(plan)

    async def events(self, run_id: str, after: int = 0) -> EventPage:
        plan = _core.run_events(str(run_id), after, self._client._retries)
        return await self._client._drive(plan)

    async def cancel(self, run_id: str) -> RunSummary:
        return await self._client._drive(_core.run_cancel(str(run_id), self._client._retries))

    async def retry(self, run_id: str) -> RunSummary:
        return await self._client._drive(_core.run_retry(str(run_id), self._client._retries))

    async def stream(self, run_id: str, after: int = 0) -> AsyncIterator[Event | Delta]:
        """As `Switchyard.runs.stream`: resumed with Last-Event-ID across disconnections."""
        cursor = _core.StreamCursor(str(run_id), self._client._retries, last_seq=after)
        http = self._client._http
        while not cursor.finished:
            request = cursor.request()
            cause: Exception | None = None
            try:
                async with http.stream(
                    request.method,
                    request.path,
                    headers=request.headers,
                    timeout=httpx.Timeout(self._client._timeout, read=_core.STREAM_READ_S),
                ) as response:
                    if response.status_code in (429, 503):
                        await response.aread()
                        await asyncio.sleep(cursor.refused(response))
                        continue
                    if response.is_error:
                        await response.aread()
                    if not cursor.opened(response):
                        return
                    parser = _core.SseParser()
                    async for line in response.aiter_lines():
                        if frame := parser.feed(line):
                            yield cursor.event(frame)
                            if cursor.finished:
                                return
            except httpx.TransportError as exc:
                cause = exc
            await asyncio.sleep(cursor.interrupted(cause))


class AsyncApprovals:
    def __init__(self, client: AsyncSwitchyard) -> None:
        self._client = client

    async def list(self, *, status: str | None = "pending") -> ApprovalPage:
        return await self._client._drive(_core.approval_list(self._client._retries, status=status))

    async def decide(
        self,
        approval_id: str,
        decision: str,
        *,
        comment: str = "",
        data: dict[str, Any] | None = None,
    ) -> Approval:
        plan = _core.approval_decide(
            str(approval_id), decision, comment=comment, data=data, retries=self._client._retries
        )
        return await self._client._drive(plan)
