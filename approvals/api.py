"""The approvals API (docs/approvals.md): a tenant's requests, and deciding them from its tools.

`GET /api/v1/approvals/?status=`, `GET /api/v1/approvals/{id}/` and
`POST /api/v1/approvals/{id}/decision/`. The API key is the reviewer (by its name): any key of
the tenant may decide, and counts as one reviewer towards `required_approvals`. Reads go
through `approvals.access`; the decision through `approvals.services`.
"""

from __future__ import annotations

from typing import Any

from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.pagination import CursorPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from approvals import access
from approvals.models import Approval, ApprovalDecision, ApprovalStatus
from approvals.services import ApprovalError, Reviewer, approval_decide
from jobs.api import openapi
from jobs.api.errors import ApiError, not_found
from jobs.api.serializers import NoEmptyFilters
from jobs.formats import iso

APPROVAL_ID = OpenApiParameter("approval_id", OpenApiTypes.UUID, OpenApiParameter.PATH)


# --- shapes ----------------------------------------------------------------------------------


class ApprovalListQuery(NoEmptyFilters, serializers.Serializer):
    status = serializers.ChoiceField(
        choices=ApprovalStatus.choices, required=False, help_text="Only requests in this status."
    )


class DecisionIn(serializers.Serializer):
    decision = serializers.ChoiceField(choices=ApprovalDecision.choices)
    comment = serializers.CharField(required=False, allow_blank=True, default="", max_length=10_000)
    data = serializers.DictField(
        required=False,
        allow_null=True,
        default=None,
        help_text=(
            "With `approve`: edits of the form's fields (the others keep their pre-filled "
            "values); the result must fit the form's schema."
        ),
    )


class FormOut(serializers.Serializer):
    schema = serializers.DictField(help_text="JSON Schema of the fields a reviewer may edit.")
    values = serializers.DictField(help_text="The fields as pre-filled by the workflow.")


class VoteOut(serializers.Serializer):
    reviewer = serializers.CharField(help_text="A username, or `api key <name>`.")
    decision = serializers.ChoiceField(choices=ApprovalDecision.choices)
    comment = serializers.CharField(allow_blank=True)
    data = serializers.JSONField(allow_null=True)
    at = serializers.DateTimeField()


class ApprovalLinksOut(serializers.Serializer):
    self = serializers.URLField()
    decision = serializers.URLField()
    inbox = serializers.URLField(help_text="The request's page in the reviewers' inbox.")
    run = serializers.URLField()


class ApprovalOut(serializers.Serializer):
    id = serializers.UUIDField()
    status = serializers.ChoiceField(choices=ApprovalStatus.choices)
    run = serializers.UUIDField()
    workflow = serializers.CharField()
    step = serializers.CharField()
    map_index = serializers.IntegerField(allow_null=True)
    prompt = serializers.CharField()
    context = serializers.DictField()
    form = FormOut(allow_null=True)
    reviewers = serializers.CharField(help_text="The role or group that decides.")
    escalate_to = serializers.CharField(allow_null=True)
    escalated = serializers.BooleanField()
    required_approvals = serializers.IntegerField()
    approvals = serializers.IntegerField(help_text="Distinct reviewers who approved so far.")
    created_at = serializers.DateTimeField()
    due_at = serializers.DateTimeField(allow_null=True)
    escalate_at = serializers.DateTimeField(allow_null=True)
    on_timeout = serializers.CharField(allow_null=True)
    on_reject = serializers.ChoiceField(choices=["fail", "continue"])
    decided_at = serializers.DateTimeField(allow_null=True)
    decision = serializers.ChoiceField(choices=ApprovalDecision.choices, allow_null=True)
    decided_by = serializers.CharField(allow_null=True)
    comment = serializers.CharField(allow_blank=True)
    data = serializers.JSONField(allow_null=True, help_text="The form as decided.")
    votes = VoteOut(many=True)
    links = ApprovalLinksOut()


class ApprovalListOut(serializers.Serializer):
    approvals = ApprovalOut(many=True)
    next = serializers.URLField(allow_null=True)
    previous = serializers.URLField(allow_null=True)


def approval_paths(approval: Approval) -> dict[str, str]:
    kwargs = {"approval_id": approval.public_id}
    return {
        "self": reverse("approvals-api:approval-detail", kwargs=kwargs),
        "decision": reverse("approvals-api:approval-decision", kwargs=kwargs),
        "inbox": reverse("inbox:detail", kwargs=kwargs),
        "run": reverse("api:run-detail", kwargs={"run_id": approval.run.public_id}),
    }


