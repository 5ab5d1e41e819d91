"""The run log and its live publication.

Every state change of a run appends an `Event` in the same transaction, under the run's row
lock, so that sequence numbers are gapless per run. When the transaction commits, its new
events go to the run's live channel in one message, sent by the committing thread itself
(`jobs.live`: one Redis PUBLISH from the commit hook); live views are projections of the
database that resync by `seq`, so a message that is lost costs nothing but latency. Only this
module knows the channels' and groups' names.

Token deltas (`step.delta`) are the one exception to the log: ephemeral, never stored, no
`seq`, coalesced per step attempt (`DeltaCoalescer`) and sent to a channel of their own, so
that a client that only waits for a run's end is not woken twenty times a second per LLM step.

The operators' dashboards and the approval inboxes listen on channel-layer groups instead
(`publish_inbox`, the dashboard's ping), sent by this process's publisher thread: those
messages only say "something changed, read again".
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any

from channels.layers import get_channel_layer
from django.db import transaction

from jobs import live
from jobs.models import Event, Run, StepRun

log = logging.getLogger(__name__)

READY_CHANNEL = "switchyard_ready"


def run_group(run_public_id: Any) -> str:
    """The live channel (`jobs.live`) of a run's committed events:
    `{"type": "run.events", "events": [...]}`, one message per commit."""
    return f"run.{run_public_id}"


def run_delta_group(run_public_id: Any) -> str:
    """The live channel (`jobs.live`) of a run's ephemeral deltas:
    `{"type": "run.delta", "delta": {...}}`."""
    return f"run.{run_public_id}.deltas"


def inbox_group(tenant_public_id: Any) -> str:
    """The group of a tenant's approval inbox: `{"type": "inbox.changed", "change": {...}}`."""
    return f"inbox.{tenant_public_id}"


# Operators (staff) see every tenant's requests in the inbox.
INBOX_STAFF_GROUP = "inbox.staff"


def publish_inbox(tenant_public_id: Any, change: dict[str, Any]) -> None:
    """Tell open inboxes that an approval of this tenant changed. Never raises.

    `change` is small (`{"type": "approval.decided", "approval": uuid, "status": ...}`): the
    inbox re-reads the database on every change, so a dropped message costs only latency.
    Call after commit (`transaction.on_commit`).
    """
    message = {"type": "inbox.changed", "change": change}
    try:
        _publisher().send(inbox_group(tenant_public_id), message)
        _publisher().send(INBOX_STAFF_GROUP, message)
    except Exception:
        log.warning("inbox publish for tenant %s failed", tenant_public_id, exc_info=True)


def event_payload(event: Event, run_public_id: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "run": str(run_public_id),
        "seq": event.seq,
        "type": event.type,
        "at": event.created_at.isoformat(),
        "data": event.data,
    }
    if event.step_id:
        payload["step"] = event.step_id
        if event.map_index is not None:
            payload["map_index"] = event.map_index
    return payload


class RunLog:
    """Collects the events of one transaction on one run; `take` hands them to the statement
    that writes them (`switchyard_log_append`, through `switchyard_run_apply`), which numbers
    them from the run's `next_seq` under the run's row lock.

    Create it only inside a transaction that holds the run's row lock (`services.run_locked`).
    """

    def __init__(self, run: Run):
        self.run = run
        self._pending: list[Event] = []
        self._wake_scheduler = False
        self._wake_if_ready = False

    def add(self, type: str, *, step: StepRun | None = None, **data: Any) -> None:
        self._pending.append(
            Event(
                run=self.run,
                seq=self.run.next_seq + len(self._pending),
                type=type,
                step_id=step.step_id if step else "",
                map_index=step.map_index if step else None,
                data=data,
            )
        )

    def wake_scheduler(self, *, only_if_ready: bool = False) -> None:
        """NOTIFY the scheduler at commit; `only_if_ready`: only if some step waits for
        admission (a freed slot matters to nobody otherwise, and every NOTIFY costs a cycle)."""
        if only_if_ready:
            self._wake_if_ready = True
        else:
            self._wake_scheduler = True

    def take(self) -> tuple[list[dict[str, Any]], str | None]:
        """The pending events as rows for `switchyard_run_apply` (which numbers them from the
        run's `next_seq`) and the wake-up asked for (`"always"`, `"if_ready"` or None);
        both are cleared."""
        events = [
            {
                "type": event.type,
                "step_id": event.step_id,
                "map_index": event.map_index,
                "data": event.data,
            }
            for event in self._pending
        ]
        wake = "always" if self._wake_scheduler else "if_ready" if self._wake_if_ready else None
        self._pending = []
        self._wake_scheduler = self._wake_if_ready = False
        return events, wake


