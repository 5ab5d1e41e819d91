"""The client API (docs/api.md). Views authenticate by API key, read through selectors scoped
to the caller's tenant, and change state only through services."""

from __future__ import annotations

import yaml
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.pagination import CursorPagination
from rest_framework.parsers import BaseParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from jobs import selectors
from jobs.api import openapi
from jobs.api.errors import ApiError, not_found
from jobs.api.parsers import StrictJSONParser, check_storable
from jobs.api.serializers import (
    DocumentsAddSerializer,
    RunListQuerySerializer,
    RunSubmitSerializer,
    WorkflowQuerySerializer,
    event_repr,
    run_detail,
    run_links,
    run_summary,
    version_repr,
)
from jobs.definitions import DefinitionError, load_yaml
from jobs.services.documents import documents_add
from jobs.services.submission import (
    Backpressure,
    IdempotencyConflict,
    request_fingerprint,
    run_submit,
)
from jobs.services.workflows import workflow_version_create
from jobs.transitions.runs import RunError, run_cancel, run_retry
from tenants.keycache import forget_key
from tenants.models import ApiKey


class YAMLParser(BaseParser):
    media_type = "application/yaml"

    def parse(self, stream, media_type=None, parser_context=None):
        return stream.read().decode("utf-8", errors="replace")


class TextYAMLParser(YAMLParser):
    media_type = "text/yaml"


def _tenant(request: Request):
    return request.user.tenant


def _faults(faults) -> list[dict[str, str]]:
    return [{"path": fault.path, "message": fault.message} for fault in faults]


def _run_error(exc: RunError) -> ApiError:
    if isinstance(exc, Backpressure):
        return ApiError(
            status_code=429 if exc.code == "queued_runs_quota_full" else 503,
            code=exc.code,
            message=exc.message,
            headers={"Retry-After": str(exc.retry_after)},
        )
    if isinstance(exc, IdempotencyConflict):
        return ApiError(
            status_code=409,
            code=exc.code,
            message=exc.message,
            details={"run": str(exc.run.public_id)},
        )
    status_code = {
        "invalid_input": 400,
        "invalid_lane": 400,
        "lane_not_allowed": 400,
        "forbidden_webhook_url": 400,
        "invalid_webhook_url": 400,
        "run_final": 409,
        "not_failed": 409,
    }.get(exc.code, 400)
    message = exc.message
    if exc.faults:
        message = "; ".join(str(fault) for fault in exc.faults[:5])
    return ApiError(
        status_code=status_code, code=exc.code, message=message, details=_faults(exc.faults) or None
    )


class WorkflowListView(APIView):
    parser_classes = [StrictJSONParser, YAMLParser, TextYAMLParser]

    @extend_schema(
        tags=["workflows"],
        operation_id="workflows_list",
        summary="List the tenant's workflows",
        responses={200: openapi.WorkflowListOut, **openapi.errors()},
    )
    def get(self, request: Request) -> Response:
        workflows = selectors.workflows_for(tenant=_tenant(request))
        return Response(
            {
                "workflows": [
                    {
                        "name": workflow.name,
                        "latest_version": max(
                            (v.version for v in workflow.versions.all()), default=0
                        ),
                        "created_at": workflow.created_at.isoformat(),
                    }
                    for workflow in workflows
                ]
            }
        )

    @extend_schema(
        tags=["workflows"],
        operation_id="workflows_create",
        summary="Create a workflow, or the next version of it",
        description="A workflow definition as JSON, or as YAML with `application/yaml`.",
        request={
            "application/json": OpenApiTypes.OBJECT,
            "application/yaml": OpenApiTypes.STR,
            "text/yaml": OpenApiTypes.STR,
        },
        responses={201: openapi.WorkflowVersionOut, **openapi.errors(400, 413)},
    )
    def post(self, request: Request) -> Response:
        document = request.data
        if isinstance(document, str):
            try:
                document = load_yaml(document)
            except yaml.YAMLError as exc:
                raise ApiError(
                    status_code=400, code="malformed_request", message=f"not valid YAML: {exc}"
                ) from None
            check_storable(document)
        try:
            version = workflow_version_create(tenant=_tenant(request), document=document)
        except DefinitionError as exc:
            faults = _faults(exc.faults)
            raise ApiError(
                status_code=400,
                code="invalid_definition",
                message="; ".join(f"{f['path']}: {f['message']}" for f in faults[:5]),
                details=faults,
            ) from None
        return Response(version_repr(version), status=status.HTTP_201_CREATED)


