"""Helpers for approval tests: reviewers, workflows with an approval, and the worker's part
(admit, claim, request) done in this process for tests that need no broker."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model

from approvals.models import Approval
from approvals.services import Reviewer, step_request_approval
from jobs.models import Run, StepRun, StepStatus
from jobs.transitions.steps import step_claim, step_complete
from tenants.models import Membership, Role
from tests.support.workflows import dispatch_token_of

PASSWORD = "correct horse battery staple"

REFUND_FORM = {
    "schema": {
        "type": "object",
        "required": ["amount", "reply"],
        "properties": {
            "amount": {"type": "number", "minimum": 0, "maximum": 500},
            "reply": {"type": "string", "minLength": 5, "description": "Sent to the customer."},
        },
        "additionalProperties": False,
    },
    "values": {
        "amount": "{{ input.amount }}",
        "reply": "Dear {{ input.customer }}, we refund {{ input.amount }} EUR.",
    },
}


def refund_workflow(name: str = "refund", **review: Any) -> dict[str, Any]:
    """quote (echo) → review (approval) → send (echo of the decided reply); output: what was
    sent. `review` overrides fields of the approval step."""
    return {
        "name": name,
        "input_schema": {
            "type": "object",
            "required": ["customer", "amount"],
            "properties": {"customer": {"type": "string"}, "amount": {"type": "number"}},
        },
        "steps": [
            {
                "id": "quote",
                "kind": "tool",
                "tool": "echo",
                "args": {"amount": "{{ input.amount }}"},
            },
            {
                "id": "review",
                "kind": "approval",
                "after": ["quote"],
                "prompt": "Refund {{ input.amount }} EUR to {{ input.customer }}?",
                "context": {
                    "customer": "{{ input.customer }}",
                    "quote": "{{ steps.quote.output }}",
                },
                "form": REFUND_FORM,
                **review,
            },
            {
                "id": "send",
                "kind": "tool",
                "tool": "echo",
                "when": "steps.review.output.approved",
                "args": {
                    "reply": "{{ steps.review.output.data.reply }}",
                    "amount": "{{ steps.review.output.data.amount }}",
                },
            },
        ],
        "output": {
            "approved": "{{ steps.review.output.approved }}",
            "sent": "{{ steps.send.output.args }}",
            "comment": "{{ steps.review.output.comment }}",
        },
    }


def make_reviewer(username: str, tenant, *, role: str = Role.REVIEWER, groups=()):
    user = get_user_model().objects.create_user(username=username, password=PASSWORD)
    Membership.objects.create(user=user, tenant=tenant, role=role, groups=list(groups))
    return user


def as_reviewer(user) -> Reviewer:
    return Reviewer.for_user(user)


def run_ready_steps(run: Run) -> list[Approval]:
    """Do what the scheduler and the workers would with every ready step of `run`, in this
    process, until none is ready: echo tools complete with their args, approvals are
    requested. Returns the approvals requested."""
    requested = []
    while True:
        ready = list(
            StepRun.objects.filter(run=run, status__in=[StepStatus.READY, StepStatus.QUEUED])
            .exclude(kind="map")
            .order_by("id")
        )
        if not ready:
            return requested
        for step in ready:
            token = dispatch_token_of(step)
            claim = step_claim(step_run_id=step.pk, dispatch_token=token, worker="test")
            if claim.kind == "approval":
                requested.append(step_request_approval(claim=claim))
            else:
                step_complete(claim=claim, output={"args": claim.input.get("args", {})})
