"""Events that start workflows (`POST /api/v1/events/`, docs/schedules.md).

A tenant sends `{"name", "data", "id"?}`; every workflow of that tenant whose latest version
has a trigger for that name, and whose trigger's `when` holds for the event, gets one run.
An event id is received at most once per tenant within the idempotency window
(SWITCHYARD_IDEMPOTENCY_TTL_S): a repeat is answered with the first receipt's runs. The event,
its runs and their submissions commit together, serialised per (tenant, event id) by an
advisory lock; each run also carries the idempotency key `event:<id>:<workflow>`. A refusal by a
quota or backpressure stores nothing, so the sender's retry with the same id is safe.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F, OuterRef, Subquery

from jobs import templating
from jobs.models import Run, WorkflowVersion
from jobs.services.submission import Backpressure, request_fingerprint, run_submit
from jobs.templating import TemplateError
from jobs.transitions.runs import RunError
from jobs.transitions.txn import definition_of
from schedules.models import TriggerEvent
from tenants.models import ApiKey, Tenant

# An event id fits a run's idempotency key with any workflow name: `event:<id>:<name>`.
MAX_EVENT_ID = 128


@dataclass(frozen=True)
class Skipped:
    workflow: str
    reason: str


@dataclass(frozen=True)
class Receipt:
    event: TriggerEvent
    runs: list[Run]
    # Subscribed workflows that did not start: their `when` was false, or the input failed.
    skipped: list[Skipped]
    duplicate: bool  # the event id was received before, within the window


def event_receive(
    *,
    tenant: Tenant,
    name: str,
    data: Any,
    event_id: str = "",
    api_key: ApiKey | None = None,
    now: datetime,
) -> Receipt:
    """Store the event and start each subscribed workflow whose `when` holds, once per id.

    Raises Backpressure (nothing stored: retry later with the same id) or RunError.
    `event_id`: at most MAX_EVENT_ID characters.
    """
    event_id = event_id or str(uuid.uuid4())
    if len(event_id) > MAX_EVENT_ID:
        raise RunError(f"an event id has at most {MAX_EVENT_ID} characters", code="invalid_id")
    since = now - timedelta(seconds=settings.SWITCHYARD_IDEMPOTENCY_TTL_S)
    with transaction.atomic():
        _lock(tenant, event_id)
        earlier = (
            TriggerEvent.objects.filter(tenant=tenant, event_id=event_id, created_at__gte=since)
            .order_by("-created_at")
            .first()
        )
        if earlier is not None:
            return Receipt(earlier, list(earlier.runs.order_by("created_at")), [], True)
        event = TriggerEvent.objects.create(
            tenant=tenant, name=name, event_id=event_id, data=data, api_key=api_key
        )
        context = {"event": {"name": name, "data": data, "id": event_id}}
        runs, skipped = [], []
        for version in subscribed_versions(tenant=tenant, name=name):
            workflow = version.workflow.name
            outcome = _start(tenant, version, event, context)
            if isinstance(outcome, Run):
                runs.append(outcome)
            else:
                skipped.append(Skipped(workflow, outcome))
        event.runs.set(runs)
    return Receipt(event, runs, skipped, False)


def subscribed_versions(*, tenant: Tenant, name: str) -> list[WorkflowVersion]:
    """The latest version of each of the tenant's workflows that has a trigger for `name`."""
    latest = (
        WorkflowVersion.objects.filter(workflow=OuterRef("workflow"))
        .order_by("-version")
        .values("version")[:1]
    )
    return list(
        WorkflowVersion.objects.filter(
            workflow__tenant=tenant, definition__triggers__contains=[{"event": name}]
        )
        .annotate(latest=Subquery(latest))
        .filter(version=F("latest"))
        .select_related("workflow")
        .order_by("workflow__name")
    )


def _start(tenant: Tenant, version: WorkflowVersion, event: TriggerEvent, context) -> Run | str:
    """The run of one subscribed workflow, or why it did not start."""
    definition = definition_of(version)
    reasons = []
    for trigger in definition.triggers:
        if trigger.event != event.name:
            continue
        try:
            if trigger.when and not templating.evaluate(trigger.when, context):
                reasons.append(f"when {trigger.when!r} is false")
                continue
            run_input = (
                event.data if trigger.input is None else templating.render(trigger.input, context)
            )
        except TemplateError as exc:
            reasons.append(f"template error: {exc}")
            continue
        workflow = version.workflow.name
        try:
            with transaction.atomic():
                submission = run_submit(
                    tenant=tenant,
                    version=version,
                    input=run_input if isinstance(run_input, dict) else {"value": run_input},
                    idempotency_key=f"event:{event.event_id}:{workflow}",
                    request_hash=request_fingerprint({"event": event.event_id, "to": workflow}),
                )
        except Backpressure:
            raise  # the whole event is refused: nothing of it is stored
        except RunError as exc:
            reasons.append(f"{exc.code}: {exc.message}")
            continue
        return submission.run
    return "; ".join(reasons)


def _lock(tenant: Tenant, event_id: str) -> None:
    digest = hashlib.sha256(f"event:{tenant.pk}:{event_id}".encode()).digest()
    key = int.from_bytes(digest[:8], "big", signed=True)
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [key])
