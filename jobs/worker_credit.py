"""A worker gives back the prefetch credit of the steps it runs unheld.

A worker takes one message per free slot (prefetch = concurrency). A step that may outlast
RabbitMQ's `consumer_timeout` runs unheld (`jobs.tasks.execute_step_unheld`): its message is
acknowledged when it starts, which frees its credit although its slot stays busy, so
RabbitMQ would hand the worker another message that has to wait for a slot. A held message
that waits longer than `consumer_timeout` gets the worker's channel closed, and with it every
delivery the worker holds (their steps run again elsewhere).

So the worker lowers its prefetch by one for every unheld step it runs, before that step's
message is acknowledged, and raises it again when the step ends. With every slot running an
unheld step the prefetch would be zero, which AMQP reads as "unlimited": the worker cancels
its queue consumers instead and consumes again when a slot frees. Held messages therefore
reach a worker only when a slot is free to start them.

Everything that touches the broker connection runs on the consumer's event-loop thread: a
threads pool accepts and finishes tasks on its own threads, and hands the work to the loop
(`Hub.call_soon` wakes it). The count of unheld steps is read from Celery's own record of
the requests in progress, reconciled on every change and on a short timer (a finished step
gives its slot back within `RECONCILE_S`).
"""

from __future__ import annotations

import logging
import threading

from celery import bootsteps
from celery.worker.request import Request
from celery.worker.state import active_requests

from jobs.dispatch import EXECUTE_STEP_UNHELD

log = logging.getLogger(__name__)

RECONCILE_S = 0.25


class _Credit:
    """The prefetch of one worker process's task consumer, less its unheld steps."""

    def __init__(self) -> None:
        self.consumer = None
        self.cancelled: list = []  # the queues whose consumers are cancelled (no credit left)
        self.applied: int | None = None

    def attach(self, consumer) -> None:
        self.consumer, self.cancelled, self.applied = consumer, [], None
        self.reconcile()

    def on_loop(self, fn) -> None:
        """Run `fn` on the consumer's event loop: at once when called from it."""
        consumer = self.consumer
        hub = getattr(consumer, "hub", None)
        if hub is None or threading.get_ident() == getattr(hub, "_loop_thread", None):
            fn()
        else:
            hub.call_soon(fn)

    def reconcile(self, starting: int = 0) -> None:
        """Set the credit to the free slots; `starting` unheld steps are about to start.

        Runs on the loop thread (or before the loop starts)."""
        consumer = self.consumer
        if consumer is None or consumer.qos is None or consumer.task_consumer is None:
            return
        slots = consumer.initial_prefetch_count
        if not slots:
            return  # prefetch disabled: nothing to give back
        free = slots - _unheld_in_progress() - starting
        if free == self.applied:
            return
        self.applied = free
        if free <= 0:
            self._cancel()
            return
        with consumer.qos._mutex:
            consumer.qos.value = free
            consumer.qos.update()
        self._resume()

    def _cancel(self) -> None:
        task_consumer = self.consumer.task_consumer
        if self.cancelled:
            return
        self.cancelled = list(task_consumer.queues)
        for queue in self.cancelled:
            task_consumer.cancel_by_queue(queue.name)
        log.info("every slot runs an unheld step: consuming nothing until one ends")

    def _resume(self) -> None:
        if not self.cancelled:
            return
        task_consumer = self.consumer.task_consumer
        for queue in self.cancelled:
            task_consumer.add_queue(queue)
        self.cancelled = []
        task_consumer.consume()
        log.info("a slot is free again: consuming")


credit = _Credit()


def _unheld_in_progress() -> int:
    """Unheld steps this process has accepted and not finished (Celery's own record)."""
    for _ in range(3):
        try:
            requests = list(active_requests)
            return sum(1 for request in requests if request.name == EXECUTE_STEP_UNHELD)
        except RuntimeError:  # the set changed while being copied (a pool thread finished)
            continue
    return 0


class UnheldRequest(Request):
    """The request of an unheld step: its credit is taken back before its acknowledgement."""

    def on_accepted(self, pid, time_accepted):
        accept = super().on_accepted  # records it as active and acknowledges the message

        def take_then_acknowledge() -> None:
            credit.reconcile(starting=1)
            accept(pid, time_accepted)

        credit.on_loop(take_then_acknowledge)

    def on_failure(self, exc_info, send_failed_event=True, return_ok=False):
        try:
            return super().on_failure(exc_info, send_failed_event, return_ok)
        finally:
            credit.on_loop(credit.reconcile)


class UnheldCredit(bootsteps.StartStopStep):
    """Consumer bootstep: keeps `credit` attached to the current task consumer."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c, **kwargs):
        super().__init__(c, **kwargs)
        self.tref = None

    def start(self, c):
        credit.attach(c)
        # A finished unheld step (Celery's on_success is not overridable) gives its slot back
        # on the next tick.
        self.tref = c.timer.call_repeatedly(RECONCILE_S, credit.reconcile)

    def stop(self, c):
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    def shutdown(self, c):
        self.stop(c)
        credit.consumer = None
