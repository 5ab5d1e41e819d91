"""What every live socket shares: close codes, the session check, and the run-stream consumer.

`RunStreamConsumer` is the one implementation of a socket that follows a run: accept, ask the
subclass who the caller is and which run it may follow (`authorise`), close with the code it
gives or follow the run's feed (`jobs.feeds.RunFeed`: stored events after the client's seq,
then live ones, each once and in order), close with 1000 after the run's final event, rewind
on request. The tenants' socket (`jobs.consumers`, an API key or a stream token) and the
operators' (`dashboard.consumers`, a staff session) differ only in `authorise`.

`session_refusal` is the check of sockets authenticated by the Django session (the
dashboard's, the reviewers' inbox).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any
from urllib.parse import parse_qs

from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from jobs.feeds import Idle, RunFeed
from jobs.models import Run

log = logging.getLogger(__name__)

CLOSE_INVALID = 4400
CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404


def session_refusal(scope: dict[str, Any], *, staff: bool = False) -> int | None:
    """The close code for a session socket's user (4401 anonymous, 4403 not staff when
    `staff`), or None: let in."""
    user = scope.get("user")
    if user is None or not user.is_authenticated:
        return CLOSE_UNAUTHENTICATED
    if staff and not user.is_staff:
        return CLOSE_FORBIDDEN
    return None


def query(scope: dict[str, Any]) -> dict[str, str]:
    """The socket URL's query parameters, the last value of each."""
    parsed = parse_qs(scope.get("query_string", b"").decode("latin1"))
    return {name: values[-1] for name, values in parsed.items()}


def seq_from(value: Any) -> int | None:
    """A seq the client sent (an integer, or the digits of one in a URL), else None."""
    if isinstance(value, str):
        return int(value) if value.isdigit() else None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


# What `authorise` returns: the run to follow and the seq to follow it after; a close code;
# or None: not yet decided (the subclass waits for a message, then calls `opened`).
Authorised = tuple[Run, int] | int | None


class RunStreamConsumer(AsyncJsonWebsocketConsumer):
    """A socket that follows one run (see the module's doc). Subclasses define `authorise`."""

    # No channel of the consumer's own: the feed's messages come from the process's hub.
    channel_layer_alias = None
    # Whether the socket carries `step.delta` messages.
    deltas = True

    feed: RunFeed | None = None
    streaming: asyncio.Task | None = None

    def subprotocol(self) -> str | None:
        """The subprotocol to accept, if any."""
        return None

    async def authorise(self) -> Authorised:
        raise NotImplementedError

    async def connect(self) -> None:
        # Close codes other than 1000 can only be sent on an accepted socket.
        await self.accept(subprotocol=self.subprotocol())
        await self.opened(await self.authorise())

    async def opened(self, outcome: Authorised) -> None:
        """Act on what `authorise` (or a later authentication) decided."""
        if outcome is None:
            return
        if isinstance(outcome, int):
            await self.close(code=outcome)
            return
        run, after = outcome
        self.feed = RunFeed(run, deltas=self.deltas)
        await self.feed.__aenter__()
        await self.stream_from(after)

    async def stream_from(self, after: int) -> None:
        """Send the run's events after `after`, then live ones (again, if already streaming:
        frames already on their way may repeat)."""
        await cancel(self.streaming)
        self.feed.rewind(after)
        self.streaming = asyncio.create_task(self._stream(self.feed))

    async def disconnect(self, code: int) -> None:
        await cancel(self.streaming)
        if self.feed is not None:
            feed, self.feed = self.feed, None
            await feed.__aexit__(None, None, None)

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


async def cancel(task: asyncio.Task | None) -> None:
    """Cancel `task` and wait for it to end (not the calling task itself)."""
    if task is None or task.done() or task is asyncio.current_task():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
