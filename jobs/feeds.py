"""Live feeds of one run's events, for the SSE stream, the WebSocket and the waiting API.

A feed is a projection of the run's log in PostgreSQL that the channel layer only speeds up
(docs/architecture.md, invariant 3). It is gapless and free of duplicates by construction:

1. subscribe first: the process's hub (`jobs.live`) confirms the subscription to the run's
   live channels before anything is read, so that an event committed while the log is read
   arrives twice (stored and live), never zero times;
2. replay: send the stored events after the client's last seq;
3. forward live events in seq order, dropping every seq already sent; a live message past the
   next expected seq waits up to GAP_WAIT_S for the missing ones (events of one run are
   published by several processes, so they may arrive out of order), then the gap is read
   from the database (the channel layer may drop a message under load);
4. when nothing arrives for `idle_s`, look at the run's last seq, and read the log if it is
   past the subscriber's: a lost last message then delays a view by at most that long. The
   feeds of one process ask together (`RunHeads`: one query for every feed that asks within
   HEADS_GATHER_S), so that a thousand streams that went idle together cost one query, not a
   thousand log reads queued behind each other (which held every stream's live events back
   for seconds);
5. when the hub says that it lost Redis, or that it subscribed again after losing it
   (`jobs.live.RESYNC`), do the same at once; while it is not subscribed (Redis down), every
   POLL_S: the stream stays whole, only slower, and without token deltas.

The feed ends after the run's final event (`run.succeeded`, `run.failed`, `run.cancelled`).
Token deltas pass through as they come; they carry no seq and take no part in the above.

Database calls run on the event loop's default executor (`db_call`), one short query at a
time (a read of the log is one statement): a feed holds a thread only while a query runs,
never while it waits. Live messages come from memory: the hub receives each once per process.
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
from django.db.models import Q

from jobs.events import event_payload, run_delta_group, run_group
from jobs.live import Subscription, run_bus
from jobs.models import Event, Run
from jobs.statuses import RUN_FINAL
from tenants.auth import api_key_lookup
from tenants.models import Tenant

log = logging.getLogger(__name__)

FINAL_EVENTS = frozenset({"run.succeeded", "run.failed", "run.cancelled"})
# Events read from the log per query while replaying.
REPLAY_PAGE = 500
# How long a feed waits for a missing seq to arrive live before reading the log for it.
GAP_WAIT_S = 0.1
# How often a feed that could not subscribe (Redis is down) looks for new events.
POLL_S = 1.0
# How long the first question about a run's last seq waits for others to share its query.
HEADS_GATHER_S = 0.01


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
        self._subscription: Subscription | None = None

    def _groups(self) -> list[str]:
        groups = [run_group(self.run.public_id)]
        if self.deltas:
            groups.append(run_delta_group(self.run.public_id))
        return groups

    async def __aenter__(self) -> RunFeed:
        # Returns once the subscription is confirmed, or not live (Redis down): then the feed
        # polls the log (every POLL_S) until the hub is subscribed, stored events not lost.
        self._subscription = await run_bus().subscribe(self._groups())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._subscription is not None:
            subscription, self._subscription = self._subscription, None
            await subscription.bus.unsubscribe(subscription)

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
            polling = not self._subscription.live  # not subscribed (Redis down): poll
            if polling:
                remaining = min(remaining, POLL_S)
            message = await self._receive(timeout=remaining) if remaining > 0 else None
            if message is None or message.get("type") == "resync":
                # The heartbeat first: it needs no database, and a proxy closes a stream that
                # stays silent past its read timeout however long the log read below waits
                # for a connection (found by the bench: 24 of 500 streams, under saturation).
                if message is None and loop.time() - quiet_since >= idle_s:
                    yield Idle()
                    quiet_since = loop.time()
                async for item in self._resync():
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
            # (the scheduler's `step.queued`, then the worker's `step.started`). Each is
            # published before its commit returns, so what one commit caused comes after it;
            # still, wait a moment for the missing ones before reading the log.
            remaining = deadline - loop.time()
            message = await self._receive(timeout=remaining) if remaining > 0 else None
            if message is None or message.get("type") == "resync":
                break
            if message.get("type") == "run.delta":
                yield Delta(message["delta"])
            elif message.get("type") == "run.events":
                for payload in message.get("events") or []:
                    if payload["seq"] > self.last_seq:
                        pending[payload["seq"]] = payload
        if pending:
            # Still missing: a message was lost (Redis restarted, a publish failed). The log
            # has what it carried, and these events too (they were published after their
            # commit).
            async for item in self._catch_up():
                yield item

    async def _resync(self) -> AsyncIterator[StoredEvent]:
        """What the subscriber may have missed: the log after its seq, if the run's last seq
        (asked together with the process's other feeds) is past it."""
        last_seq, final = await run_heads().ask(self.run.pk)
        if last_seq > self.last_seq:
            async for item in self._catch_up():
                yield item
        elif final:
            self.finished = True  # the final event is the run's last: it has everything

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
        """Events after `after` (a page), and whether the subscriber has the run's final event.

        One statement: the page, and any final event at or before `after` (a run's final
        event is its last, so a subscriber with it, and nothing after it, has everything).
        """
        events = list(
            Event.objects.filter(run_id=self.run.pk)
            .filter(Q(seq__gt=after) | Q(seq__lte=after, type__in=FINAL_EVENTS))
            .order_by("seq")[: REPLAY_PAGE + 1]
        )
        has_final = bool(events) and events[0].seq <= after
        new = [event for event in events if event.seq > after][:REPLAY_PAGE]
        return [event_payload(event, self.run.public_id) for event in new], has_final

    async def _receive(self, *, timeout: float) -> dict[str, Any] | None:
        return await self._subscription.get(timeout)


class RunHeads:
    """Answers "what is this run's last seq, and has it ended" for the feeds of one event loop,
    in one query for all the questions asked within HEADS_GATHER_S."""

    def __init__(self) -> None:
        self.waiting: dict[int, list[asyncio.Future[tuple[int, bool]]]] = {}

    async def ask(self, run_pk: int) -> tuple[int, bool]:
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        if not self.waiting:
            loop.call_later(HEADS_GATHER_S, lambda: loop.create_task(self._answer()))
        self.waiting.setdefault(run_pk, []).append(answer)
        return await answer

    async def _answer(self) -> None:
        waiting, self.waiting = self.waiting, {}
        try:
            heads = await db_call(_run_heads)(list(waiting))
        except Exception as exc:  # noqa: BLE001 - each feed gets the error its read would
            for answers in waiting.values():
                for answer in answers:
                    if not answer.done():
                        answer.set_exception(exc)
            return
        for run_pk, answers in waiting.items():
            head = heads.get(run_pk, (0, True))  # a run that is gone has nothing to send
            for answer in answers:
                if not answer.done():
                    answer.set_result(head)


def _run_heads(run_pks: list[int]) -> dict[int, tuple[int, bool]]:
    rows = Run.objects.filter(pk__in=run_pks).values_list("pk", "next_seq", "status")
    return {pk: (next_seq - 1, status in RUN_FINAL) for pk, next_seq, status in rows}


def has_everything(run: Run, after: int) -> bool:
    """Whether the run has ended and a subscriber that has seen up to seq `after` has its whole
    log (its final event is its last). One query."""
    last_seq, final = _run_heads([run.pk]).get(run.pk, (0, True))
    return final and last_seq <= after


_heads: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, RunHeads] = weakref.WeakKeyDictionary()


def run_heads() -> RunHeads:
    loop = asyncio.get_running_loop()
    heads = _heads.get(loop)
    if heads is None:
        heads = _heads[loop] = RunHeads()
    return heads


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
