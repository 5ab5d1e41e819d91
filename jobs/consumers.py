"""WebSocket consumers for tenants' applications.

`WS /ws/runs/{id}/` sends what the SSE stream sends (`jobs.api.streams`): each stored event
after the client's seq as its JSON payload, live events after them, `step.delta` messages
between, and closes with 1000 after the run's final event.

Authentication keeps the API key out of URLs (and so out of access logs), in one of two ways:

- the `Sec-WebSocket-Protocol` header: offer `["switchyard.v1", "switchyard.bearer.<key>"]`;
  the server accepts `switchyard.v1` (it never echoes the key). Streaming starts at once,
  after `?after=<seq>` if the URL has it (a seq is no secret);
- a first message `{"type": "auth", "key": "<key>", "after": <seq>}` within 10 s.

A browser, which must not hold an API key, opens `WS /ws/runs/{id}/?token=<stream token>`
instead (`jobs.stream_tokens`, minted by the tenant's backend for this run); streaming starts at
once, after `?after=<seq>` if given. A token-bearing socket may come from a page on an origin
the run's tenant allows (`orchestrator.asgi`).

Later, `{"after": <seq>}` rewinds: the events after that seq follow, in order (frames already
on their way may repeat; reconnecting with the seq at authentication never repeats one).
Close codes: 4401 unknown or revoked key, invalid or expired token (or no authentication in
time), 4403 a token for another run, 4404 a run that is not the caller's tenant's (or a
malformed id), 4400 a malformed `after` in the URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from typing import Any
from urllib.parse import parse_qs

from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.utils import timezone

from jobs import selectors
from jobs.feeds import Idle, RunFeed, db_call, tenant_for_key
from jobs.formats import parse_uuid
from jobs.models import Run
from jobs.stream_tokens import StreamTokenRefused, run_for_stream_token, stream_token_read

log = logging.getLogger(__name__)

SUBPROTOCOL = "switchyard.v1"
BEARER_PREFIX = "switchyard.bearer."
AUTH_TIMEOUT_S = 10.0
CLOSE_INVALID = 4400
CLOSE_UNAUTHENTICATED = 4401
CLOSE_NOT_FOUND = 4404


def _seq(value: Any) -> int | None:
    """A seq the client sent: a non-negative integer, else None."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


_RUN_SOCKET_PATH = re.compile(r"/ws/runs/(?P<run_id>[^/]+)/")


async def stream_token_origin_allowed(scope: dict[str, Any], origin: str) -> bool:
    """Whether a handshake from a page on `origin` may open a run's socket: it bears a valid
    stream token for the run of its URL, and the run's tenant allows that origin.

    Asked by the origin check (`orchestrator.asgi`) before routing, for origins that are not
    this site's own. Everything else the consumer checks again on connect.
    """
    match = _RUN_SOCKET_PATH.fullmatch(scope.get("path", ""))
    query = parse_qs(scope.get("query_string", b"").decode("latin1"))
    token = query.get("token", [""])[-1]
    if match is None or not token:
        return False
    try:
        grant = stream_token_read(token, now=timezone.now())
    except StreamTokenRefused:
        return False
    if parse_uuid(match["run_id"]) != grant.run:
        return False
    return await db_call(selectors.run_tenant_allows_origin)(run_id=grant.run, origin=origin)


