"""What the sync and async clients share, written once without I/O.

Every operation is a *plan*: a generator that yields `Request`s and `Sleep`s and is sent back
each request's outcome (an `httpx.Response`, or the `httpx.TransportError` it raised); its
return value is the operation's result. `Switchyard` and `AsyncSwitchyard` only drive plans,
one with blocking calls, the other with awaits, so retries, waits and their bounds are the
same in both. Streams keep their position in a `StreamCursor` for the same reason.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from switchyard.errors import ConnectionFailed, WaitTimeout, error_from, retry_after
from switchyard.models import (
    FINAL_EVENTS,
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
    is_final,
)

T = TypeVar("T")

# The server waits at most this long per request (SWITCHYARD_API_MAX_WAIT_S).
SERVER_MAX_WAIT_S = 60.0
EVENT_STREAM = "text/event-stream"
# A stream sends a heartbeat after 15 s of silence: four missed ones mean the connection is
# dead even if no error says so.
STREAM_READ_S = 60.0


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    params: dict[str, Any] = field(default_factory=dict)
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    # Whether sending it again after a lost connection is safe: reads, and submissions (which
    # always carry an Idempotency-Key).
    repeatable: bool = False
    # Seconds the server may hold the request before answering (a ?wait=).
    server_wait_s: float = 0.0


@dataclass(frozen=True)
class Sleep:
    seconds: float


Outcome = httpx.Response | httpx.TransportError
Plan = Generator[Request | Sleep, Outcome | None, T]


@dataclass(frozen=True)
class Retries:
    """How often and how long to try again. 429 and 503 answers are retried for every
    request, after their `Retry-After` (the server recorded nothing); a lost connection only
    for requests that are `repeatable`. Between attempts without a `Retry-After`: exponential
    backoff from `backoff_s` up to `max_backoff_s`, with jitter."""

    attempts: int = 4
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    # A Retry-After above this is not waited for: the error is raised with `retry_after`.
    max_retry_after_s: float = 60.0

    def backoff(self, attempt: int) -> float:
        ceiling = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        return ceiling / 2 + random.uniform(0, ceiling / 2)


def configure(http: httpx.Client | httpx.AsyncClient, base_url: str, api_key: str) -> None:
    """Point an httpx client at a server's API (`base_url` is the server's root) with a key."""
    http.base_url = httpx.URL(base_url.rstrip("/") + "/api/v1/")
    http.headers["Authorization"] = f"Bearer {api_key}"


def send(request: Request, parse: Callable[[httpx.Response], T], retries: Retries) -> Plan[T]:
    """One request, retried as `retries` allows; the parsed answer, or a typed error."""
    for attempt in range(retries.attempts):
        last = attempt == retries.attempts - 1
        outcome = yield request
        if isinstance(outcome, httpx.TransportError):
            if not request.repeatable or last:
                raise ConnectionFailed(f"{request.method} {request.path}: {outcome!r}") from outcome
            yield Sleep(retries.backoff(attempt))
            continue
        assert outcome is not None
        if outcome.status_code in (429, 503) and not last:
            delay = retry_after(outcome)
            if delay is None or delay <= retries.max_retry_after_s:
                yield Sleep(retries.backoff(attempt) if delay is None else delay)
                continue
        if outcome.is_error:
            raise error_from(outcome)
        return parse(outcome)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _json(parse: Callable[[dict[str, Any]], T]) -> Callable[[httpx.Response], T]:
    return lambda response: parse(response.json())


# --- operations ------------------------------------------------------------------------------


def workflow_create(definition: dict[str, Any], retries: Retries) -> Plan[Workflow]:
    request = Request("POST", "workflows/", json=definition)
    return send(request, _json(Workflow.from_dict), retries)


def workflow_get(name: str, version: int | None, retries: Retries) -> Plan[Workflow]:
    params = {} if version is None else {"version": version}
    request = Request("GET", f"workflows/{name}/", params=params, repeatable=True)
    return send(request, _json(Workflow.from_dict), retries)


def workflow_list(retries: Retries) -> Plan[WorkflowList]:
    request = Request("GET", "workflows/", repeatable=True)
    return send(request, _json(WorkflowList.from_dict), retries)


def run_submit(
    workflow: str,
    input: dict[str, Any] | None,
    *,
    idempotency_key: str | None,
    version: int | None,
    lane: str | None,
    webhook_url: str | None,
    retries: Retries,
) -> Plan[RunAccepted]:
    """Every submission carries an Idempotency-Key (a new one unless given), so that a retry
    after a lost answer or a 429/503 can never create a second run."""
    body: dict[str, Any] = {"workflow": workflow, "input": input or {}}
    optional = {"version": version, "lane": lane, "webhook_url": webhook_url}
    body.update({name: value for name, value in optional.items() if value is not None})
    key = idempotency_key or str(uuid.uuid4())
    request = Request("POST", "runs/", json=body, headers={"Idempotency-Key": key}, repeatable=True)
    # A run that has ended answers with its whole detail, of which these fields are a part.
    return send(request, _json(RunAccepted.from_dict), retries)


def run_get(run_id: str, retries: Retries, *, wait_s: float | None = None) -> Plan[Run]:
    params = {} if wait_s is None else {"wait": round(wait_s, 3)}
    request = Request(
        "GET", f"runs/{run_id}/", params=params, repeatable=True, server_wait_s=wait_s or 0.0
    )
    return send(request, _json(Run.from_dict), retries)


def run_wait(run_id: str, timeout: float, retries: Retries) -> Plan[Run]:
    """The run once it has ended, asking the server to hold each request until then (at most
    a minute each); `WaitTimeout` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        run = yield from run_get(
            run_id, retries, wait_s=max(0.0, min(remaining, SERVER_MAX_WAIT_S))
        )
        if is_final(run):
            return run
        if deadline - time.monotonic() <= 0:
            raise WaitTimeout(run, timeout)