class WorkflowDetailView(APIView):
    @extend_schema(
        tags=["workflows"],
        operation_id="workflows_retrieve",
        summary="A workflow's latest version (or `?version=n`) with its definition",
        parameters=[openapi.WORKFLOW_NAME, WorkflowQuerySerializer],
        responses={200: openapi.WorkflowVersionOut, **openapi.errors(400, 404)},
    )
    def get(self, request: Request, name: str) -> Response:
        query = WorkflowQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        version = selectors.workflow_version_for(
            tenant=_tenant(request), name=name, version=query.validated_data.get("version")
        )
        if version is None:
            raise not_found("workflow")
        return Response(version_repr(version))


class RunCursorPagination(CursorPagination):
    ordering = ("-created_at", "-id")
    page_size = 50
    page_size_query_param = "limit"
    max_page_size = 200


class RunListView(APIView):
    @extend_schema(
        tags=["runs"],
        operation_id="runs_list",
        summary="The tenant's runs, newest first (cursor-paginated)",
        parameters=[RunListQuerySerializer],
        responses={200: openapi.RunListOut, **openapi.errors(400, 404)},
    )
    def get(self, request: Request) -> Response:
        query = RunListQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        filters = {
            name: value
            for name, value in query.validated_data.items()
            if name not in ("limit", "cursor")  # the paginator's, read by it
        }
        runs = selectors.runs_for(tenant=_tenant(request), **filters)
        paginator = RunCursorPagination()
        page = paginator.paginate_queryset(runs, request, view=self)
        return Response(
            {
                "runs": [run_summary(run, request) for run in page],
                "next": paginator.get_next_link(),
                "previous": paginator.get_previous_link(),
            }
        )

    @extend_schema(
        tags=["runs"],
        operation_id="runs_create",
        summary="Submit a run",
        description=(
            "Validates the input and stores the run; answers 202 at once (the run proceeds "
            "asynchronously). With an `Idempotency-Key` seen within 24 h and the same body, "
            "answers with the original run: 200 if it has ended, else 202. With `?wait=N`, "
            "waits up to N seconds for the run to end: 200 if it did, else the 202. A 200 is "
            "always the run's whole detail, as `GET /runs/{id}/` answers it."
        ),
        parameters=[openapi.IDEMPOTENCY_KEY, openapi.WaitQuery],
        request=RunSubmitSerializer,
        responses={
            202: OpenApiResponse(openapi.RunAcceptedOut, description="Accepted; `Location` set."),
            200: OpenApiResponse(
                openapi.RunDetailOut,
                description=(
                    "The run has ended (the end of a `?wait=`, or an idempotent replay): its "
                    "detail, with output, steps and error; `Location` set."
                ),
            ),
            **openapi.errors(400, 404, 409, 413, 429, 503),
        },
    )
    def post(self, request: Request) -> Response:
        tenant = _tenant(request)
        body = RunSubmitSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        idempotency_key = request.headers.get("Idempotency-Key", "").strip()
        if len(idempotency_key) > 255:
            raise ApiError(
                status_code=400,
                code="invalid_request",
                message="Idempotency-Key must be at most 255 characters",
            )
        name, number = data["workflow"], data.get("version")
        for attempt in range(2):
            # The version from this process's cache; the submission's statement checks that
            # it is still there (and still the latest, if asked for as such).
            version = selectors.workflow_version_cached(tenant=tenant, name=name, version=number)
            if version is None:
                suffix = f" version {number}" if number else ""
                message = f"workflow {name!r}{suffix} not found"
                raise ApiError(status_code=404, code="not_found", message=message)
            try:
                submission = run_submit(
                    tenant=tenant,
                    version=version,
                    input=data.get("input", {}),
                    lane=data.get("lane"),
                    webhook_url=data.get("webhook_url", ""),
                    idempotency_key=idempotency_key,
                    request_hash=request_fingerprint(request.data) if idempotency_key else "",
                    cached_version=True,
                    latest=number is None,
                    api_key_id=request.auth.pk if isinstance(request.auth, ApiKey) else None,
                )
                break
            except RunError as exc:
                if exc.code == "stale_version" and attempt == 0:
                    selectors.workflow_version_forget(tenant=tenant, name=name, version=number)
                    continue
                if exc.code == "key_revoked":
                    forget_key(request.auth.key_hash)
                    raise AuthenticationFailed("Unknown or revoked API key.") from None
                raise _run_error(exc) from None
        run = submission.run
        if submission.created or not run.is_final:
            links = run_links(run, request)
            return Response(
                {"id": str(run.public_id), "status": run.status, "links": links},
                status=status.HTTP_202_ACCEPTED,
                headers={"Location": links["self"]},
            )
        # A replay of a run that has ended answers as a `?wait=` that saw it end.
        body = run_detail(selectors.run_with_steps(run), request)
        return Response(
            body, status=status.HTTP_200_OK, headers={"Location": body["links"]["self"]}
        )


