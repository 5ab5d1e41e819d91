"""Webhook deliveries: every state change, from the run's end to the last attempt.

Lifecycle of a `WebhookDelivery` (docs/api.md, "7. Webhooks"; retries wait in the database):

1. `webhook_delivery_create`, in the transaction that ends the run: the body is frozen and the
   delivery is due at once.
2. `webhook_delivery_dispatch`, by the scheduler's sweep: a due delivery gets a fresh dispatch
   token and is pushed out by the stale-dispatch time, then the token is published (after
   commit) on the `webhooks` queue. A lost message makes the delivery due again later.
3. `webhook_delivery_claim`, by a worker: a compare-and-set on the token, which also leases the
   delivery for the POST's timeout; a duplicate or stale message is dropped.
4. `webhook_attempt_record`, by the worker: stores the attempt; the delivery succeeds, is
   retried with exponential backoff (`next_attempt_at`), or gives up once the retry window
   since its first attempt has passed. A worker that dies between claim and report leaves a
   claim that the sweep finds after the lease and records as a lost attempt.

No delay ever lives in the broker: the sweep only publishes what is due.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.urls import reverse
from django.utils import timezone

from jobs.events import READY_CHANNEL
from jobs.formats import iso
from jobs.models import (
    WEBHOOK_OPEN,
    Run,
    StepRun,
    WebhookAttempt,
    WebhookDelivery,
    WebhookStatus,
)

log = logging.getLogger(__name__)

LOST_ATTEMPT_ERROR = "lost: the worker delivering this webhook died or hung before it reported"

# What a delivery's transitions write (never the payload, which can be large).
_STATE_FIELDS = [
    "status",
    "attempts",
    "next_attempt_at",
    "dispatch_token",
    "dispatched_at",
    "claimed_at",
    "first_attempt_at",
    "last_attempt_at",
    "last_status_code",
    "last_error",
    "finished_at",
]


@dataclass(frozen=True)
class WebhookDispatch:
    """A message to publish after commit: the delivery's id and its dispatch token."""

    delivery_id: int
    dispatch_token: uuid.UUID


@dataclass(frozen=True)
class WebhookClaim:
    delivery_id: int
    dispatch_token: uuid.UUID
    tenant_id: int
    event_id: uuid.UUID
    event_type: str
    url: str
    payload: str
    attempt: int  # the number this attempt will have


# --- the body --------------------------------------------------------------------------------


def _absolute(path: str) -> str:
    return settings.SWITCHYARD_PUBLIC_URL.rstrip("/") + path


def _step_summary(step: StepRun) -> dict[str, Any]:
    # A step's input and output can be large; they stay one GET away (links.self).
    return {
        "id": step.step_id,
        "map_index": step.map_index,
        "kind": step.kind,
        "status": step.status,
        "attempts": step.attempt,
        "error": step.error or None,
        "started_at": iso(step.started_at),
        "finished_at": iso(step.finished_at),
    }


def webhook_payload(
    run: Run, *, event_id: uuid.UUID, event_type: str, at: datetime
) -> dict[str, Any]:
    """The body of a run's webhook: the event and the run as it ended (see docs/api.md)."""
    version = run.workflow_version
    detail = reverse("api:run-detail", kwargs={"run_id": run.public_id})
    events = reverse("api:run-events", kwargs={"run_id": run.public_id})
    return {
        "id": str(event_id),
        "type": event_type,
        "created_at": at.isoformat(),
        "run": {
            "id": str(run.public_id),
            "workflow": version.workflow.name,
            "version": version.version,
            "status": run.status,
            "lane": run.lane,
            "created_at": iso(run.created_at),
            "started_at": iso(run.started_at),
            "finished_at": iso(run.finished_at),
            "input": run.input,
            "output": run.output,
            "error": run.error or None,
            "steps": [_step_summary(step) for step in run.steps.order_by("id")],
            "links": {"self": _absolute(detail), "events": _absolute(events)},
        },
    }


