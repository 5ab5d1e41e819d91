"""Webhooks on the wire: the signature, the scheduler's sweep, and one POST by a worker.

A run's end creates a `WebhookDelivery` (`jobs.services.webhooks`). Each scheduler cycle calls
`webhooks_dispatch_due()`, which publishes the due deliveries (id + dispatch token, after
commit, confirmed) on the `webhooks` queue, keeping that queue shallow. A worker of that queue
runs `webhook_deliver()`: claim, check the URL again, POST the frozen body signed with the
tenant's secret, record the attempt.

Signature (documented in docs/api.md with a verification snippet):

    Switchyard-Signature: v1=<hex HMAC-SHA256(secret, f"{timestamp}.{body}")>

where `timestamp` is the `Switchyard-Timestamp` header (Unix seconds) and `secret` is the
tenant's whole secret string (`whsec_...`) as UTF-8. The header may carry several
comma-separated `v1=` values; a receiver accepts the body if any of them matches.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time

import httpx
from django.conf import settings
from django.utils import timezone

from jobs.dispatch import DELIVER_WEBHOOK
from jobs.models import WEBHOOK_OPEN, WebhookDelivery
from jobs.services.webhooks import (
    WebhookClaim,
    WebhookDispatch,
    webhook_attempt_record,
    webhook_delivery_claim,
    webhook_delivery_dispatch,
)
from jobs.steps.netguard import ForbiddenURL, check_outbound_url, guarded_client, redact_url
from orchestrator.celery import app
from orchestrator.encryption import DecryptionError
from orchestrator.queues import broker_queue
from tenants.services import tenant_webhook_secret_ensure

log = logging.getLogger(__name__)

QUEUE = "webhooks"
USER_AGENT = "Switchyard-Webhooks/1"
# What we keep of a receiver's answer to explain a failure.
_RESPONSE_EXCERPT_BYTES = 512


def webhook_signature(secret: str, timestamp: int, body: str) -> str:
    """`v1=<hex>`: HMAC-SHA256 under `secret` of `"{timestamp}.{body}"`."""
    message = f"{timestamp}.{body}".encode()
    return "v1=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def webhook_headers(*, secret: str, event_id: str, timestamp: int, body: str) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "Switchyard-Event-Id": event_id,
        "Switchyard-Timestamp": str(timestamp),
        "Switchyard-Signature": webhook_signature(secret, timestamp, body),
    }


# --- the sweep (scheduler) -------------------------------------------------------------------


def _queue_room() -> int:
    """How many more deliveries may wait in the broker: dispatched, unclaimed, not stale."""
    in_flight = WebhookDelivery.objects.filter(
        status__in=WEBHOOK_OPEN,
        dispatched_at__isnull=False,
        claimed_at__isnull=True,
        next_attempt_at__gt=timezone.now(),
    ).count()
    return max(0, settings.SWITCHYARD_QUEUE_MAX_QUEUED - in_flight)


def webhooks_dispatch_due() -> int:
    """Publish the deliveries that are due (first attempts, retries, lost messages).

    Called once per scheduler cycle; safe in several schedulers at once (each dispatch is a
    compare-and-set). Returns how many were published. A broker that is down leaves the
    deliveries dispatched; they are due again after the stale-dispatch time.
    """
    room = min(_queue_room(), settings.SWITCHYARD_SCHEDULER_BATCH)
    if room == 0:
        return 0
    due = (
        WebhookDelivery.objects.filter(status__in=WEBHOOK_OPEN, next_attempt_at__lte=timezone.now())
        .order_by("next_attempt_at")
        .values_list("id", flat=True)[:room]
    )
    dispatches = [
        dispatch
        for delivery_id in list(due)
        if (dispatch := webhook_delivery_dispatch(delivery_id=delivery_id)) is not None
    ]
    return _publish(dispatches)


def _publish(dispatches: list[WebhookDispatch]) -> int:
    if not dispatches:
        return 0
    published = 0
    queue = broker_queue(QUEUE, settings.SWITCHYARD_QUEUE_PREFIX)
    try:
        with app.producer_or_acquire() as producer:
            for dispatch in dispatches:
                app.send_task(
                    DELIVER_WEBHOOK,
                    args=[dispatch.delivery_id, str(dispatch.dispatch_token)],
                    queue=queue,
                    producer=producer,
                    ignore_result=True,
                )
                published += 1
    except Exception:
        log.warning(
            "broker unavailable; %d webhook dispatches left for the next sweep",
            len(dispatches) - published,
            exc_info=True,
        )
    return published


# --- one delivery attempt (worker) -----------------------------------------------------------


def webhook_deliver(*, delivery_id: int, dispatch_token: str, worker: str) -> None:
    """Claim the delivery, POST it once, record the attempt."""
    claim = webhook_delivery_claim(delivery_id=delivery_id, dispatch_token=dispatch_token)
    if claim is None:
        log.info("dropped stale webhook message for delivery %s", delivery_id)
        return
    status_code, latency_ms, error, refused = _post(claim)
    delivery = webhook_attempt_record(
        claim=claim,
        at=timezone.now(),
        status_code=status_code,
        latency_ms=latency_ms,
        error=error,
        refused=refused,
        worker=worker,
    )
    log.info(
        "webhook %s %s attempt %d to %s: %s",
        claim.event_type,
        claim.event_id,
        claim.attempt,
        redact_url(claim.url),
        delivery.status if not error else f"{delivery.status} ({error})",
    )


def _post(claim: WebhookClaim) -> tuple[int | None, float | None, str, bool]:
    """(status code, latency ms, error, refused by policy) of one POST."""
    try:
        check_outbound_url(claim.url)
    except ForbiddenURL as exc:
        return None, None, str(exc), True
    except OSError as exc:
        return None, None, f"cannot resolve the host of {redact_url(claim.url)}: {exc}", False
    try:
        secret = tenant_webhook_secret_ensure(tenant_id=claim.tenant_id)
    except DecryptionError as exc:  # a changed SWITCHYARD_ENCRYPTION_KEY: fixable, so retried
        return None, None, str(exc), False
    headers = webhook_headers(
        secret=secret,
        event_id=str(claim.event_id),
        timestamp=int(time.time()),
        body=claim.payload,
    )
    started = time.monotonic()
    try:
        with (
            guarded_client(timeout=settings.SWITCHYARD_WEBHOOK_TIMEOUT_S) as client,
            client.stream("POST", claim.url, content=claim.payload.encode(), headers=headers) as r,
        ):
            excerpt = _excerpt(r)
            latency_ms = round((time.monotonic() - started) * 1000, 1)
    except ForbiddenURL as exc:  # the address changed since the check (rebinding)
        return None, None, str(exc), True
    except httpx.HTTPError as exc:
        latency_ms = round((time.monotonic() - started) * 1000, 1)
        return None, latency_ms, f"{type(exc).__name__}: {exc or 'no detail'}", False
    if 200 <= r.status_code < 300:
        return r.status_code, latency_ms, "", False
    return r.status_code, latency_ms, f"HTTP {r.status_code}: {excerpt}".rstrip(": "), False


def _excerpt(response: httpx.Response) -> str:
    """The start of a response body (never more than a few hundred bytes are read)."""
    if 200 <= response.status_code < 300:
        return ""
    read = b""
    for chunk in response.iter_bytes():
        read += chunk
        if len(read) >= _RESPONSE_EXCERPT_BYTES:
            break
    return read[:_RESPONSE_EXCERPT_BYTES].decode(errors="replace").strip()
