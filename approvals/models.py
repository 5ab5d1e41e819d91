"""Approvals and their votes: the requests that approval steps make of people.

The tables keep the names they had when these models lived in `jobs` (`jobs_approval`,
`jobs_approvalvote`): the move into this app changed Django's state only
(`migrations/0001_approvals_from_jobs.py`), so no row was copied. All writes go through
`approvals.services`.
"""

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q

from jobs.models import Run, StepRun
from tenants.models import Tenant


class ApprovalStatus(models.TextChoices):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"  # no decision before due_at; on_timeout was applied
    CANCELLED = "cancelled"  # the run was cancelled (or failed elsewhere) while it waited


class ApprovalDecision(models.TextChoices):
    APPROVE = "approve"
    REJECT = "reject"


class Approval(models.Model):
    """A request for a decision by people, made by one attempt of an `approval` step.

    Written only by `approvals.services`. Everything a reviewer saw (prompt, context,
    form) is frozen here as rendered; the decision fields are set once, by the compare-and-set
    that leaves `pending`, and never change afterwards. Each reviewer's vote is an
    `ApprovalVote`. One row per attempt of the step, so that a retried run asks again and the
    earlier request stays in the history.
    """

    public_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    step_run = models.ForeignKey(StepRun, on_delete=models.CASCADE, related_name="approvals")
    attempt = models.PositiveIntegerField()
    # Denormalised from the step, so that the inbox and the API scope without joins.
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="approvals")
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="approvals")
    status = models.CharField(
        max_length=16, choices=ApprovalStatus.choices, default=ApprovalStatus.PENDING
    )
    prompt = models.TextField()
    context = models.JSONField(default=dict, blank=True)
    form_schema = models.JSONField(null=True, blank=True)
    form_values = models.JSONField(default=dict, blank=True)
    # A tenant role (`reviewer`) or a named group of the tenant's members.
    reviewers = models.CharField(max_length=64, default="reviewer")
    escalate_to = models.CharField(max_length=64, blank=True)
    escalate_at = models.DateTimeField(null=True, blank=True)
    escalated = models.BooleanField(default=False)
    escalated_at = models.DateTimeField(null=True, blank=True)
    required_approvals = models.PositiveSmallIntegerField(default=1)
    due_at = models.DateTimeField(null=True, blank=True)
    on_timeout = models.CharField(max_length=16, blank=True)
    on_reject = models.CharField(max_length=16, default="fail")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    decided_at = models.DateTimeField(null=True, blank=True)
    decision = models.CharField(max_length=16, choices=ApprovalDecision.choices, blank=True)
    decided_by = models.CharField(max_length=500, blank=True)
    comment = models.TextField(blank=True)
    data = models.JSONField(null=True, blank=True)

    class Meta:
        db_table = "jobs_approval"
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["step_run", "attempt"], name="approval_unique_attempt")
        ]
        indexes = [
            models.Index(fields=["tenant", "status", "-created_at"], name="approval_tenant_status"),
            # The scheduler's sweeps: only pending requests, by when they are due.
            models.Index(fields=["due_at"], condition=Q(status="pending"), name="approval_due"),
            models.Index(
                fields=["escalate_at"],
                condition=Q(status="pending", escalated=False),
                name="approval_escalation_due",
            ),
        ]

    def __str__(self) -> str:
        return f"approval {self.public_id} ({self.status})"

    @property
    def is_pending(self) -> bool:
        return self.status == ApprovalStatus.PENDING


class ApprovalVote(models.Model):
    """One reviewer's decision on an approval (n of them for `required_approvals: n`).

    A reviewer is a user (inbox) or an API key (the API), never counted twice.
    """

    approval = models.ForeignKey(Approval, on_delete=models.CASCADE, related_name="votes")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="approval_votes",
    )
    api_key_name = models.CharField(max_length=100, blank=True)
    # Who, as shown in the history (kept if the user is deleted later).
    reviewer = models.CharField(max_length=200)
    decision = models.CharField(max_length=16, choices=ApprovalDecision.choices)
    comment = models.TextField(blank=True)
    data = models.JSONField(null=True, blank=True)
    at = models.DateTimeField()

    class Meta:
        db_table = "jobs_approvalvote"
        ordering = ["approval", "at", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["approval", "user"],
                condition=Q(user__isnull=False),
                name="approval_vote_unique_user",
            ),
            models.UniqueConstraint(
                fields=["approval", "api_key_name"],
                condition=Q(user__isnull=True),
                name="approval_vote_unique_key",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.reviewer}: {self.decision}"
