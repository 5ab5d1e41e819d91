"""The long-lived requests of the client API (docs/api.md): live SSE streams and waiting.

- `GET /api/v1/runs/{id}/events/` with `Accept: text/event-stream`, authenticated by an API key
  or by a stream token for that run (`?token=`, `jobs.stream_tokens`): every stored event after
  `Last-Event-ID` (or `?after=`), then live events, as SSE frames with `id:` = seq; token
  deltas as `event: step.delta` frames without an `id:`; a `: heartbeat` comment after
  `SWITCHYARD_SSE_HEARTBEAT_S` of silence; the stream ends after the run's final event. A
  client that already has the final event gets 204 No Content: the answer that stops an
  `EventSource` from reconnecting (after an empty 200 it reconnects every few seconds, forever).
- `POST /api/v1/runs/?wait=N`: submit, then wait up to N seconds for the run to end: 200 with
  the run's detail if it did, else the submission's own 202.
- `GET /api/v1/runs/{id}/?wait=N`: the run's detail (200) as soon as it has ended, else the
  unfinished detail (still 200: the resource exists and this is its current state) after N s.

These are async views: a waiting client costs a channel-layer subscription and a coroutine,
not a thread. Everything else about these URLs (no `wait`, no event stream) is the DRF views'
job, unchanged: the async views hand such requests to them, and submission with `?wait` goes
through `RunListView` too, so that validation, idempotency and backpressure live in one place.

Django itself would still give every request a thread of its own for its sync parts (signal
receivers, middleware), idle while the view waits: `LongLivedRequests` (ASGI middleware, see
`orchestrator.asgi`) runs those parts of long-lived requests on one shared thread instead.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qs

from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.conf import settings
from django.db import OperationalError
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.urls import Resolver404, resolve
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.renderers import JSONRenderer
from rest_framework.views import APIView

from jobs import selectors
from jobs.api.errors import DATABASE_RETRY_AFTER, DATABASE_UNAVAILABLE, ApiError
from jobs.api.serializers import run_detail as run_detail_repr
from jobs.api.views import RunDetailView, RunEventsView, RunListView, resume_after
from jobs.feeds import (
    Delta,
    Idle,
    RunFeed,
    StoredEvent,
    db_call,
    has_everything,
    run_wait_final,
)
from jobs.models import Run
from jobs.stream_tokens import StreamTokenRefused, run_for_stream_token
from tenants.auth import ApiKeyAuthentication
from tenants.models import Tenant

log = logging.getLogger(__name__)

EVENT_STREAM = "text/event-stream"

# --- which requests are long-lived ----------------------------------------------------------
# Each predicate sees (method, query parameters, Accept header); the ASGI middleware asks it
# before Django has built a request, the view asks it again with the request's own values.
HoldsOpen = Callable[[str, Mapping[str, Any], str], bool]


def _submits_and_waits(method: str, query: Mapping[str, Any], accept: str) -> bool:
    return method == "POST" and "wait" in query


def _reads_and_waits(method: str, query: Mapping[str, Any], accept: str) -> bool:
    return method == "GET" and "wait" in query


def _streams(method: str, query: Mapping[str, Any], accept: str) -> bool:
    return method == "GET" and EVENT_STREAM in accept


def _holds_open(request: HttpRequest, predicate: HoldsOpen) -> bool:
    return predicate(request.method or "", request.GET, request.headers.get("Accept", ""))


def _front_of(view_class: type[APIView], holds_open: HoldsOpen):
    """Mark an async view as the front of a DRF view.

    `cls`/`initkwargs` make DRF's schema generators (drf-spectacular) describe the URL as
    `view_class`, as before; `holds_request_open` is read by `LongLivedRequests`.
    """

    def decorate(view):
        view = csrf_exempt(_database_unavailable_is_503(view))
        view.cls = view_class
        view.initkwargs = {}
        view.holds_request_open = holds_open
        return view

    return decorate


def _database_unavailable_is_503(view):
    """As the DRF views answer (`jobs.api.errors`): no connection to be had is a 503 with
    Retry-After, never a 500; nothing was recorded, so a retry is safe."""

    @functools.wraps(view)
    async def guarded(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        try:
            return await view(request, *args, **kwargs)
        except OperationalError as exc:
            log.warning("answered 503 to %s %s: %s", request.method, request.path, exc)
            return _error(*DATABASE_UNAVAILABLE, headers=dict(DATABASE_RETRY_AFTER))

    return guarded


# --- responses ------------------------------------------------------------------------------


def _json(body: Any, status: int, headers: dict[str, str] | None = None) -> HttpResponse:
    # Rendered as DRF renders the API's other responses, byte for byte.
    response = HttpResponse(
        JSONRenderer().render(body), status=status, content_type="application/json"
    )
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def _error(
    status: int,
    code: str,
    message: str,
    details: Any = None,
    headers: dict[str, str] | None = None,
) -> HttpResponse:
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return _json({"error": error}, status, headers)


def _not_found() -> HttpResponse:
    return _error(404, "not_found", "run not found")


async def _authenticate(request: HttpRequest) -> Tenant | HttpResponse:
    """The caller's tenant, or the 401 the DRF views would answer."""
    unauthenticated = {"WWW-Authenticate": ApiKeyAuthentication.keyword}
    try:
        principal = await db_call(ApiKeyAuthentication().authenticate)(request)
    except AuthenticationFailed as exc:
        return _error(401, "unauthenticated", str(exc.detail), headers=unauthenticated)
    if principal is None:
        return _error(
            401,
            "unauthenticated",
            "Authentication credentials were not provided.",
            headers=unauthenticated,
        )
    user, _ = principal
    return user.tenant


