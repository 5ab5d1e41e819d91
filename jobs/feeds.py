"""Live feeds of one run's events, for the SSE stream, the WebSocket and the waiting API.

A feed is a projection of the run's log in PostgreSQL that the channel layer only speeds up
(docs/architecture.md, invariant 3). It is gapless and free of duplicates by construction:

1. subscribe first: join the run's groups before reading anything, so that an event committed
   while the log is read arrives twice (stored and live), never zero times;
2. replay: send the stored events after the client's last seq;
3. forward live events in seq order, dropping every seq already sent; a live message past the
   next expected seq waits up to GAP_WAIT_S for the missing ones (events of one run are
   published by several processes, so they may arrive out of order), then the gap is read
   from the database (the channel layer may drop a message under load);
4. when nothing arrives for `idle_s`, read the log again: a dropped last message then delays
   a view by at most that long;
5. when the channel layer cannot be reached at subscription (Redis down), poll the log every
   POLL_S instead: the stream stays whole, only slower, and without token deltas.

The feed ends after the run's final event (`run.succeeded`, `run.failed`, `run.cancelled`).
Token deltas pass through as they come; they carry no seq and take no part in the above.

Database calls run on the event loop's default executor (`db_call`), one short query at a
time: a feed holds a thread only while a query runs, never while it waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer

from jobs import selectors
from jobs.events import event_payload, run_delta_group, run_group
from jobs.models import Run
from tenants.auth import api_key_lookup
from tenants.models import Tenant

log = logging.getLogger(__name__)

FINAL_EVENTS = frozenset({"run.succeeded", "run.failed", "run.cancelled"})
# Events read from the log per query while replaying.
REPLAY_PAGE = 500
# Group joins and leaves in flight at once per event loop. redis-py's pool refuses a command
# (MaxConnectionsError) instead of waiting once its 100 connections are busy, so a burst of
# clients (300 waiting requests arriving together) queues here instead of failing there.
SUBSCRIPTIONS_IN_FLIGHT = 32
# How long a feed waits for a missing seq to arrive live before reading the log for it.
GAP_WAIT_S = 0.1
# How often a feed that could not subscribe (the channel layer is down) reads the log.
POLL_S = 1.0

_subscription_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


def _subscription_slot() -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    slot = _subscription_slots.get(loop)
    if slot is None:
        slot = _subscription_slots[loop] = asyncio.Semaphore(SUBSCRIPTIONS_IN_FLIGHT)
    return slot


def db_call(func: Callable[..., Any]) -> Callable[..., Any]:
    """`func` as a coroutine that runs on the loop's default thread pool.

    Not thread-sensitive on purpose: Django's default would run it on the request's own
    thread (or, in a consumer, on one thread shared by the whole process), and a thread per
    waiting client is what these views exist to avoid. Each call is self-contained (no
    transaction spans two calls) and closes stale connections before and after, like
    Channels' `database_sync_to_async`.
    """
    return database_sync_to_async(func, thread_sensitive=False)


def tenant_for_key(raw_key: str) -> Tenant | None:
    """The tenant of a live API key, or None (unknown or revoked)."""
    api_key = api_key_lookup(raw_key.strip())
    return api_key.tenant if api_key is not None else None


@dataclass(frozen=True)
class StoredEvent:
    """An event of the run's log (`payload` as `jobs.events.event_payload` makes it)."""

    payload: dict[str, Any]

    @property
    def seq(self) -> int:
        return self.payload["seq"]


@dataclass(frozen=True)
class Delta:
    """An ephemeral `step.delta`: no seq, not stored."""

    payload: dict[str, Any]


@dataclass(frozen=True)
class Idle:
    """Nothing arrived for `idle_s`: time for a heartbeat (the log is read again next)."""


FeedItem = StoredEvent | Delta | Idle


