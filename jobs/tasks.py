"""Celery tasks: thin wrappers that take ids and call one service.

Step tasks store no result (result tables would bloat) and rely on the broker settings
in `orchestrator.settings`: acks late, reject on worker lost, prefetch 1, except the steps
too long to hold a delivery for (`execute_step_unheld`). No task is ever published with an
ETA or countdown: retry delays live in the database.
"""

from __future__ import annotations

import os

from celery import shared_task

from jobs.dispatch import DELIVER_WEBHOOK, EXECUTE_STEP, EXECUTE_STEP_UNHELD
from jobs.execution import step_execute
from jobs.webhooks import webhook_deliver


@shared_task(
    name=EXECUTE_STEP,
    ignore_result=True,
    acks_late=True,
    reject_on_worker_lost=True,
)
def execute_step(step_run_id: int, dispatch_token: str) -> None:
    worker = f"{execute_step.request.hostname}/{os.getpid()}"
    step_execute(step_run_id=step_run_id, dispatch_token=dispatch_token, worker=worker)


@shared_task(
    name=EXECUTE_STEP_UNHELD,
    ignore_result=True,
    acks_late=False,
    Request="jobs.worker_credit:UnheldRequest",
)
def execute_step_unheld(step_run_id: int, dispatch_token: str) -> None:
    """`execute_step` for a step that may run longer than RabbitMQ lets a delivery go
    unacknowledged (consumer_timeout): the message is acknowledged when the worker starts it.

    Nothing is lost by that: a worker that dies before its claim commits leaves the step
    `queued`, which the stale-dispatch sweep re-publishes; one that dies after it leaves the
    step `running` until its lease expires. Only the redelivery shortcut is given up. The
    worker keeps the slot's prefetch credit while the step runs (`jobs.worker_credit`).
    """
    worker = f"{execute_step_unheld.request.hostname}/{os.getpid()}"
    step_execute(step_run_id=step_run_id, dispatch_token=dispatch_token, worker=worker)


@shared_task(
    name=DELIVER_WEBHOOK,
    ignore_result=True,
    acks_late=True,
    reject_on_worker_lost=True,
)
def deliver_webhook(delivery_id: int, dispatch_token: str) -> None:
    """One POST of a webhook delivery (queue `webhooks`); retries are the scheduler's."""
    worker = f"{deliver_webhook.request.hostname}/{os.getpid()}"
    webhook_deliver(delivery_id=delivery_id, dispatch_token=dispatch_token, worker=worker)
