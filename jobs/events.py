"""The run log and its live publication.

Every state change of a run appends an `Event` in the same transaction, under the run's row
lock, so that sequence numbers are gapless per run (DESIGN §3.3). After the transaction
commits, the new events go to the run's channel-layer group in one message; live views are
projections of the database that resync by `seq`, so a message the channel layer drops costs
nothing but latency. Only this module knows the group names.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any

from channels.layers import get_channel_layer
from django.db import connection, transaction

from jobs.models import Event, Run, StepRun

log = logging.getLogger(__name__)

READY_CHANNEL = "switchyard_ready"


def run_group(run_public_id: Any) -> str:
    return f"run.{run_public_id}"


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
    """Collects the events of one transaction on one run; `flush` writes them.

    Create it only inside a transaction that holds the run's row lock (`services.run_locked`).
    """

    def __init__(self, run: Run):
        self.run = run
        self._pending: list[Event] = []
        self._wake_scheduler = False

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

    def wake_scheduler(self) -> None:
        self._wake_scheduler = True

    def flush(self) -> None:
        if self._wake_scheduler:
            # NOTIFY is transactional: the scheduler hears it only if this commits.
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_notify(%s, '')", [READY_CHANNEL])
            self._wake_scheduler = False
        if not self._pending:
            return
        events = Event.objects.bulk_create(self._pending)
        self.run.next_seq += len(events)
        Run.objects.filter(pk=self.run.pk).update(next_seq=self.run.next_seq)
        self._pending = []
        public_id = self.run.public_id
        payloads = [event_payload(event, public_id) for event in events]
        transaction.on_commit(lambda: publish_live(public_id, payloads))


def publish_live(run_public_id: Any, payloads: list[dict[str, Any]]) -> None:
    """Send committed events to live subscribers, without waiting. Never raises.

    The send happens on this process's publisher thread: `async_to_sync` from a worker thread
    would build an event loop and a Redis connection per call, several milliseconds on every
    step transition. The log in PostgreSQL is the truth; a dropped live message costs a
    subscriber only a resync.
    """
    _publisher().send(run_group(run_public_id), {"type": "run.events", "events": payloads})


class _LivePublisher:
    """One daemon thread per process with an asyncio loop that owns the channel layer."""

    MAX_PENDING = 10_000

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.pending = 0
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
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
        asyncio.run_coroutine_threadsafe(self._send(group, message), self.loop)

    async def _send(self, group: str, message: dict[str, Any]) -> None:
        try:
            layer = get_channel_layer()
            if layer is not None:
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