def publish_live_on_commit(run_public_id: Any, payloads: list[dict[str, Any]] | None) -> None:
    """`publish_live` once the current transaction commits (at once outside of one).

    The events a transaction adds to one run go out as one message, however many times it
    calls this: calls after the first add to the message its commit hook will send.
    """
    if not payloads:
        return
    connection = transaction.get_connection()
    if connection.in_atomic_block:
        waiting = _waiting_for_commit(connection, str(run_public_id))
        if waiting is not None:
            waiting.payloads.extend(payloads)
            return
    transaction.on_commit(_CommitPublish(str(run_public_id), list(payloads)))


class _CommitPublish:
    """A commit hook that publishes one run's events (`publish_live_on_commit`)."""

    def __init__(self, run_public_id: str, payloads: list[dict[str, Any]]) -> None:
        self.run_public_id = run_public_id
        self.payloads = payloads

    def __call__(self) -> None:
        publish_live(self.run_public_id, self.payloads)


def _waiting_for_commit(connection: Any, run_public_id: str) -> _CommitPublish | None:
    """This transaction's hook for the run, if it has one (hooks of a savepoint rolled back
    are gone from the list, and so are their events)."""
    for _savepoints, hook, _robust in connection.run_on_commit:
        if isinstance(hook, _CommitPublish) and hook.run_public_id == run_public_id:
            return hook
    return None


def publish_live(run_public_id: Any, payloads: list[dict[str, Any]]) -> None:
    """Send committed events to live subscribers, from the calling thread. Never raises.

    One PUBLISH (`jobs.live.publish`): a round trip to Redis on this thread, rather than a
    hand-over to a thread that must wait for the GIL in a process whose threads are busy. The
    log in PostgreSQL is the truth; a message that is lost costs a subscriber only a resync.
    """
    live.publish(run_group(run_public_id), {"type": "run.events", "events": payloads})
    _dashboard_ping.poke()


# Operators' dashboards (`dashboard.consumers`) listen here: `{"type": "dashboard.changed"}`
# says that some run changed, and they re-read the database. Each process sends at most one
# such message per DASHBOARD_PING_S (the last change of a burst is always sent).
DASHBOARD_GROUP = "dashboard"
DASHBOARD_PING_S = 0.25