class RunEventsConsumer(AsyncJsonWebsocketConsumer):
    # No channel of the consumer's own: the RunFeed subscribes on one it reads itself.
    channel_layer_alias = None

    feed: RunFeed | None = None
    streaming: asyncio.Task | None = None
    auth_timer: asyncio.Task | None = None

    async def connect(self) -> None:
        offered: list[str] = self.scope.get("subprotocols") or []
        key = next((p[len(BEARER_PREFIX) :] for p in offered if p.startswith(BEARER_PREFIX)), None)
        # Close codes other than 1000 can only be sent on an accepted socket.
        await self.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
        token = self._query().get("token", [None])[-1]
        if token is not None:
            await self._open_with_token(token)
            return
        if key is None:
            self.auth_timer = asyncio.create_task(self._close_unless_authenticated())
            return
        after = self._after_from_url()
        if after is None:
            await self.close(code=CLOSE_INVALID)
            return
        await self._open(key, after)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if not isinstance(content, dict):
            await self._complain("messages are JSON objects")
            return
        if self.feed is None:
            if content.get("type") != "auth" or not isinstance(content.get("key"), str):
                await self.close(code=CLOSE_UNAUTHENTICATED)
                return
            after = _seq(content.get("after", 0))
            if after is None:
                await self._complain("after must be a non-negative integer (an event seq)")
                return
            await self._open(content["key"], after)
            return
        if "after" in content:
            after = _seq(content["after"])
            if after is None:
                await self._complain("after must be a non-negative integer (an event seq)")
                return
            await self._stream_from(after)
            return
        await self._complain('expected {"after": <seq>}')

    async def disconnect(self, code: int) -> None:
        for task in (self.auth_timer, self.streaming):
            await _cancel(task)
        if self.feed is not None:
            await self.feed.__aexit__(None, None, None)
            self.feed = None

    @classmethod
    async def decode_json(cls, text_data: str) -> Any:
        try:
            return json.loads(text_data)
        except ValueError:
            return None  # refused by receive_json, without dropping the connection

    # --- internals ----------------------------------------------------------------------

    def _query(self) -> dict[str, list[str]]:
        return parse_qs(self.scope.get("query_string", b"").decode("latin1"))

    def _after_from_url(self) -> int | None:
        raw = self._query().get("after", ["0"])[-1]
        return int(raw) if raw.isdigit() else None

    async def _open(self, key: str, after: int) -> None:
        await _cancel(self.auth_timer)
        tenant = await db_call(tenant_for_key)(key)
        if tenant is None:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        run_id = self.scope["url_route"]["kwargs"]["run_id"]
        run = await db_call(selectors.run_for)(tenant=tenant, run_id=run_id)
        if run is None:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        await self._follow(run, after)

    async def _open_with_token(self, token: str) -> None:
        after = self._after_from_url()
        if after is None:
            await self.close(code=CLOSE_INVALID)
            return
        run_id = self.scope["url_route"]["kwargs"]["run_id"]
        try:
            run = await db_call(run_for_stream_token)(token, run_id=run_id, now=timezone.now())
        except StreamTokenRefused as refused:
            await self.close(code=4000 + refused.status)
            return
        await self._follow(run, after)

    async def _follow(self, run: Run, after: int) -> None:
        self.feed = RunFeed(run)
        await self.feed.__aenter__()
        await self._stream_from(after)

    async def _stream_from(self, after: int) -> None:
        await _cancel(self.streaming)
        self.feed.rewind(after)
        self.streaming = asyncio.create_task(self._stream(self.feed))

    async def _stream(self, feed: RunFeed) -> None:
        try:
            # Idle feeds re-read the log; daphne's own pings keep the socket alive.
            async for item in feed.items(idle_s=float(settings.SWITCHYARD_SSE_HEARTBEAT_S)):
                if not isinstance(item, Idle):
                    await self.send_json(item.payload)
        except Exception:
            log.exception("run stream %s failed", feed.run.public_id)
            await self.close(code=1011)
            return
        await self.close(code=1000)

    async def _close_unless_authenticated(self) -> None:
        await asyncio.sleep(AUTH_TIMEOUT_S)
        if self.feed is None:
            await self.close(code=CLOSE_UNAUTHENTICATED)

    async def _complain(self, message: str) -> None:
        await self.send_json({"type": "error", "code": "invalid_message", "message": message})


async def _cancel(task: asyncio.Task | None) -> None:
    if task is None or task.done() or task is asyncio.current_task():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