# --- creation (the run's end) ----------------------------------------------------------------


def webhook_delivery_create(*, run: Run, event_type: str) -> WebhookDelivery | None:
    """Record the delivery of `event_type` for `run`, if the run has a webhook URL.

    Call inside the transaction that ends the run, holding its row lock (`run_locked`): the
    delivery then exists exactly when the end does. Wakes the scheduler on commit.
    """
    if not run.webhook_url:
        return None
    now = timezone.now()
    event_id = uuid.uuid4()
    body = webhook_payload(run, event_id=event_id, event_type=event_type, at=now)
    delivery = WebhookDelivery.objects.create(
        event_id=event_id,
        run=run,
        tenant_id=run.tenant_id,
        event_type=event_type,
        url=run.webhook_url,
        payload=json.dumps(body, separators=(",", ":"), default=str),
        next_attempt_at=now,
    )
    with connection.cursor() as cursor:  # NOTIFY is transactional: heard only on commit
        cursor.execute("SELECT pg_notify(%s, '')", [READY_CHANNEL])
    return delivery


# --- dispatch (the scheduler's sweep) --------------------------------------------------------


def _backoff_s(attempts: int) -> float:
    base = settings.SWITCHYARD_WEBHOOK_BACKOFF_S
    return min(settings.SWITCHYARD_WEBHOOK_MAX_BACKOFF_S, base * 2 ** max(0, attempts - 1))


def _settle_failure(delivery: WebhookDelivery, at: datetime, *, give_up: bool = False) -> None:
    """After a failed attempt: retry later, or give up once the retry window has passed."""
    window = timedelta(seconds=settings.SWITCHYARD_WEBHOOK_RETRY_WINDOW_S)
    first = delivery.first_attempt_at or at
    if give_up or at - first >= window:
        delivery.status = WebhookStatus.GAVE_UP
        delivery.next_attempt_at = None
        delivery.finished_at = at
        return
    delivery.status = WebhookStatus.FAILED
    delivery.next_attempt_at = at + timedelta(seconds=_backoff_s(delivery.attempts))


def _add_attempt(
    delivery: WebhookDelivery,
    *,
    at: datetime,
    status_code: int | None,
    latency_ms: float | None,
    error: str,
    worker: str,
) -> WebhookAttempt:
    """Store one attempt and its summary on the delivery (saved by the caller)."""
    delivery.attempts += 1
    attempt = WebhookAttempt.objects.create(
        delivery=delivery,
        number=delivery.attempts,
        status_code=status_code,
        latency_ms=latency_ms,
        error=error,
        worker=worker,
        at=at,
    )
    delivery.first_attempt_at = delivery.first_attempt_at or at
    delivery.last_attempt_at = at
    delivery.last_status_code = status_code
    delivery.last_error = error
    return attempt


def webhook_delivery_dispatch(*, delivery_id: int) -> WebhookDispatch | None:
    """A due delivery gets a fresh token; None if it is not due (or another sweep has it).

    A delivery that is due while claimed was leased by a worker that never reported: that
    attempt is recorded as lost, and the delivery is due again after its backoff.
    """
    now = timezone.now()
    with transaction.atomic():
        delivery = (
            WebhookDelivery.objects.select_for_update(skip_locked=True)
            .filter(pk=delivery_id, status__in=WEBHOOK_OPEN, next_attempt_at__lte=now)
            .first()
        )
        if delivery is None:
            return None
        if delivery.claimed_at is not None:
            _add_attempt(
                delivery,
                at=now,
                status_code=None,
                latency_ms=None,
                error=LOST_ATTEMPT_ERROR,
                worker="",
            )
            delivery.dispatch_token = delivery.dispatched_at = delivery.claimed_at = None
            _settle_failure(delivery, now)  # due again after its backoff, like any failure
            delivery.save(update_fields=_STATE_FIELDS)
            return None
        token = uuid.uuid4()
        delivery.dispatch_token = token
        delivery.dispatched_at = now
        delivery.claimed_at = None
        # If this message is lost, the delivery is due again after the stale-dispatch time.
        delivery.next_attempt_at = now + timedelta(seconds=settings.SWITCHYARD_DISPATCH_STALE_S)
        delivery.save(update_fields=_STATE_FIELDS)
        return WebhookDispatch(delivery.pk, token)