def approval_repr(approval: Approval, request: Request) -> dict[str, Any]:
    votes = list(approval.votes.all())
    run = approval.run
    return {
        "id": str(approval.public_id),
        "status": approval.status,
        "run": str(run.public_id),
        "workflow": run.workflow_version.workflow.name,
        "step": approval.step_run.step_id,
        "map_index": approval.step_run.map_index,
        "prompt": approval.prompt,
        "context": approval.context,
        "form": (
            {"schema": approval.form_schema, "values": approval.form_values}
            if approval.form_schema is not None
            else None
        ),
        "reviewers": approval.reviewers,
        "escalate_to": approval.escalate_to or None,
        "escalated": approval.escalated,
        "required_approvals": approval.required_approvals,
        "approvals": sum(vote.decision == ApprovalDecision.APPROVE for vote in votes),
        "created_at": iso(approval.created_at),
        "due_at": iso(approval.due_at),
        "escalate_at": iso(approval.escalate_at),
        "on_timeout": approval.on_timeout or None,
        "on_reject": approval.on_reject,
        "decided_at": iso(approval.decided_at),
        "decision": approval.decision or None,
        "decided_by": approval.decided_by or None,
        "comment": approval.comment,
        "data": approval.data,
        "votes": [
            {
                "reviewer": vote.reviewer,
                "decision": vote.decision,
                "comment": vote.comment,
                "data": vote.data,
                "at": vote.at.isoformat(),
            }
            for vote in votes
        ],
        "links": {
            name: request.build_absolute_uri(path)
            for name, path in approval_paths(approval).items()
        },
    }


# --- views -----------------------------------------------------------------------------------


class ApprovalCursorPagination(CursorPagination):
    ordering = ("-created_at", "-id")
    page_size = 50
    page_size_query_param = "limit"
    max_page_size = 200


def _approval_or_404(request: Request, approval_id: str) -> Approval:
    approval = access.approval_for_tenant(tenant=request.user.tenant, approval_id=approval_id)
    if approval is None:
        raise not_found("approval")
    return approval


class ApprovalListView(APIView):
    @extend_schema(
        tags=["approvals"],
        operation_id="approvals_list",
        summary="The tenant's approval requests, newest first (cursor-paginated)",
        parameters=[
            ApprovalListQuery,
            OpenApiParameter("cursor", OpenApiTypes.STR, description="From `next`/`previous`."),
            OpenApiParameter("limit", OpenApiTypes.INT, description="Page size, at most 200."),
        ],
        responses={200: ApprovalListOut, **openapi.errors(400, 404)},
    )
    def get(self, request: Request) -> Response:
        query = ApprovalListQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        approvals = access.approvals_for_tenant(
            tenant=request.user.tenant, status=query.validated_data.get("status")
        )
        paginator = ApprovalCursorPagination()
        page = paginator.paginate_queryset(approvals, request, view=self)
        return Response(
            {
                "approvals": [approval_repr(approval, request) for approval in page],
                "next": paginator.get_next_link(),
                "previous": paginator.get_previous_link(),
            }
        )


class ApprovalDetailView(APIView):
    @extend_schema(
        tags=["approvals"],
        operation_id="approvals_retrieve",
        summary="An approval request: what was asked, its votes and its decision",
        parameters=[APPROVAL_ID],
        responses={200: ApprovalOut, **openapi.errors(404)},
    )
    def get(self, request: Request, approval_id: str) -> Response:
        return Response(approval_repr(_approval_or_404(request, approval_id), request))


class ApprovalDecisionView(APIView):
    @extend_schema(
        tags=["approvals"],
        operation_id="approvals_decide",
        summary="Approve or reject a pending request, as this API key",
        description=(
            "The API key counts as one reviewer (by its name). The first rejection rejects; "
            "`required_approvals` distinct approvals approve. A request that was decided, "
            "expired or withdrawn, or that this key has already approved, answers 409; `data` "
            "that does not fit the form's schema answers 400 naming each field."
        ),
        parameters=[APPROVAL_ID],
        request=DecisionIn,
        responses={
            200: OpenApiResponse(ApprovalOut, description="The request after this decision."),
            **openapi.errors(400, 404, 409),
        },
    )
    def post(self, request: Request, approval_id: str) -> Response:
        approval = _approval_or_404(request, approval_id)
        body = DecisionIn(data=request.data)
        body.is_valid(raise_exception=True)
        decision = body.validated_data
        try:
            approval_decide(
                approval=approval,
                reviewer=Reviewer.for_api_key(request.user.api_key),
                decision=decision["decision"],
                comment=decision["comment"],
                data=decision["data"],
            )
        except ApprovalError as exc:
            raise _approval_error(exc) from None
        return Response(approval_repr(_approval_or_404(request, approval_id), request))


def _approval_error(exc: ApprovalError) -> ApiError:
    if exc.code == "invalid_data":
        return ApiError(
            status_code=400,
            code="invalid_data",
            message=exc.message,
            details=[
                {"path": f"data.{path}" if path != "$" else "data", "message": message}
                for path, message in exc.faults
            ],
        )
    status_code = 409 if exc.code in ("not_pending", "already_voted") else 400
    return ApiError(status_code=status_code, code=exc.code, message=exc.message)