def run_list(
    retries: Retries, *, status: str | None, workflow: str | None, limit: int | None
) -> Plan[RunPage]:
    filters = {"status": status, "workflow": workflow, "limit": limit}
    params = {name: value for name, value in filters.items() if value is not None}
    request = Request("GET", "runs/", params=params, repeatable=True)
    return send(request, _json(RunPage.from_dict), retries)


def run_events(run_id: str, after: int, retries: Retries) -> Plan[EventPage]:
    request = Request("GET", f"runs/{run_id}/events/", params={"after": after}, repeatable=True)
    return send(request, _json(EventPage.from_dict), retries)


def run_cancel(run_id: str, retries: Retries) -> Plan[RunSummary]:
    request = Request("POST", f"runs/{run_id}/cancel/")
    return send(request, _json(RunSummary.from_dict), retries)


def run_retry(run_id: str, retries: Retries) -> Plan[RunSummary]:
    request = Request("POST", f"runs/{run_id}/retry/")
    return send(request, _json(RunSummary.from_dict), retries)


def approval_list(retries: Retries, *, status: str | None) -> Plan[ApprovalPage]:
    params = {} if status is None else {"status": status}
    request = Request("GET", "approvals/", params=params, repeatable=True)
    return send(request, _json(ApprovalPage.from_dict), retries)


def approval_decide(
    approval_id: str,
    decision: str,
    *,
    comment: str,
    data: dict[str, Any] | None,
    retries: Retries,
) -> Plan[Approval]:
    body: dict[str, Any] = {"decision": decision, "comment": comment}
    if data is not None:
        body["data"] = data
    request = Request("POST", f"approvals/{approval_id}/decision/", json=body)
    return send(request, _json(Approval.from_dict), retries)


# --- streams ---------------------------------------------------------------------------------


@dataclass
class SseFrame:
    id: str | None = None
    event: str | None = None
    data: list[str] = field(default_factory=list)


class SseParser:
    """Reads a text/event-stream line by line, as EventSource does; comments are skipped."""

    def __init__(self) -> None:
        self._frame = SseFrame()

    def feed(self, line: str) -> SseFrame | None:
        """The frame this (empty) line ends, if it has data."""
        if line == "":
            frame, self._frame = self._frame, SseFrame()
            return frame if frame.data else None
        if not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "id":
                self._frame.id = value
            elif name == "event":
                self._frame.event = value
            elif name == "data":
                self._frame.data.append(value)
        return None


@dataclass
class StreamCursor:
    """Where a stream of a run's events stands: the last seq received (sent again as
    Last-Event-ID on every reconnection, so nothing is lost or repeated) and how many
    reconnections in a row have brought nothing new."""

    run_id: str
    retries: Retries
    last_seq: int = 0
    finished: bool = False
    failures: int = 0

    def request(self) -> Request:
        headers = {"Accept": EVENT_STREAM, "Last-Event-ID": str(self.last_seq)}
        return Request("GET", f"runs/{self.run_id}/events/", headers=headers, repeatable=True)

    def opened(self, response: httpx.Response) -> bool:
        """Whether the answer is a stream to read; False when the run had ended with nothing
        after `last_seq` (204). Raises the typed error of an error answer."""
        if response.status_code == 204:
            self.finished = True
            return False
        if response.is_error:
            raise error_from(response)
        return True

    def event(self, frame: SseFrame) -> Event | Delta:
        payload = json.loads("\n".join(frame.data))
        if frame.id is None:
            return Delta.from_dict(payload)
        event = Event.from_dict(payload)
        self.last_seq, self.failures = event.seq, 0
        self.finished = event.type_ in FINAL_EVENTS
        return event

    def interrupted(self, cause: Exception | None) -> float:
        """The stream ended before the run's final event (the server closed it, or the
        connection broke): seconds to wait before reconnecting, or `ConnectionFailed` once
        `retries.attempts` reconnections in a row have brought nothing."""
        if self.failures >= self.retries.attempts:
            raise ConnectionFailed(
                f"the events of run {self.run_id} stopped after seq {self.last_seq}: {cause!r}"
            ) from cause
        delay = self.retries.backoff(self.failures)
        self.failures += 1
        return delay

    def refused(self, response: httpx.Response) -> float:
        """A 429/503 on (re)connection: wait as told, within the same bounds."""
        delay = self.interrupted(error_from(response))
        return retry_after(response) or delay