# --- execution (a worker on the `webhooks` queue) --------------------------------------------


def webhook_delivery_claim(*, delivery_id: int, dispatch_token: str) -> WebhookClaim | None:
    """Lease the delivery for one POST if `dispatch_token` is current; else None (drop)."""
    token = uuid.UUID(str(dispatch_token))
    now = timezone.now()
    lease = settings.SWITCHYARD_WEBHOOK_TIMEOUT_S + settings.SWITCHYARD_LEASE_GRACE_S
    claimed = WebhookDelivery.objects.filter(
        pk=delivery_id, dispatch_token=token, claimed_at__isnull=True, status__in=WEBHOOK_OPEN
    ).update(claimed_at=now, next_attempt_at=now + timedelta(seconds=lease))
    if not claimed:
        return None
    delivery = WebhookDelivery.objects.get(pk=delivery_id)
    return WebhookClaim(
        delivery_id=delivery.pk,
        dispatch_token=token,
        tenant_id=delivery.tenant_id,
        event_id=delivery.event_id,
        event_type=delivery.event_type,
        url=delivery.url,
        payload=delivery.payload,
        attempt=delivery.attempts + 1,
    )


def webhook_attempt_record(
    *,
    claim: WebhookClaim,
    at: datetime,
    status_code: int | None,
    latency_ms: float | None,
    error: str = "",
    refused: bool = False,
    worker: str = "",
) -> WebhookDelivery:
    """Store an attempt and settle the delivery: succeeded (2xx), retry later, or gave up.

    `refused` (the URL is not allowed) gives up at once. An attempt reported under a token that
    is no longer current (the lease ran out and the sweep took over) is stored but changes
    nothing else.
    """
    with transaction.atomic():
        delivery = WebhookDelivery.objects.select_for_update().get(pk=claim.delivery_id)
        _add_attempt(
            delivery,
            at=at,
            status_code=status_code,
            latency_ms=latency_ms,
            error=error,
            worker=worker,
        )
        current = (
            delivery.dispatch_token == claim.dispatch_token
            and delivery.claimed_at is not None
            and delivery.status in WEBHOOK_OPEN
        )
        if not current:
            log.warning("late report of webhook %s attempt ignored", delivery.event_id)
            delivery.save(update_fields=_STATE_FIELDS)
            return delivery
        delivery.dispatch_token = delivery.dispatched_at = delivery.claimed_at = None
        if status_code is not None and 200 <= status_code < 300 and not error:
            delivery.status = WebhookStatus.SUCCEEDED
            delivery.next_attempt_at = None
            delivery.finished_at = at
        else:
            _settle_failure(delivery, at, give_up=refused)
        delivery.save(update_fields=_STATE_FIELDS)
        return delivery


# --- operators ---------------------------------------------------------------------------------


def webhook_delivery_redeliver(*, delivery: WebhookDelivery) -> WebhookDelivery:
    """Deliver again now (same event id and body), with a fresh retry window."""
    with transaction.atomic():
        locked = WebhookDelivery.objects.select_for_update().get(pk=delivery.pk)
        locked.status = WebhookStatus.PENDING
        locked.next_attempt_at = timezone.now()
        locked.first_attempt_at = None
        locked.finished_at = None
        locked.dispatch_token = locked.dispatched_at = locked.claimed_at = None
        locked.save(update_fields=_STATE_FIELDS)
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, '')", [READY_CHANNEL])
        return locked
