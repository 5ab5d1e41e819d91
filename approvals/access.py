"""The one door to approvals: who may see a request and who may decide it.

Every read of approvals by the inbox, its live socket and the API goes through a function
here that takes the caller (a user, or the tenant of an API key) and scopes by it
(docs/security.md): another tenant's request is None (a 404), never a 403 that confirms it exists.

Rules (docs/approvals.md):
- a user sees the requests of the tenants they are a member of (any role); staff see all;
- a user decides a request when they are a `reviewer` of its tenant and belong to its
  `reviewers` group (the role `reviewer` itself, or a named group in their membership's
  `groups`), or to its `escalate_to` group once it has escalated. Viewers, and staff without
  such a membership, read but never decide;
- an API key decides any request of its own tenant (the tenant's own tools), as one reviewer.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.db.models import F, Q, QuerySet
from django.utils import timezone

from approvals.models import Approval, ApprovalStatus
from jobs.events import INBOX_STAFF_GROUP, inbox_group
from jobs.formats import parse_uuid
from jobs.models import StepRun
from tenants.models import Membership, Role, Tenant

SORTS = ("newest", "urgent")
# A request due within this long counts as "due soon" in the inbox's badges.
DUE_SOON = timedelta(hours=1)


def _base() -> QuerySet[Approval]:
    return Approval.objects.select_related(
        "tenant", "run__workflow_version__workflow", "step_run"
    ).prefetch_related("votes")


# --- API keys (a tenant) ---------------------------------------------------------------------


def approvals_for_tenant(*, tenant: Tenant, status: str | None = None) -> QuerySet[Approval]:
    """The tenant's approvals, newest first, optionally of one status."""
    approvals = _base().filter(tenant=tenant)
    if status:
        approvals = approvals.filter(status=status)
    return approvals.order_by("-created_at", "-id")


def approval_for_tenant(*, tenant: Tenant, approval_id: str | uuid.UUID) -> Approval | None:
    public_id = parse_uuid(approval_id)
    if public_id is None:
        return None
    return _base().filter(tenant=tenant, public_id=public_id).first()


# --- users (the inbox) -----------------------------------------------------------------------


@dataclass(frozen=True)
class ReviewerScope:
    """A user's memberships, read once per request: what they may see and decide."""

    user_id: int | None
    is_staff: bool
    memberships: dict[int, Membership]  # by tenant id

    @property
    def tenant_ids(self) -> list[int]:
        return list(self.memberships)

    def sees(self, approval: Approval) -> bool:
        return self.is_staff or approval.tenant_id in self.memberships

    def decide_refusal(self, approval: Approval) -> str | None:
        """None when this user may decide `approval`; else why not, in words for them."""
        membership = self.memberships.get(approval.tenant_id)
        if membership is None:
            return (
                "operators can read every tenant's requests but decide only as a reviewer of "
                "the tenant"
            )
        if membership.role != Role.REVIEWER:
            return (
                f"you are a {membership.role} of {approval.tenant.name}: viewers can read "
                "requests but not approve or reject them"
            )
        groups = eligible_groups(approval)
        if not (set(groups) & member_groups(membership)):
            named = " or ".join(f"'{group}'" for group in groups)
            return f"only the {named} group{'s' if len(groups) > 1 else ''} decide this request"
        return None

    def decides(self, approval: Approval) -> bool:
        return self.decide_refusal(approval) is None

    def live_groups(self) -> list[str]:
        """The channel-layer groups this user's inbox listens to."""
        groups = [inbox_group(m.tenant.public_id) for m in self.memberships.values()]
        return [INBOX_STAFF_GROUP] if self.is_staff else groups


def member_groups(membership: Membership) -> set[str]:
    """The groups a membership belongs to: its role plus its named groups."""
    return {membership.role, *(str(name) for name in (membership.groups or []))}


def eligible_groups(approval: Approval) -> list[str]:
    """The groups that may decide `approval` now."""
    groups = [approval.reviewers]
    if approval.escalated and approval.escalate_to:
        groups.append(approval.escalate_to)
    return groups


def reviewer_scope(user: Any) -> ReviewerScope:
    if user is None or not user.is_authenticated:
        return ReviewerScope(user_id=None, is_staff=False, memberships={})
    memberships = {
        m.tenant_id: m
        for m in Membership.objects.select_related("tenant").filter(user=user, tenant__isnull=False)
    }
    return ReviewerScope(user_id=user.pk, is_staff=user.is_staff, memberships=memberships)


def _visible(scope: ReviewerScope) -> QuerySet[Approval]:
    if scope.user_id is None:
        return Approval.objects.none()
    approvals = _base()
    if not scope.is_staff:
        approvals = approvals.filter(tenant_id__in=scope.tenant_ids)
    return approvals


def _decidable_filter(scope: ReviewerScope) -> Q:
    """The requests `scope` may decide, as a query (mirrors `decide_refusal`)."""
    condition = Q(pk__in=[])
    for tenant_id, membership in scope.memberships.items():
        if membership.role != Role.REVIEWER:
            continue
        groups = sorted(member_groups(membership))
        condition |= Q(tenant_id=tenant_id) & (
            Q(reviewers__in=groups) | Q(escalated=True, escalate_to__in=groups)
        )
    return condition


def pending_for(
    *, scope: ReviewerScope, sort: str = "newest", mine: bool = False
) -> QuerySet[Approval]:
    """Pending requests the user sees: newest first, or most urgent (soonest due) first."""
    approvals = _visible(scope).filter(status=ApprovalStatus.PENDING)
    if mine:
        approvals = approvals.filter(_decidable_filter(scope))
    if sort == "urgent":
        return approvals.order_by(F("due_at").asc(nulls_last=True), "created_at", "id")
    return approvals.order_by("-created_at", "-id")


def history_for(*, scope: ReviewerScope) -> QuerySet[Approval]:
    """Requests that left `pending` (decided, expired, withdrawn), latest first."""
    return (
        _visible(scope)
        .exclude(status=ApprovalStatus.PENDING)
        .order_by(F("decided_at").desc(nulls_last=True), "-id")
    )


def approval_for_user(*, scope: ReviewerScope, approval_id: str | uuid.UUID) -> Approval | None:
    """The request if the user may see it; None for a malformed id or another tenant's."""
    public_id = parse_uuid(approval_id)
    if public_id is None:
        return None
    return _visible(scope).filter(public_id=public_id).first()


@dataclass(frozen=True)
class InboxCounts:
    pending: int
    mine: int
    due_soon: int
    overdue: int


def inbox_counts(*, scope: ReviewerScope) -> InboxCounts:
    pending = _visible(scope).filter(status=ApprovalStatus.PENDING)
    now = timezone.now()
    return InboxCounts(
        pending=pending.count(),
        mine=pending.filter(_decidable_filter(scope)).count(),
        due_soon=pending.filter(due_at__gt=now, due_at__lte=now + DUE_SOON).count(),
        overdue=pending.filter(due_at__lte=now).count(),
    )


def earlier_steps(approval: Approval) -> list[StepRun]:
    """The other steps of the request's run that have finished, in the order they started.

    `approval` comes from one of the scoped functions above, so its run is the caller's.
    """
    return list(
        StepRun.objects.filter(run_id=approval.run_id, finished_at__isnull=False)
        .exclude(pk=approval.step_run_id)
        .order_by(F("started_at").asc(nulls_last=True), "id")
    )
