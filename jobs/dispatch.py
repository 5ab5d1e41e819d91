"""Publishing step messages to RabbitMQ: confirmed, persistent, after the admitting commit.

The scheduler publishes its batches itself (`publish`). A transaction that admits steps
directly (`switchyard_run_apply`: a worker's report, a submission) hands them to
`publish_after_commit`, whose messages a background thread of the process publishes, so that
no request or worker thread ever waits on the broker (a memory alarm blocks publishers until
it clears). A message that is never published (the broker is down, the process dies first)
leaves its step `queued`: the scheduler's stale-dispatch sweep publishes it again under a new
token (`SWITCHYARD_DISPATCH_STALE_S`), as after a scheduler crash between commit and publish.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass

from django.conf import settings
from django.db import transaction

from orchestrator.celery import app
from orchestrator.queues import broker_queue
from tenants.models import LANE_PRIORITY

# Step tasks are published by name (`jobs.tasks` registers them under these names): the
# publishers never import the module of the tasks that run steps.
EXECUTE_STEP = "jobs.execute_step"
EXECUTE_STEP_UNHELD = "jobs.execute_step_unheld"
DELIVER_WEBHOOK = "jobs.deliver_webhook"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dispatch:
    """A message to publish after commit: the step's id, token, queue and AMQP priority.

    `lease_s` is how long an attempt may hold a worker (timeout + grace): a step that may
    outlast RabbitMQ's consumer_timeout is published as a task that does not hold its delivery.
    """

    step_run_id: int
    dispatch_token: object  # uuid.UUID
    queue: str
    lane: str
    lease_s: float = 0.0
    tenant_id: int = 0

    @classmethod
    def of(cls, step) -> Dispatch:
        """The message for an admitted step (its `dispatch_token` set by the admission)."""
        lease_s = step.timeout_s + settings.SWITCHYARD_LEASE_GRACE_S
        return cls(step.pk, step.dispatch_token, step.queue, step.lane, lease_s, step.tenant_id)


def unheld_timeout_above_s() -> float:
    """Steps with a `timeout_s` above this are published unheld (`publish`): their lease,
    timeout + grace, passes `SWITCHYARD_HELD_DELIVERY_MAX_S`. Admission counts them apart."""
    return settings.SWITCHYARD_HELD_DELIVERY_MAX_S - settings.SWITCHYARD_LEASE_GRACE_S


def publish(dispatches: list[Dispatch]) -> tuple[int, int]:
    """Publish step messages (confirmed, persistent). Returns (published, failed).

    A failed publish leaves the step `queued`; the stale-dispatch sweep re-publishes it.
    """
    if not dispatches:
        return 0, 0
    published = failed = 0
    prefix = settings.SWITCHYARD_QUEUE_PREFIX
    try:
        with app.producer_or_acquire() as producer:
            for dispatch in dispatches:
                # A step that may outlast RabbitMQ's consumer_timeout must not hold its
                # delivery: the broker would close the worker's channel.
                held = dispatch.lease_s <= settings.SWITCHYARD_HELD_DELIVERY_MAX_S
                try:
                    app.send_task(
                        EXECUTE_STEP if held else EXECUTE_STEP_UNHELD,
                        args=[dispatch.step_run_id, str(dispatch.dispatch_token)],
                        queue=broker_queue(dispatch.queue, prefix),
                        priority=LANE_PRIORITY[dispatch.lane],
                        producer=producer,
                        ignore_result=True,
                    )
                    published += 1
                except Exception:
                    failed += 1
                    log.warning(
                        "publish failed for step run %s", dispatch.step_run_id, exc_info=True
                    )
    except Exception:
        log.warning(
            "broker unavailable; %d dispatches left for the stale sweep",
            len(dispatches) - published,
            exc_info=True,
        )
        failed = len(dispatches) - published
    return published, failed


class _Publisher:
    """One daemon thread per process publishing what committed transactions admitted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = 0
        self._queue: queue.SimpleQueue[list[Dispatch]] = queue.SimpleQueue()

    def submit(self, dispatches: list[Dispatch]) -> None:
        with self._lock:
            if self._pid != os.getpid():  # first use, or a forked child (prefork pools)
                self._queue = queue.SimpleQueue()
                threading.Thread(target=self._run, name="step-publisher", daemon=True).start()
                self._pid = os.getpid()
        self._queue.put(dispatches)

    def _run(self) -> None:
        pending = self._queue
        while True:
            batch = pending.get()
            while True:  # whatever else is waiting goes in the same producer session
                try:
                    batch = batch + pending.get_nowait()
                except queue.Empty:
                    break
            publish(batch)


_publisher = _Publisher()


def publish_after_commit(dispatches: list[Dispatch]) -> None:
    """Publish `dispatches` once the current transaction commits (nothing if it rolls back)."""
    if dispatches:
        transaction.on_commit(lambda: _publisher.submit(dispatches))