def _run_or_404(request: Request, run_id: str):
    run = selectors.run_for(tenant=_tenant(request), run_id=run_id)
    if run is None:
        raise not_found("run")
    return run


class RunDetailView(APIView):
    @extend_schema(
        tags=["runs"],
        operation_id="runs_retrieve",
        summary="A run: status, output, error, each step, and its webhook deliveries",
        description=(
            "With `?wait=N`: answers as soon as the run has ended, or with the run as it "
            "stands after N seconds."
        ),
        parameters=[openapi.RUN_ID, openapi.WaitQuery],
        responses={200: openapi.RunDetailOut, **openapi.errors(400, 404)},
    )
    def get(self, request: Request, run_id: str) -> Response:
        run = _run_or_404(request, run_id)
        return Response(run_detail(selectors.run_with_steps(run), request))


def resume_after(request) -> int | ApiError:
    """The seq a reader of a run's events has: the `Last-Event-ID` header, else `?after=`, else
    0; or the 400 that refuses it. EventSource sends the header on reconnection, to the URL it
    first opened: the header is newer than the URL's `?after=`."""
    if "Last-Event-ID" in request.headers:
        source, after = "Last-Event-ID", request.headers["Last-Event-ID"].strip()
    else:
        source, after = "after", request.GET.get("after", "0")
    if after.isdigit():
        return int(after)
    message = "must be a non-negative integer (an event seq)"
    return ApiError(
        status_code=400,
        code="invalid_request",
        message=f"{source} {message}",
        details=[{"path": source, "message": message}],
    )


class RunEventsView(APIView):
    @extend_schema(
        tags=["runs"],
        operation_id="runs_events_list",
        summary="A run's event log (gapless seq), after `?after=SEQ`; live with SSE",
        description=(
            "With `Accept: text/event-stream`: every stored event after `Last-Event-ID` (or "
            "`?after=`), then live events, as SSE frames with `id:` = seq, `step.delta` frames "
            "without an id, heartbeats every 15 s; the stream ends after the run's final event. "
            "A browser opens the stream with `?token=` (a stream token of this run, from "
            "`POST /api/v1/runs/{run_id}/stream-token/`) instead of an API key; a token opens "
            "nothing else."
        ),
        parameters=[openapi.RUN_ID, openapi.EventsQuery, openapi.LAST_EVENT_ID],
        responses={
            (200, "application/json"): openapi.EventListOut,
            (200, "text/event-stream"): OpenApiTypes.STR,
            **openapi.errors(400, 404),
        },
    )
    def get(self, request: Request, run_id: str) -> Response:
        run = _run_or_404(request, run_id)
        after = resume_after(request)
        if isinstance(after, ApiError):
            raise after
        events = selectors.events_for(run=run, after=after)
        return Response(
            {
                "events": [event_repr(event, run) for event in events],
                "last_seq": events[-1].seq if events else int(after),
                "run_status": run.status,
            }
        )


class RunCancelView(APIView):
    @extend_schema(
        tags=["runs"],
        operation_id="runs_cancel",
        summary="Cancel a run and its unfinished steps",
        parameters=[openapi.RUN_ID],
        request=None,
        responses={200: openapi.RunSummaryOut, **openapi.errors(404, 409)},
    )
    def post(self, request: Request, run_id: str) -> Response:
        run = _run_or_404(request, run_id)
        try:
            run = run_cancel(run=run, reason="cancelled by the client", by=str(request.user))
        except RunError as exc:
            raise _run_error(exc) from None
        return Response(run_summary(run, request))


class RunRetryView(APIView):
    @extend_schema(
        tags=["runs"],
        operation_id="runs_retry",
        summary="Retry a failed run from its failed steps (checkpoints are kept)",
        parameters=[openapi.RUN_ID],
        request=None,
        responses={202: openapi.RunSummaryOut, **openapi.errors(404, 409)},
    )
    def post(self, request: Request, run_id: str) -> Response:
        run = _run_or_404(request, run_id)
        try:
            run = run_retry(run=run, by=str(request.user))
        except RunError as exc:
            raise _run_error(exc) from None
        return Response(run_summary(run, request), status=status.HTTP_202_ACCEPTED)


class DocumentsView(APIView):
    @extend_schema(
        tags=["documents"],
        operation_id="documents_create",
        summary="Add documents for `retrieval` steps",
        request=DocumentsAddSerializer,
        responses={201: openapi.DocumentsAddedOut, **openapi.errors(400, 413)},
    )
    def post(self, request: Request) -> Response:
        body = DocumentsAddSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        documents = documents_add(
            tenant=_tenant(request), documents=body.validated_data["documents"]
        )
        return Response(
            {"documents": [{"id": str(d.public_id), "title": d.title} for d in documents]},
            status=status.HTTP_201_CREATED,
        )
