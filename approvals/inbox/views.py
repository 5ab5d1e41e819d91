"""The reviewers' inbox (docs/approvals.md): pending requests, one request's page, the history.

Session-authenticated pages. Every approval is read through `approvals.access` with the
user's `ReviewerScope` (another tenant's request is a 404) and decided through
`approvals.services.approval_decide`; the views only translate between HTTP and those.
The list is live: `static/inbox.js` listens on `/ws/inbox/` and re-reads `?fragment=1`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_http_methods

from approvals.access import (
    DUE_SOON,
    SORTS,
    ReviewerScope,
    approval_for_user,
    earlier_steps,
    eligible_groups,
    history_for,
    inbox_counts,
    pending_for,
    reviewer_scope,
)
from approvals.inbox.presentation import (
    context_items,
    duration_text,
    field_errors,
    form_fields,
    parse_form,
    show_value,
)
from approvals.models import Approval, ApprovalDecision
from approvals.services import ApprovalError, Reviewer, approval_decide, closed_message

LIST_LIMIT = 200
NOT_RECORDED = "Your decision was not recorded: "
HISTORY_PAGE = 50


@dataclass(frozen=True)
class Row:
    """One request in a list, with what its badges say."""

    approval: Approval
    can_decide: bool
    approvals: int
    urgency: str  # overdue, soon or ""
    groups: list[str]

    @property
    def deciders(self) -> str:
        """Who may decide, for a badge: `any reviewer`, `finance`, `finance / leads`."""
        return " / ".join("any reviewer" if g == "reviewer" else g for g in self.groups)


def _row(approval: Approval, scope: ReviewerScope, now) -> Row:
    votes = list(approval.votes.all())
    urgency = ""
    if approval.due_at is not None:
        if approval.due_at <= now:
            urgency = "overdue"
        elif approval.due_at <= now + DUE_SOON:
            urgency = "soon"
    return Row(
        approval=approval,
        can_decide=approval.is_pending and scope.decides(approval),
        approvals=sum(v.decision == ApprovalDecision.APPROVE for v in votes),
        urgency=urgency,
        groups=eligible_groups(approval),
    )


@login_required
def inbox(request: HttpRequest) -> HttpResponse:
    scope = reviewer_scope(request.user)
    sort = request.GET.get("sort") if request.GET.get("sort") in SORTS else "newest"
    mine = request.GET.get("show") == "mine"
    now = timezone.now()
    approvals = pending_for(scope=scope, sort=sort, mine=mine)[:LIST_LIMIT]
    context = {
        "rows": [_row(approval, scope, now) for approval in approvals],
        "counts": inbox_counts(scope=scope),
        "sort": sort,
        "mine": mine,
        "limit": LIST_LIMIT,
        "has_tenants": bool(scope.memberships) or scope.is_staff,
        "now": now,
    }
    if request.GET.get("fragment"):
        return render(request, "inbox/_pending.html", context)
    return render(request, "inbox/list.html", context)


@login_required
def history(request: HttpRequest) -> HttpResponse:
    scope = reviewer_scope(request.user)
    page = Paginator(history_for(scope=scope), HISTORY_PAGE).get_page(request.GET.get("page"))
    now = timezone.now()
    return render(
        request,
        "inbox/history.html",
        {
            "page": page,
            "rows": [_row(approval, scope, now) for approval in page.object_list],
            "counts": inbox_counts(scope=scope),
        },
    )


@login_required
@require_http_methods(["GET", "POST"])
def detail(request: HttpRequest, approval_id: str) -> HttpResponse:
    scope = reviewer_scope(request.user)
    approval = approval_for_user(scope=scope, approval_id=approval_id)
    if approval is None:
        raise Http404("No such request in your inbox.")
    if request.method == "POST":
        return _decide(request, scope, approval)
    return _detail_page(request, scope, approval)


def _decide(request: HttpRequest, scope: ReviewerScope, approval: Approval) -> HttpResponse:
    if not approval.is_pending:
        return _detail_page(
            request, scope, approval, error=NOT_RECORDED + closed_message(approval), status=409
        )
    refusal = scope.decide_refusal(approval)
    if refusal is not None:
        return render(
            request,
            "inbox/forbidden.html",
            {"approval": approval, "reason": refusal},
            status=403,
        )
    action = request.POST.get("action")
    if action not in ApprovalDecision.values:
        return _detail_page(request, scope, approval, error="Choose approve or reject.", status=400)
    comment = request.POST.get("comment", "").strip()
    data = None
    if action == ApprovalDecision.APPROVE and approval.form_schema is not None:
        data, errors = parse_form(approval.form_schema, request.POST)
        if errors:
            return _detail_page(
                request,
                scope,
                approval,
                error="Some fields need fixing before you approve.",
                field_errors=errors,
                submitted=data,
                comment=comment,
                status=400,
            )
    try:
        decided = approval_decide(
            approval=approval,
            reviewer=Reviewer.for_user(request.user),
            decision=action,
            comment=comment,
            data=data,
        )
    except ApprovalError as exc:
        errors, general = field_errors(exc.faults) if exc.code == "invalid_data" else ({}, [])
        message = NOT_RECORDED + exc.message
        if exc.code == "invalid_data":
            message = "Some fields need fixing before you approve: " + (
                "; ".join(general) if general else "see below."
            )
        approval.refresh_from_db()
        return _detail_page(
            request,
            scope,
            approval,
            error=message,
            field_errors=errors,
            submitted=data,
            comment=comment,
            status=409 if exc.code in ("not_pending", "already_voted") else 400,
        )
    if decided.is_pending:
        missing = decided.required_approvals - sum(
            v.decision == ApprovalDecision.APPROVE for v in decided.votes.all()
        )
        messages.info(
            request,
            f"Your approval is recorded. {missing} more reviewer"
            f"{'s' if missing != 1 else ''} must approve before the workflow continues.",
        )
        return redirect("inbox:detail", approval_id=decided.public_id)
    verb = "Approved" if decided.status == "approved" else "Rejected"
    messages.success(request, f"{verb}: {_excerpt(decided.prompt)}")
    return redirect("inbox:list")


def _detail_page(
    request: HttpRequest,
    scope: ReviewerScope,
    approval: Approval,
    *,
    error: str = "",
    field_errors: dict[str, str] | None = None,
    submitted: dict[str, Any] | None = None,
    comment: str = "",
    status: int = 200,
) -> HttpResponse:
    now = timezone.now()
    values = {**approval.form_values, **(submitted or {})}
    steps = earlier_steps(approval)
    context = {
        "approval": approval,
        "row": _row(approval, scope, now),
        "refusal": scope.decide_refusal(approval) if approval.is_pending else None,
        "context_items": context_items(approval.context),
        "fields": form_fields(approval.form_schema, values, errors=field_errors),
        "decided_data": show_value("data", approval.data) if approval.data else None,
        "steps": [
            {
                "step": step,
                "output": show_value(step.key, step.output),
                "duration": (
                    (step.finished_at - step.started_at).total_seconds()
                    if step.started_at and step.finished_at
                    else None
                ),
            }
            for step in steps
        ],
        "waited": duration_text(
            ((approval.decided_at or now) - approval.created_at).total_seconds()
        ),
        "votes": list(approval.votes.all()),
        "who": (
            f"any reviewer of {approval.tenant.name}"
            if approval.reviewers == "reviewer"
            else f"the {approval.reviewers} group"
        ),
        "error": error,
        "comment": comment,
        "now": now,
        "api_url": reverse(
            "approvals-api:approval-detail", kwargs={"approval_id": approval.public_id}
        ),
    }
    return render(request, "inbox/detail.html", context, status=status)


def _excerpt(text: str, length: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= length else text[: length - 1] + "…"
