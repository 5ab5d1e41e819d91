"""The client API (DESIGN §8). Views authenticate by API key, read through selectors scoped
to the caller's tenant, and change state only through services."""

from __future__ import annotations

import yaml
from django.db import IntegrityError, transaction
from rest_framework import status
from rest_framework.pagination import CursorPagination
from rest_framework.parsers import BaseParser, JSONParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from jobs import selectors
from jobs.api.errors import ApiError, not_found
from jobs.api.serializers import (
    DocumentsAddSerializer,
    RunListQuerySerializer,
    RunSubmitSerializer,
    event_repr,
    run_detail,
    run_links,
    run_summary,
    version_repr,
)
from jobs.definitions import DefinitionError
from jobs.services.documents import documents_add
from jobs.services.runs import RunError, request_fingerprint, run_cancel, run_create, run_retry
from jobs.services.workflows import workflow_version_create


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
    status_code = {
        "invalid_input": 400,
        "invalid_lane": 400,
        "lane_not_allowed": 400,
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
    parser_classes = [JSONParser, YAMLParser, TextYAMLParser]

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

    def post(self, request: Request) -> Response:
        document = request.data
        if isinstance(document, str):
            try:
                document = yaml.safe_load(document)
            except yaml.YAMLError as exc:
                raise ApiError(
                    status_code=400, code="malformed_request", message=f"not valid YAML: {exc}"
                ) from None
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
    def get(self, request: Request, name: str) -> Response:
        number = request.query_params.get("version")
        if number is not None and not number.isdigit():
            raise ApiError(
                status_code=400,
                code="invalid_request",
                message="version must be a positive integer",
            )
        version = selectors.workflow_version_for(
            tenant=_tenant(request), name=name, version=int(number) if number else None
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
    def get(self, request: Request) -> Response:
        query = RunListQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        runs = selectors.runs_for(tenant=_tenant(request), **query.validated_data)
        paginator = RunCursorPagination()
        page = paginator.paginate_queryset(runs, request, view=self)
        return Response(
            {
                "runs": [run_summary(run, request) for run in page],
                "next": paginator.get_next_link(),
                "previous": paginator.get_previous_link(),
            }
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
        fingerprint = request_fingerprint(request.data) if idempotency_key else ""
        if idempotency_key:
            existing = selectors.run_by_idempotency_key(tenant=tenant, key=idempotency_key)
            if existing is not None:
                return self._replay(request, existing, fingerprint)
        version = selectors.workflow_version_for(
            tenant=tenant, name=data["workflow"], version=data.get("version")
        )
        if version is None:
            suffix = f" version {data['version']}" if data.get("version") else ""
            raise ApiError(
                status_code=404,
                code="not_found",
                message=f"workflow {data['workflow']!r}{suffix} not found",
            )
        try:
            with transaction.atomic():
                run = run_create(
                    tenant=tenant,
                    version=version,
                    input=data.get("input", {}),
                    lane=data.get("lane"),
                    webhook_url=data.get("webhook_url", ""),
                    idempotency_key=idempotency_key,
                    request_hash=fingerprint,
                )
        except RunError as exc:
            raise _run_error(exc) from None
        except IntegrityError:
            # Two requests with one Idempotency-Key raced; the other one stored its run.
            existing = selectors.run_by_idempotency_key(tenant=tenant, key=idempotency_key)
            if existing is None:
                raise
            return self._replay(request, existing, fingerprint)
        return self._accepted(request, run, status.HTTP_202_ACCEPTED)

    def _replay(self, request: Request, run, fingerprint: str) -> Response:
        if run.request_hash != fingerprint:
            raise ApiError(
                status_code=409,
                code="idempotency_key_reused",
                message="this Idempotency-Key was used with a different request body",
                details={"run": str(run.public_id)},
            )
        code = status.HTTP_200_OK if run.is_final else status.HTTP_202_ACCEPTED
        return self._accepted(request, run, code)

    def _accepted(self, request: Request, run, code: int) -> Response:
        links = run_links(run, request)
        return Response(
            {"id": str(run.public_id), "status": run.status, "links": links},
            status=code,
            headers={"Location": links["self"]},
        )


def _run_or_404(request: Request, run_id: str):
    run = selectors.run_for(tenant=_tenant(request), run_id=run_id)
    if run is None:
        raise not_found("run")
    return run


class RunDetailView(APIView):
    def get(self, request: Request, run_id: str) -> Response:
        run = _run_or_404(request, run_id)
        return Response(run_detail(selectors.run_with_steps(run), request))


class RunEventsView(APIView):
    def get(self, request: Request, run_id: str) -> Response:
        run = _run_or_404(request, run_id)
        after = request.query_params.get("after", "0")
        if not after.isdigit():
            raise ApiError(
                status_code=400,
                code="invalid_request",
                message="after must be a non-negative integer (an event seq)",
            )
        events = selectors.events_for(run=run, after=int(after))
        return Response(
            {
                "events": [event_repr(event, run) for event in events],
                "last_seq": events[-1].seq if events else int(after),
                "run_status": run.status,
            }
        )


class RunCancelView(APIView):
    def post(self, request: Request, run_id: str) -> Response:
        run = _run_or_404(request, run_id)
        try:
            run = run_cancel(run=run, reason="cancelled by the client", by=str(request.user))
        except RunError as exc:
            raise _run_error(exc) from None
        return Response(run_summary(run, request))


class RunRetryView(APIView):
    def post(self, request: Request, run_id: str) -> Response:
        run = _run_or_404(request, run_id)
        try:
            run = run_retry(run=run, by=str(request.user))
        except RunError as exc:
            raise _run_error(exc) from None
        return Response(run_summary(run, request), status=status.HTTP_202_ACCEPTED)


class DocumentsView(APIView):
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