class RunFeed:
    """One subscriber's view of one run. Use as `async with RunFeed(run, after=n) as feed:`.

    `run` must come from a tenant-scoped selector (`selectors.run_for`): the feed trusts it.
    `last_seq` is the last seq the subscriber has; `finished` turns true once it has the
    run's final event.
    """

    def __init__(self, run: Run, *, after: int = 0, deltas: bool = True) -> None:
        self.run = run
        self.last_seq = after
        self.finished = False
        self.deltas = deltas
        self._layer = get_channel_layer()
        self._channel: str | None = None
        self._receiving: asyncio.Future[dict[str, Any]] | None = None

    def _groups(self) -> list[str]:
        groups = [run_group(self.run.public_id)]
        if self.deltas:
            groups.append(run_delta_group(self.run.public_id))
        return groups

    async def __aenter__(self) -> RunFeed:
        channel = await self._layer.new_channel()
        try:
            async with _subscription_slot():
                for group in self._groups():
                    await self._layer.group_add(group, channel)
        except Exception:
            # Redis is down: follow the log by polling it (every POLL_S) instead of failing
            # the request; live deltas are lost meanwhile, stored events are not.
            log.warning(
                "subscribing to run %s failed; polling its log", self.run.public_id, exc_info=True
            )
            return self
        self._channel = channel
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._receiving is not None:
            self._receiving.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._receiving
            self._receiving = None
        if self._channel is None:
            return
        channel, self._channel = self._channel, None
        try:
            async with _subscription_slot():
                for group in self._groups():
                    await self._layer.group_discard(group, channel)
        except Exception:
            # The group forgets the channel when it expires; nothing reads it meanwhile.
            log.warning("leaving the groups of run %s failed", self.run.public_id, exc_info=True)

    def rewind(self, after: int) -> None:
        """Start again after `after`: the next `items()` replays from there."""
        self.last_seq = after
        self.finished = False

    async def items(self, *, idle_s: float) -> AsyncIterator[FeedItem]:
        """Stored events after `last_seq` in order, each once, with live deltas between them.

        Each call replays from the current `last_seq` first, so a consumer may stop iterating
        (a WebSocket client rewinding) and call it again: the subscription, and any message
        already received on it, is kept.
        """
        loop = asyncio.get_running_loop()
        async for item in self._catch_up():
            yield item
        # `idle_s` counts from the last item yielded, not the last message received: messages
        # that yield nothing (events already sent) must not keep a stream silent for longer.
        quiet_since = loop.time()
        while not self.finished:
            remaining = idle_s - (loop.time() - quiet_since)
            if self._channel is None:  # not subscribed (Redis down): poll the log
                remaining = min(remaining, POLL_S)
            message = await self._receive(timeout=remaining) if remaining > 0 else None
            if message is None:
                # The heartbeat first: it needs no database, and a proxy closes a stream that
                # stays silent past its read timeout however long the log read below waits
                # for a connection (found by the bench: 24 of 500 streams, under saturation).
                if loop.time() - quiet_since >= idle_s:
                    yield Idle()
                    quiet_since = loop.time()
                async for item in self._catch_up():
                    yield item
                    quiet_since = loop.time()
                continue
            if message.get("type") == "run.delta":
                yield Delta(message["delta"])
                quiet_since = loop.time()
            elif message.get("type") == "run.events":
                async for item in self._live(message.get("events") or []):
                    yield item
                    quiet_since = loop.time()

    async def _live(self, payloads: list[dict[str, Any]]) -> AsyncIterator[FeedItem]:
        pending = {p["seq"]: p for p in payloads if p["seq"] > self.last_seq}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + GAP_WAIT_S
        while pending:
            while self.last_seq + 1 in pending:
                yield self._sent(pending.pop(self.last_seq + 1))
            if not pending:
                return
            # A gap: events of one run are published by whichever process committed them
            # (the scheduler's `step.queued`, then the worker's `step.started`), so they may
            # arrive out of order. Wait a moment for the missing ones before reading the log.
            remaining = deadline - loop.time()
            message = await self._receive(timeout=remaining) if remaining > 0 else None
            if message is None:
                break
            if message.get("type") == "run.delta":
                yield Delta(message["delta"])
            elif message.get("type") == "run.events":
                for payload in message.get("events") or []:
                    if payload["seq"] > self.last_seq:
                        pending[payload["seq"]] = payload
        if pending:
            # Still missing: the channel layer dropped a message. The log has what it
            # carried, and these events too (they were published after their commit).
            async for item in self._catch_up():
                yield item

    async def _catch_up(self) -> AsyncIterator[StoredEvent]:
        payloads, run_final = await db_call(self._read_log)(self.last_seq)
        sent_any = bool(payloads)
        while True:
            for payload in payloads:
                yield self._sent(payload)
            if len(payloads) < REPLAY_PAGE:
                break
            payloads, _ = await db_call(self._read_log)(self.last_seq)
        if not sent_any and run_final:
            # Nothing after the subscriber's seq and the run is over: it has everything.
            self.finished = True

    def _sent(self, payload: dict[str, Any]) -> StoredEvent:
        self.last_seq = payload["seq"]
        self.finished = payload["type"] in FINAL_EVENTS
        return StoredEvent(payload)

    def _read_log(self, after: int) -> tuple[list[dict[str, Any]], bool]:
        """Events after `after` (a page), and whether the run was final before they were read.

        The status is read first: if the run was final then, its final event was committed
        by then too (same transaction), so the events read next include it.
        """
        self.run.refresh_from_db(fields=["status"])
        events = selectors.events_for(run=self.run, after=after, limit=REPLAY_PAGE)
        return [event_payload(event, self.run.public_id) for event in events], self.run.is_final

    async def _receive(self, *, timeout: float) -> dict[str, Any] | None:
        if self._channel is None:
            await asyncio.sleep(timeout)
            return None
        # One receive stays pending across timeouts and across `items()` calls: cancelling a
        # channels_redis receive discards what it had buffered for the channel.
        if self._receiving is None:
            self._receiving = asyncio.ensure_future(self._layer.receive(self._channel))
        done, _ = await asyncio.wait({self._receiving}, timeout=timeout)
        if not done:
            return None
        receiving, self._receiving = self._receiving, None
        try:
            return receiving.result()
        except Exception:
            # Redis failed us: the log is still the truth, and the caller reads it on None.
            # Pause before the channel is tried again, so that a Redis that is down turns the
            # feed into a slow poll of the database rather than a busy loop.
            log.warning("receive for run %s failed", self.run.public_id, exc_info=True)
            await asyncio.sleep(min(timeout, 1.0))
            return None


async def run_wait_final(run: Run, *, timeout_s: float, resync_s: float = 5.0) -> None:
    """Return when `run` has ended or after `timeout_s`, whichever is first.

    Holds no thread while it waits. The feed starts at the run's last seq as loaded, so the
    replay reads only what happened since (the race between loading the run and subscribing)
    and a run that ended meanwhile returns at once.
    """
    if timeout_s <= 0:
        return
    async with RunFeed(run, after=run.next_seq - 1, deltas=False) as feed:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                async for _ in feed.items(idle_s=min(resync_s, timeout_s)):
                    pass
