"""Request shapes (DRF serializers validate them) and response representations."""

from __future__ import annotations

from typing import Any

from django.urls import reverse
from rest_framework import serializers

from jobs.definitions import NAME_PATTERN
from jobs.events import event_payload
from jobs.formats import iso
from jobs.models import Event, Run, RunStatus, StepRun, WebhookDelivery, WorkflowVersion
from jobs.transcripts import agent_transcripts
from tenants.models import ApiKey, Lane, Scope


class StringsOnly:
    """A text field that takes only JSON strings: DRF's own would read `5` as `"5"`, which the
    schema (`type: string`) does not allow."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StringField(StringsOnly, serializers.CharField):
    pass


class UrlStringField(StringsOnly, serializers.URLField):
    pass


class NoEmptyFilters:
    """A query serializer that refuses a filter given empty (`?workflow=`): DRF would skip it
    and answer as if it had not been given, while the schema says it has a value."""

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        empty = {
            name: ["may not be empty: give a value or leave the parameter out"]
            for name in self.fields
            if name in data and data.get(name) == ""
        }
        if empty:
            raise serializers.ValidationError(empty)
        return super().to_internal_value(data)


class RunSubmitSerializer(serializers.Serializer):
    workflow = StringField(max_length=100)
    version = serializers.IntegerField(min_value=1, required=False)
    input = serializers.DictField(
        required=False, default=dict, help_text="Checked against the workflow's input_schema."
    )
    lane = serializers.ChoiceField(choices=Lane.values, required=False)
    webhook_url = UrlStringField(
        required=False,
        allow_blank=True,
        max_length=2000,
        help_text=(
            "http(s), resolving to a public address: a private, loopback or link-local one is "
            "a 400 forbidden_webhook_url, a host that does not resolve a 400 invalid_webhook_url."
        ),
    )


class ApiKeyCreateSerializer(serializers.Serializer):
    name = StringField(max_length=100)
    scopes = serializers.ListField(
        child=serializers.ChoiceField(choices=Scope.choices),
        required=False,
        default=list,
        max_length=len(Scope.choices),
    )


class DocumentSerializer(serializers.Serializer):
    title = StringField(max_length=300, required=False, allow_blank=True, default="")
    text = StringField(max_length=1_000_000)
    metadata = serializers.DictField(required=False, default=dict)


class DocumentsAddSerializer(serializers.Serializer):
    # A ListField rather than `many=True`: the schema then shows its bounds (minItems, maxItems).
    documents = serializers.ListField(child=DocumentSerializer(), min_length=1, max_length=1000)


class RunListQuerySerializer(NoEmptyFilters, serializers.Serializer):
    status = serializers.ChoiceField(choices=RunStatus.values, required=False)
    workflow = serializers.RegexField(NAME_PATTERN, required=False, max_length=100)
    lane = serializers.ChoiceField(choices=Lane.values, required=False)
    limit = serializers.IntegerField(
        min_value=1, max_value=200, required=False, help_text="Page size (50 if not given)."
    )
    cursor = serializers.CharField(required=False, help_text="From `next` or `previous`.")


class WorkflowQuerySerializer(NoEmptyFilters, serializers.Serializer):
    version = serializers.IntegerField(
        min_value=1, required=False, help_text="A version number (default: the latest)."
    )


def version_repr(version: WorkflowVersion) -> dict[str, Any]:
    return {
        "name": version.workflow.name,
        "version": version.version,
        "definition": version.definition,
        "created_at": version.created_at.isoformat(),
    }


def run_links(run: Run, request) -> dict[str, str]:
    path = reverse("api:run-detail", kwargs={"run_id": run.public_id})
    events = reverse("api:run-events", kwargs={"run_id": run.public_id})
    return {
        "self": request.build_absolute_uri(path),
        "events": request.build_absolute_uri(events),
        # The events URL streams (SSE) when asked with Accept: text/event-stream.
        "stream": request.build_absolute_uri(events),
    }


def run_summary(run: Run, request) -> dict[str, Any]:
    return {
        "id": str(run.public_id),
        "workflow": run.workflow_version.workflow.name,
        "version": run.workflow_version.version,
        "status": run.status,
        "lane": run.lane,
        "created_at": run.created_at.isoformat(),
        "started_at": run.started_at.isoformat() if run.started_at else None,
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "links": run_links(run, request),
    }


def _step_repr(step: StepRun) -> dict[str, Any]:
    return {
        "id": step.step_id,
        "map_index": step.map_index,
        "kind": step.kind,
        "status": step.status,
        "attempts": step.attempt,
        "input": step.input,
        "output": step.output,
        "error": step.error or None,
        "ready_at": step.ready_at.isoformat() if step.ready_at else None,
        "started_at": step.started_at.isoformat() if step.started_at else None,
        "finished_at": step.finished_at.isoformat() if step.finished_at else None,
        "attempt_history": [
            {
                "number": attempt.number,
                "outcome": attempt.outcome,
                "error": attempt.error or None,
                "worker": attempt.worker,
                "duration_ms": attempt.duration_ms,
            }
            for attempt in step.attempts.all()
        ],
    }


def _webhook_repr(run: Run) -> dict[str, Any] | None:
    """The run's webhook: its latest delivery (a retried run that ends again has several)."""
    if not run.webhook_url:
        return None
    # Only the run's own events: approval requests notify the tenant's approval webhook.
    deliveries: list[WebhookDelivery] = [
        d for d in run.webhook_deliveries.all() if d.event_type.startswith("run.")
    ]
    latest = deliveries[0] if deliveries else None
    return {
        "url": run.webhook_url,
        "status": latest.status if latest else None,
        "event_id": str(latest.event_id) if latest else None,
        "event": latest.event_type if latest else None,
        "next_attempt_at": iso(latest.next_attempt_at) if latest else None,
        "attempts": [
            {
                "number": attempt.number,
                "status_code": attempt.status_code,
                "latency_ms": attempt.latency_ms,
                "error": attempt.error or None,
                "at": attempt.at.isoformat(),
            }
            for attempt in (latest.attempt_log.all() if latest else [])
        ],
    }


def run_detail(run: Run, request) -> dict[str, Any]:
    body = run_summary(run, request)
    body.update(
        {
            "input": run.input,
            "output": run.output,
            "error": run.error or None,
            "steps": [_step_repr(step) for step in run.steps.all()],
            "webhook": _webhook_repr(run),
        }
    )
    transcripts = agent_transcripts(run.steps.all())
    if transcripts:
        body["agents"] = transcripts
    if run.parent_step_id:
        body["parent_run"] = str(run.parent_step.run.public_id)
    return body


def event_repr(event: Event, run: Run) -> dict[str, Any]:
    return event_payload(event, run.public_id)


def api_key_repr(api_key: ApiKey) -> dict[str, Any]:
    return {
        "id": str(api_key.public_id),
        "name": api_key.name,
        "prefix": api_key.prefix,
        "scopes": list(api_key.scopes or []),
        "created_at": api_key.created_at.isoformat(),
        "last_used_at": iso(api_key.last_used_at),
        "revoked_at": iso(api_key.revoked_at),
    }
