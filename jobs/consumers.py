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
The stream itself is `jobs.sockets.RunStreamConsumer`'s, shared with the operators' run
socket; this consumer only authenticates. Close codes: 4401 unknown or revoked key, invalid or
expired token (or no authentication in time), 4403 a token for another run, 4404 a run that is
not the caller's tenant's (or a malformed id), 4400 a malformed `after` in the URL.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any
from urllib.parse import parse_qs

from django.utils import timezone

from jobs import selectors
from jobs.feeds import db_call, tenant_for_key
from jobs.formats import parse_uuid
from jobs.sockets import (
    CLOSE_INVALID,
    CLOSE_NOT_FOUND,
    CLOSE_UNAUTHENTICATED,
    Authorised,
    RunStreamConsumer,
    cancel,
    query,
    seq_from,
)
from jobs.stream_tokens import StreamTokenRefused, run_for_stream_token, stream_token_read

SUBPROTOCOL = "switchyard.v1"
BEARER_PREFIX = "switchyard.bearer."
AUTH_TIMEOUT_S = 10.0
SEQ_REFUSED = "after must be a non-negative integer (an event seq)"

_RUN_SOCKET_PATH = re.compile(r"/ws/runs/(?P<run_id>[^/]+)/")


async def stream_token_origin_allowed(scope: dict[str, Any], origin: str) -> bool:
    """Whether a handshake from a page on `origin` may open a run's socket: it bears a valid
    stream token for the run of its URL, and the run's tenant allows that origin.

    Asked by the origin check (`orchestrator.asgi`) before routing, for origins that are not
    this site's own. Everything else the consumer checks again on connect.
    """
    match = _RUN_SOCKET_PATH.fullmatch(scope.get("path", ""))
    params = parse_qs(scope.get("query_string", b"").decode("latin1"))
    token = params.get("token", [""])[-1]
    if match is None or not token:
        return False
    try:
        grant = stream_token_read(token, now=timezone.now())
    except StreamTokenRefused:
        return False
    if parse_uuid(match["run_id"]) != grant.run:
        return False
    return await db_call(selectors.run_tenant_allows_origin)(run_id=grant.run, origin=origin)


class RunEventsConsumer(RunStreamConsumer):
    auth_timer: asyncio.Task | None = None

    def subprotocol(self) -> str | None:
        return SUBPROTOCOL if SUBPROTOCOL in self._offered() else None

    async def authorise(self) -> Authorised:
        params = query(self.scope)
        after = seq_from(params.get("after", "0"))
        if "token" in params:
            return CLOSE_INVALID if after is None else await self._by_token(params["token"], after)
        key = next(
            (p[len(BEARER_PREFIX) :] for p in self._offered() if p.startswith(BEARER_PREFIX)),
            None,
        )
        if key is None:  # the first message authenticates, within AUTH_TIMEOUT_S
            self.auth_timer = asyncio.create_task(self._close_unless_authenticated())
            return None
        return CLOSE_INVALID if after is None else await self._by_key(key, after)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if not isinstance(content, dict):
            await self._complain("messages are JSON objects")
            return
        if self.feed is None:
            if content.get("type") != "auth" or not isinstance(content.get("key"), str):
                await self.close(code=CLOSE_UNAUTHENTICATED)
                return
            after = seq_from(content.get("after", 0))
            if after is None or isinstance(content.get("after"), str):
                await self._complain(SEQ_REFUSED)
                return
            await cancel(self.auth_timer)
            await self.opened(await self._by_key(content["key"], after))
            return
        if "after" in content:
            after = seq_from(content["after"])
            if after is None or isinstance(content["after"], str):
                await self._complain(SEQ_REFUSED)
                return
            await self.stream_from(after)
            return
        await self._complain('expected {"after": <seq>}')

    async def disconnect(self, code: int) -> None:
        await cancel(self.auth_timer)
        await super().disconnect(code)

    @classmethod
    async def decode_json(cls, text_data: str) -> Any:
        try:
            return json.loads(text_data)
        except ValueError:
            return None  # refused by receive_json, without dropping the connection

    # --- internals ----------------------------------------------------------------------

    def _offered(self) -> list[str]:
        return self.scope.get("subprotocols") or []

    async def _by_key(self, key: str, after: int) -> Authorised:
        tenant = await db_call(tenant_for_key)(key)
        if tenant is None:
            return CLOSE_UNAUTHENTICATED
        run_id = self.scope["url_route"]["kwargs"]["run_id"]
        run = await db_call(selectors.run_for)(tenant=tenant, run_id=run_id)
        return CLOSE_NOT_FOUND if run is None else (run, after)

    async def _by_token(self, token: str, after: int) -> Authorised:
        run_id = self.scope["url_route"]["kwargs"]["run_id"]
        try:
            run = await db_call(run_for_stream_token)(token, run_id=run_id, now=timezone.now())
        except StreamTokenRefused as refused:
            return 4000 + refused.status
        return run, after

    async def _close_unless_authenticated(self) -> None:
        await asyncio.sleep(AUTH_TIMEOUT_S)
        if self.feed is None:
            await self.close(code=CLOSE_UNAUTHENTICATED)

    async def _complain(self, message: str) -> None:
        await self.send_json({"type": "error", "code": "invalid_message", "message": message})