def _wait_seconds(request: HttpRequest) -> float | HttpResponse:
    limit = settings.SWITCHYARD_API_MAX_WAIT_S
    raw = request.GET.get("wait", "")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= limit:  # also refuses nan and inf
        message = f"must be a number of seconds from 0 to {limit}"
        return _error(
            400, "invalid_request", f"wait: {message}", [{"path": "wait", "message": message}]
        )
    return seconds


def _detail(run: Run, request: HttpRequest) -> tuple[dict[str, Any], bool]:
    """The body of `GET /api/v1/runs/{id}/` as it stands now, and whether the run has ended."""
    fresh = selectors.run_with_steps(run)
    return run_detail_repr(fresh, request), fresh.is_final


# --- views ----------------------------------------------------------------------------------

_run_list = RunListView.as_view()
_run_detail = RunDetailView.as_view()
_run_events = RunEventsView.as_view()


@_front_of(RunListView, _submits_and_waits)
async def run_list(request: HttpRequest) -> HttpResponse:
    if not _holds_open(request, _submits_and_waits):
        return await sync_to_async(_run_list)(request)
    tenant = await _authenticate(request)
    if isinstance(tenant, HttpResponse):
        return tenant
    wait_s = _wait_seconds(request)
    if isinstance(wait_s, HttpResponse):
        return wait_s
    # The submission itself is the DRF view's, on a pool thread for its few milliseconds.
    submitted = await db_call(_run_list)(request)
    if submitted.status_code not in (200, 202):
        return submitted
    run = await db_call(selectors.run_for)(tenant=tenant, run_id=submitted.data["id"])
    if run is None:
        return submitted
    await run_wait_final(run, timeout_s=wait_s)
    body, final = await db_call(_detail)(run, request)
    if not final:
        return submitted
    return _json(body, 200, {"Location": body["links"]["self"]})


@_front_of(RunDetailView, _reads_and_waits)
async def run_detail(request: HttpRequest, run_id: str) -> HttpResponse:
    if not _holds_open(request, _reads_and_waits):
        return await sync_to_async(_run_detail)(request, run_id=run_id)
    tenant = await _authenticate(request)
    if isinstance(tenant, HttpResponse):
        return tenant
    wait_s = _wait_seconds(request)
    if isinstance(wait_s, HttpResponse):
        return wait_s
    run = await db_call(selectors.run_for)(tenant=tenant, run_id=run_id)
    if run is None:
        return _not_found()
    await run_wait_final(run, timeout_s=wait_s)
    body, _ = await db_call(_detail)(run, request)
    return _json(body, 200)


