"""The OpenAPI description of the client API (drf-spectacular): response shapes, the error
envelope, the API-key security scheme and the reusable error responses.

These serializers only describe what the views return (the views build plain dicts through
`jobs.api.serializers`); a test runs Schemathesis against the schema to keep the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse
from rest_framework import serializers

from jobs.models import AttemptOutcome, RunStatus, StepStatus, WebhookStatus
from tenants.models import Lane, Scope


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "tenants.auth.ApiKeyAuthentication"
    name = "ApiKey"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "sy_<prefix>_<secret>",
            "description": "A tenant's API key: `Authorization: Bearer sy_...`.",
        }


# --- the error envelope ----------------------------------------------------------------------


class ErrorBodySerializer(serializers.Serializer):
    code = serializers.CharField(help_text="Stable machine-readable code, e.g. `not_found`.")
    message = serializers.CharField(help_text="What went wrong, for people.")
    details = serializers.JSONField(
        required=False,
        help_text="Optional: for validation errors a list of `{path, message}` faults.",
    )


class ErrorSerializer(serializers.Serializer):
    error = ErrorBodySerializer()


_ERROR_DESCRIPTIONS = {
    400: "The request is invalid; `details` lists each fault with its path.",
    401: "No API key, or an unknown or revoked one.",
    403: "The API key lacks the scope this operation needs.",
    404: "Not found (another tenant's object is a 404 too).",
    409: "Conflict with the object's state, or an Idempotency-Key reused with another body.",
    413: "The request body is over SWITCHYARD_API_MAX_BODY_BYTES.",
    429: "The tenant's queued-run quota (max_queued_runs) is full; see `Retry-After`.",
    503: (
        "Nothing was recorded; retry after `Retry-After`: the database is unavailable "
        "(`database_unavailable`, any operation) or, for submissions, the platform's backlog "
        "is over its limit (`platform_backlog_full`)."
    ),
}


def errors(*codes: int) -> dict[int, OpenApiResponse]:
    """Error responses in the envelope: 401 and 503 (no database connection) always, plus
    `codes`."""
    return {
        code: OpenApiResponse(ErrorSerializer, description=_ERROR_DESCRIPTIONS[code])
        for code in sorted({401, 503, *codes})
    }


# --- parameters ------------------------------------------------------------------------------

RUN_ID = OpenApiParameter("run_id", OpenApiTypes.UUID, OpenApiParameter.PATH)
KEY_ID = OpenApiParameter("key_id", OpenApiTypes.UUID, OpenApiParameter.PATH)
WORKFLOW_NAME = OpenApiParameter("name", OpenApiTypes.STR, OpenApiParameter.PATH)
IDEMPOTENCY_KEY = OpenApiParameter(
    "Idempotency-Key",
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    description=(
        "Optional, at most 255 characters. The same key with the same body within 24 h "
        "returns the original run; with another body it is a 409."
    ),
)


class WaitQuery(serializers.Serializer):
    wait = serializers.FloatField(
        min_value=0,
        max_value=60,
        required=False,
        help_text=(
            "Wait up to this many seconds (at most SWITCHYARD_API_MAX_WAIT_S, 60 by default) "
            "for the run to end; the wait holds no server thread."
        ),
    )


LAST_EVENT_ID = OpenApiParameter(
    "Last-Event-ID",
    {"type": "integer", "minimum": 0},
    OpenApiParameter.HEADER,
    description=(
        "Resume after this seq (EventSource sends it on reconnection); takes precedence over "
        "`?after=`, for the JSON log and the stream alike."
    ),
)


# --- workflows -------------------------------------------------------------------------------


class WorkflowVersionOut(serializers.Serializer):
    name = serializers.CharField()
    version = serializers.IntegerField()
    definition = serializers.DictField(help_text="The workflow definition as stored.")
    created_at = serializers.DateTimeField()


class WorkflowSummaryOut(serializers.Serializer):
    name = serializers.CharField()
    latest_version = serializers.IntegerField()
    created_at = serializers.DateTimeField()


class WorkflowListOut(serializers.Serializer):
    workflows = WorkflowSummaryOut(many=True)


# --- runs ------------------------------------------------------------------------------------


class RunLinksOut(serializers.Serializer):
    self = serializers.URLField()
    events = serializers.URLField()
    stream = serializers.URLField(help_text="The events URL; streams with text/event-stream.")


class RunAcceptedOut(serializers.Serializer):
    id = serializers.UUIDField()
    status = serializers.ChoiceField(choices=RunStatus.choices)
    links = RunLinksOut()


class RunSummaryOut(serializers.Serializer):
    id = serializers.UUIDField()
    workflow = serializers.CharField()
    version = serializers.IntegerField()
    status = serializers.ChoiceField(choices=RunStatus.choices)
    lane = serializers.ChoiceField(choices=Lane.choices)
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    links = RunLinksOut()


class RunListOut(serializers.Serializer):
    runs = RunSummaryOut(many=True)
    next = serializers.URLField(allow_null=True)
    previous = serializers.URLField(allow_null=True)


class StepAttemptOut(serializers.Serializer):
    number = serializers.IntegerField()
    outcome = serializers.ChoiceField(choices=AttemptOutcome.choices)
    error = serializers.CharField(allow_null=True)
    worker = serializers.CharField(allow_blank=True)
    duration_ms = serializers.FloatField(allow_null=True)


class StepOut(serializers.Serializer):
    id = serializers.CharField()
    map_index = serializers.IntegerField(allow_null=True)
    kind = serializers.CharField()
    status = serializers.ChoiceField(choices=StepStatus.choices)
    attempts = serializers.IntegerField()
    input = serializers.JSONField(allow_null=True)
    output = serializers.JSONField(allow_null=True)
    error = serializers.CharField(allow_null=True)
    ready_at = serializers.DateTimeField(allow_null=True)
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    attempt_history = StepAttemptOut(many=True)


class WebhookAttemptOut(serializers.Serializer):
    number = serializers.IntegerField()
    status_code = serializers.IntegerField(allow_null=True)
    latency_ms = serializers.FloatField(allow_null=True)
    error = serializers.CharField(allow_null=True)
    at = serializers.DateTimeField()


class WebhookOut(serializers.Serializer):
    url = serializers.URLField()
    status = serializers.ChoiceField(
        choices=WebhookStatus.choices,
        allow_null=True,
        help_text="Of the latest delivery; null until the run has ended.",
    )
    event_id = serializers.UUIDField(allow_null=True)
    event = serializers.CharField(allow_null=True, help_text="e.g. `run.succeeded`.")
    next_attempt_at = serializers.DateTimeField(allow_null=True)
    attempts = WebhookAttemptOut(many=True)


class AgentToolCallOut(serializers.Serializer):
    id = serializers.CharField(help_text="The model's id of the call.")
    tool = serializers.CharField()
    args = serializers.JSONField(allow_null=True)
    status = serializers.CharField(
        help_text="The call's step status, or `refused` when its arguments were refused."
    )
    result = serializers.JSONField(required=False, help_text="Its output, or `{error}`.")
    duration_ms = serializers.IntegerField(required=False, allow_null=True)


class AgentTurnOut(serializers.Serializer):
    turn = serializers.IntegerField()
    status = serializers.CharField()
    text = serializers.CharField(allow_blank=True)
    usage = serializers.DictField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    duration_ms = serializers.IntegerField(allow_null=True)
    error = serializers.CharField(allow_null=True)
    tool_calls = AgentToolCallOut(many=True)


class RunDetailOut(RunSummaryOut):
    input = serializers.JSONField()
    output = serializers.JSONField(allow_null=True)
    error = serializers.CharField(allow_null=True)
    steps = StepOut(many=True)
    webhook = WebhookOut(allow_null=True, help_text="null when the run has no webhook_url.")
    parent_run = serializers.UUIDField(
        required=False, help_text="Only on a child run (a `workflow` step's run)."
    )
    agents = serializers.DictField(
        child=AgentTurnOut(many=True),
        required=False,
        help_text=(
            "Only on a run with `agent` steps: each agent's transcript by step id, one entry "
            "per turn."
        ),
    )


class EventOut(serializers.Serializer):
    run = serializers.UUIDField()
    seq = serializers.IntegerField()
    type = serializers.CharField()
    at = serializers.DateTimeField()
    data = serializers.DictField()
    step = serializers.CharField(required=False)
    map_index = serializers.IntegerField(required=False)


class EventListOut(serializers.Serializer):
    events = EventOut(many=True)
    last_seq = serializers.IntegerField()
    run_status = serializers.ChoiceField(choices=RunStatus.choices)


class EventsQuery(serializers.Serializer):
    after = serializers.IntegerField(
        min_value=0, required=False, help_text="Only events with a greater seq."
    )


# --- documents -------------------------------------------------------------------------------


class DocumentAddedOut(serializers.Serializer):
    id = serializers.UUIDField()
    title = serializers.CharField(allow_blank=True)


class DocumentsAddedOut(serializers.Serializer):
    documents = DocumentAddedOut(many=True)


# --- API keys and the webhook secret ---------------------------------------------------------


class ApiKeyOut(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()
    prefix = serializers.CharField(help_text="The `<prefix>` of `sy_<prefix>_<secret>`.")
    scopes = serializers.ListField(child=serializers.ChoiceField(choices=Scope.choices))
    created_at = serializers.DateTimeField()
    last_used_at = serializers.DateTimeField(
        allow_null=True, help_text="Updated at most once a minute."
    )
    revoked_at = serializers.DateTimeField(allow_null=True)


class ApiKeyCreatedOut(ApiKeyOut):
    key = serializers.CharField(help_text="The whole key. Shown once: only a hash is stored.")


class ApiKeyListOut(serializers.Serializer):
    keys = ApiKeyOut(many=True)


class WebhookSecretOut(serializers.Serializer):
    secret = serializers.CharField(help_text="`whsec_...`: the HMAC-SHA256 key, as UTF-8.")
    rotated_at = serializers.DateTimeField(allow_null=True)


# --- links between operations ------------------------------------------------------------------
# What a client does next with an answer, as OpenAPI links: a workflow's version is submitted as
# a run, the id a submission answers opens the run, its events, its cancel and retry.
# Generated clients and Schemathesis's stateful phase follow them. drf-spectacular has no
# per-response links, so a postprocessing hook adds them.


@dataclass(frozen=True)
class Link:
    operation_id: str
    description: str
    parameters: dict[str, str] = field(default_factory=dict)
    # Fields of the target's request body (runtime expressions or values).
    body: dict[str, Any] | None = None

    def as_openapi(self) -> dict[str, Any]:
        link: dict[str, Any] = {"operationId": self.operation_id, "description": self.description}
        if self.parameters:
            link["parameters"] = self.parameters
        if self.body is not None:
            link["requestBody"] = self.body
        return link


def _submit(workflow: str, version: str) -> Link:
    body = {"workflow": workflow, "version": version, "input": {}}
    return Link("runs_create", "Submit a run of this version (its input: your own).", body=body)


_RUN_ID = {"run_id": "$response.body#/id"}
_RUN_NEXT = {
    "GetRun": Link("runs_retrieve", "The run: status, output, steps.", _RUN_ID),
    "GetRunEvents": Link("runs_events_list", "The run's event log; streams with SSE.", _RUN_ID),
    "CancelRun": Link("runs_cancel", "Cancel the run.", _RUN_ID),
    "RetryRun": Link("runs_retry", "Retry the run once it has failed.", _RUN_ID),
    "GetStreamToken": Link("runs_stream_token", "A stream token for a browser.", _RUN_ID),
}
_THIS_VERSION = {"name": "$response.body#/name", "version": "$response.body#/version"}
LINKS: dict[tuple[str, str], dict[str, Link]] = {
    ("runs_create", "202"): _RUN_NEXT,
    ("runs_create", "200"): _RUN_NEXT,
    ("runs_retrieve", "200"): _RUN_NEXT,
    ("runs_cancel", "200"): _RUN_NEXT,
    ("runs_retry", "202"): _RUN_NEXT,
    ("runs_list", "200"): {
        "GetFirstRun": Link(
            "runs_retrieve", "The newest run of the page.", {"run_id": "$response.body#/runs/0/id"}
        ),
    },
    ("workflows_create", "201"): {
        "GetWorkflowVersion": Link("workflows_retrieve", "This version.", _THIS_VERSION),
        "SubmitRun": _submit("$response.body#/name", "$response.body#/version"),
    },
    ("workflows_retrieve", "200"): {
        "SubmitRun": _submit("$response.body#/name", "$response.body#/version"),
    },
    ("workflows_list", "200"): {
        "GetFirstWorkflow": Link(
            "workflows_retrieve",
            "The first workflow's latest version.",
            {"name": "$response.body#/workflows/0/name"},
        ),
        "SubmitRun": _submit(
            "$response.body#/workflows/0/name", "$response.body#/workflows/0/latest_version"
        ),
    },
    ("keys_create", "201"): {
        "RevokeKey": Link("keys_revoke", "Revoke the new key.", {"key_id": "$response.body#/id"}),
    },
}


def add_links(result: dict, generator, request, public) -> dict:
    """drf-spectacular postprocessing hook: `LINKS` on the responses they start from."""
    for operations in result.get("paths", {}).values():
        for operation in operations.values():
            if not isinstance(operation, dict):
                continue
            for status, response in operation.get("responses", {}).items():
                links = LINKS.get((operation.get("operationId"), status), {})
                for name, link in links.items():
                    response.setdefault("links", {})[name] = link.as_openapi()
    return result