class _DashboardPing:
    """A throttle with a trailing edge for the dashboards' "something changed" message."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self.last = float("-inf")
        self.armed = False

    def poke(self) -> None:
        try:
            with self.lock:
                if self.pid != os.getpid():  # a forked child: the parent's timer is not ours
                    self.pid, self.armed, self.last = os.getpid(), False, float("-inf")
                if self.armed:
                    return
                wait = self.last + DASHBOARD_PING_S - time.monotonic()
                if wait > 0:
                    self.armed = True
                else:
                    self.last = time.monotonic()
            if wait > 0:
                _publisher().call_later(wait, self._fire)
            else:
                _publisher().send(DASHBOARD_GROUP, {"type": "dashboard.changed"})
        except Exception:
            log.warning("dashboard ping failed", exc_info=True)

    def _fire(self) -> None:
        with self.lock:
            self.armed = False
            self.last = time.monotonic()
        _publisher().send(DASHBOARD_GROUP, {"type": "dashboard.changed"})


_dashboard_ping = _DashboardPing()


# A step attempt publishes at most one delta message per this interval (~20 per second).
DELTA_INTERVAL_S = 0.05


def publish_delta(
    run_public_id: Any,
    step_id: str,
    map_index: int | None,
    text: str,
    *,
    attempt: int | None = None,
) -> None:
    """Send a piece of a step's streamed output to the run's live subscribers. Never raises.

    Not stored and without `seq`: a subscriber that misses one loses only progress, the step's
    output in the log is the truth. `attempt` lets a client start the text again when a
    retried attempt streams anew.
    """
    delta: dict[str, Any] = {"run": str(run_public_id), "type": "step.delta", "step": step_id}
    if map_index is not None:
        delta["map_index"] = map_index
    if attempt is not None:
        delta["attempt"] = attempt
    delta["text"] = text
    live.publish(run_delta_group(run_public_id), {"type": "run.delta", "delta": delta})


class DeltaCoalescer:
    """Buffers one step attempt's deltas; publishes at most one message per `interval_s`.

    The first piece after a quiet interval goes out at once (a provider that already paces
    its deltas, like the simulated one, is not delayed); pieces that come faster are joined
    and sent when the interval has passed, by a timer on the publisher's loop, so that text
    never waits for the next piece to be flushed. `close` flushes what is left; call it when
    the handler returns or raises. `emit` is `StepContext.emit_delta`: it never raises.
    """

    def __init__(
        self,
        run_public_id: Any,
        step_id: str,
        map_index: int | None,
        attempt: int | None = None,
        interval_s: float = DELTA_INTERVAL_S,
    ) -> None:
        self.run_public_id = run_public_id
        self.step_id = step_id
        self.map_index = map_index
        self.attempt = attempt
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._buffer: list[str] = []
        self._last_flush = float("-inf")
        self._timer_armed = False
        self._closed = False

    def emit(self, text: str) -> None:
        try:
            with self._lock:
                if not text or self._closed:
                    return
                self._buffer.append(text)
                if self._timer_armed:
                    return
                wait = self._last_flush + self.interval_s - time.monotonic()
                if wait <= 0:
                    self._flush_locked()
                    return
                self._timer_armed = True
            _publisher().call_later(wait, self._flush_from_timer)
        except Exception:
            log.warning("delta for step %s dropped", self.step_id, exc_info=True)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            try:
                self._flush_locked()
            except Exception:
                log.warning("last delta for step %s dropped", self.step_id, exc_info=True)

    def _flush_from_timer(self) -> None:
        with self._lock:
            self._timer_armed = False
            if not self._closed:
                try:
                    self._flush_locked()
                except Exception:
                    log.warning("delta for step %s dropped", self.step_id, exc_info=True)

    def _flush_locked(self) -> None:
        if not self._buffer:
            return
        text = "".join(self._buffer)
        self._buffer = []
        self._last_flush = time.monotonic()
        publish_delta(self.run_public_id, self.step_id, self.map_index, text, attempt=self.attempt)


class _LivePublisher:
    """One daemon thread per process with an asyncio loop that owns the channel layer: the
    dashboards' and inboxes' group messages, and the delta coalescers' timers.

    Messages are handed over in a list that the loop drains.
    """

    MAX_PENDING = 10_000
    # Sends in progress at once: each holds a connection of the channel layer's Redis pool
    # (100 by default), which raises rather than waits when a burst asks for more; the rest
    # wait their turn here instead of failing.
    MAX_SENDING = 32

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.pending = 0
        self.lock = threading.Lock()
        self.waiting: list[tuple[str, dict[str, Any]]] = []
        self.drain_scheduled = False
        self.tasks: set[asyncio.Task] = set()
        self.loop = asyncio.new_event_loop()
        self.sending = asyncio.Semaphore(self.MAX_SENDING)
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="live-publisher", daemon=True
        )
        self.thread.start()

    def send(self, group: str, message: dict[str, Any]) -> None:
        with self.lock:
            if self.pending >= self.MAX_PENDING:
                log.warning("live publisher backlog full; dropping a message for %s", group)
                return
            self.pending += 1
            self.waiting.append((group, message))
            if self.drain_scheduled:
                return
            self.drain_scheduled = True
        self.loop.call_soon_threadsafe(self._drain)

    def call_later(self, delay_s: float, callback: Any) -> None:
        """Run `callback` on the publisher's thread after `delay_s` (a timer without a thread)."""
        self.loop.call_soon_threadsafe(self.loop.call_later, delay_s, callback)

    def _drain(self) -> None:
        with self.lock:
            batch, self.waiting = self.waiting, []
            self.drain_scheduled = False
        for group, message in batch:
            task = self.loop.create_task(self._send(group, message))
            self.tasks.add(task)  # the loop keeps only a weak reference
            task.add_done_callback(self.tasks.discard)

    async def _send(self, group: str, message: dict[str, Any]) -> None:
        try:
            layer = get_channel_layer()
            if layer is not None:
                async with self.sending:
                    await layer.group_send(group, message)
        except Exception:
            log.warning("live publish to %s failed", group, exc_info=True)
        finally:
            with self.lock:
                self.pending -= 1


_live: _LivePublisher | None = None
_live_lock = threading.Lock()


def _publisher() -> _LivePublisher:
    global _live
    with _live_lock:
        # A forked child (prefork pool) inherits the object but not the thread: start anew.
        if _live is None or _live.pid != os.getpid():
            _live = _LivePublisher()
        return _live