@_front_of(RunEventsView, _streams)
async def run_events(request: HttpRequest, run_id: str) -> HttpResponse:
    if not _holds_open(request, _streams):
        return await sync_to_async(_run_events)(request, run_id=run_id)
    if "token" in request.GET:
        run = await _run_for_token(request, run_id)
    else:
        run = await _run_for_key(request, run_id)
    if isinstance(run, HttpResponse):
        return run
    after = resume_after(request)
    if isinstance(after, ApiError):
        return _error(after.status_code, after.error_code, after.message, after.details)
    if await db_call(has_everything)(run, after):
        return HttpResponse(status=204)
    response = StreamingHttpResponse(_event_stream(run, after), content_type=EVENT_STREAM)
    response["Cache-Control"] = "no-cache"
    # Proxies that buffer responses (nginx) would hold the frames back.
    response["X-Accel-Buffering"] = "no"
    return response


async def _run_for_key(request: HttpRequest, run_id: str) -> Run | HttpResponse:
    tenant = await _authenticate(request)
    if isinstance(tenant, HttpResponse):
        return tenant
    run = await db_call(selectors.run_for)(tenant=tenant, run_id=run_id)
    return _not_found() if run is None else run


async def _run_for_token(request: HttpRequest, run_id: str) -> Run | HttpResponse:
    """The run a stream token (`?token=`, `jobs.stream_tokens`) opens: the only place besides
    the run's WebSocket where one is accepted."""
    try:
        return await db_call(run_for_stream_token)(
            request.GET["token"], run_id=run_id, now=timezone.now()
        )
    except StreamTokenRefused as refused:
        return _error(refused.status, refused.code, refused.message)


async def _event_stream(run: Run, after: int) -> AsyncIterator[bytes]:
    heartbeat_s = float(settings.SWITCHYARD_SSE_HEARTBEAT_S)
    async with RunFeed(run, after=after) as feed:
        # A first byte at once: servers send the response's headers with its first bytes, and
        # a client should not wait for the next event to know that it is connected.
        yield f": run {run.public_id} after {after}\n\n".encode()
        async for item in feed.items(idle_s=heartbeat_s):
            yield sse_frame(item)


def sse_frame(item: StoredEvent | Delta | Idle) -> bytes:
    """One SSE frame. Deltas have no `id:`, so that Last-Event-ID stays the last stored seq."""
    if isinstance(item, Idle):
        return b": heartbeat\n\n"
    data = json.dumps(item.payload, separators=(",", ":"))
    if isinstance(item, Delta):
        return f"event: step.delta\ndata: {data}\n\n".encode()
    return f"id: {item.seq}\nevent: {item.payload['type']}\ndata: {data}\n\n".encode()


# --- ASGI: one thread for the sync parts of every long-lived request ------------------------


def _accept_header(scope: dict[str, Any]) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"accept":
            return value.decode("latin1")
    return ""


def holds_request_open(scope: dict[str, Any]) -> bool:
    """Whether this HTTP request goes to a long-lived view (a stream or a wait)."""
    query_string = scope.get("query_string", b"")
    accept = _accept_header(scope)
    if b"wait" not in query_string and EVENT_STREAM not in accept:
        return False  # the common case, decided without resolving the URL
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    try:
        match = resolve(path)
    except Resolver404:
        return False
    predicate = getattr(match.func, "holds_request_open", None)
    if predicate is None:
        return False
    query = parse_qs(query_string.decode("latin1"), keep_blank_values=True)
    return predicate(scope["method"], query, accept)


class LongLivedRequests:
    """ASGI middleware: long-lived requests run Django's sync parts on one shared thread.

    Django's ASGI handler gives each request a single-thread executor for its sync work
    (request signals, middleware hooks) that lives until the response ends. For a request that
    waits 60 s or streams for an hour, that is an idle thread per client: 1,000 waiting
    clients, 1,000 threads. These requests' sync parts take microseconds and touch no
    database (their views query on the default pool, see `jobs.feeds.db_call`), so one thread
    serves them all. Every other request keeps Django's thread of its own.
    """

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="long-lived-sync")

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and holds_request_open(scope):
            # An outer context with an executor takes precedence over the one Django's handler
            # opens for the request.
            async with ThreadSensitiveContext(executor=self.executor):
                await self.app(scope, receive, send)
            return
        await self.app(scope, receive, send)
