"""Approvals: every state change of a human decision, from the request to its outcome.

Lifecycle (docs/approvals.md):

1. `step_request_approval`, by the control worker that claimed an `approval` step: creates the
   `Approval` as rendered, parks the step in `waiting` (no worker, no thread holds it while
   people think), logs `approval.requested` and queues the tenant's approval webhook, in one
   transaction.
2. `approval_decide`, by a reviewer (inbox) or an API key (API): records a vote; the first
   rejection, or the `required_approvals`-th approval from distinct reviewers, decides. The
   decision settles the step (`succeeded` with the decision as output, or `failed` on a
   rejection when `on_reject` is `fail`) and advances the graph.
3. `approvals_expire_due` / `approvals_escalate_due`, by every scheduler cycle: apply
   `on_timeout` at `due_at`; open the request to `escalate_to` at `escalate_at`.
4. `approvals_cancel_for_step`, when the run is cancelled or fails elsewhere.

Every transition holds the run's row lock (`run_locked`), then the approval's, and leaves
`pending` by a compare-and-set: two reviewers deciding at once, or a decision racing the
deadline, produce exactly one outcome, and the loser gets an `ApprovalError` that says what
happened. A decided approval is never written again.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.urls import reverse
from django.utils import timezone

from approvals import kind
from approvals.models import Approval, ApprovalDecision, ApprovalStatus, ApprovalVote
from jobs.events import READY_CHANNEL, publish_inbox
from jobs.formats import iso
from jobs.models import (
    WEBHOOK_OPEN,
    StepRun,
    StepStatus,
    WebhookDelivery,
    WebhookStatus,
)
from jobs.transitions.runs import run_advance, step_fail_final, step_succeed_waiting
from jobs.transitions.steps import Claim, step_fenced, step_park_waiting
from jobs.transitions.txn import (
    RunTxn,
    definition_of,
    run_locked,
    skips_busy_runs,
    step_lock,
)

log = logging.getLogger(__name__)


class ApprovalError(Exception):
    """A refused decision. `code`: `not_pending` (decided, expired or cancelled already),
    `already_voted`, `invalid_decision` or `invalid_data` (then `faults` names the fields)."""

    def __init__(self, message: str, *, code: str, faults: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.faults = faults or []


@dataclass(frozen=True)
class Reviewer:
    """Who decides: a user of the inbox or an API key of the tenant (by its name)."""

    name: str
    user_id: int | None = None
    api_key_name: str = ""

    @classmethod
    def for_user(cls, user: Any) -> Reviewer:
        return cls(name=user.get_username(), user_id=user.pk)

    @classmethod
    def for_api_key(cls, api_key: Any) -> Reviewer:
        return cls(name=f"api key {api_key.name}", api_key_name=api_key.name)


@dataclass
class _Outcome:
    status: str
    decision: str  # approve / reject, or "" when the step fails on timeout
    decided_by: str
    comment: str
    data: Any
    reviewers: list[str] = field(default_factory=list)
    timed_out: bool = False


# --- the request (control worker) ------------------------------------------------------------


def step_request_approval(*, claim: Claim) -> Approval | None:
    """Create the approval of a claimed `approval` step and park the step in `waiting`.

    Returns None when the claim no longer holds the step (it was re-dispatched or cancelled).
    """
    with run_locked(claim.run_pk) as txn:
        step = step_fenced(txn, claim, reported="approval request")
        if step is None:
            return None
        step_def = definition_of(txn.run.workflow_version).step(step.step_id)
        if step.map_index is not None and step_def.is_map:
            step_def = step_def.item
        config = claim.input
        form = config.get("form") or {}
        now = timezone.now()
        deadline = step_def.timeout_s
        escalate_after = config.get("escalate_after_s")
        approval = Approval.objects.create(
            step_run=step,
            attempt=step.attempt,
            run=txn.run,
            tenant_id=txn.run.tenant_id,
            prompt=config["prompt"],
            context=config.get("context") or {},
            form_schema=form.get("schema"),
            form_values=form.get("values") or {},
            reviewers=config.get("reviewers", kind.DEFAULT_REVIEWERS),
            escalate_to=config.get("escalate_to", ""),
            escalate_at=now + timedelta(seconds=escalate_after) if escalate_after else None,
            required_approvals=config.get("required_approvals", 1),
            due_at=now + timedelta(seconds=deadline) if deadline else None,
            on_timeout=config.get("on_timeout", "reject") if deadline else "",
            on_reject=config.get("on_reject", "fail"),
        )
        step_park_waiting(txn, step, approval=str(approval.public_id))
        txn.log.add(
            "approval.requested",
            step=step,
            approval=str(approval.public_id),
            reviewers=approval.reviewers,
            required_approvals=approval.required_approvals,
            due_at=iso(approval.due_at),
        )
        _webhook(approval, "approval.requested", now)
        _announce(approval, "approval.requested")
        run_advance(txn)
        return approval


# --- decisions (inbox, API) ------------------------------------------------------------------


def approval_decide(
    *,
    approval: Approval,
    reviewer: Reviewer,
    decision: str,
    comment: str = "",
    data: dict[str, Any] | None = None,
) -> Approval:
    """Record `reviewer`'s decision; decide the approval when it is the deciding vote.

    The caller has checked that `reviewer` may decide (`approvals.access`). `data` is the
    reviewer's edits of the form (approvals only): the pre-filled values with every approving
    reviewer's edits applied must fit the form's schema. Raises ApprovalError.
    """
    if decision not in ApprovalDecision.values:
        raise ApprovalError(
            f"decision must be 'approve' or 'reject', got {decision!r}", code="invalid_decision"
        )
    if data is not None and not isinstance(data, dict):
        raise ApprovalError(
            "data must be an object of the form's fields",
            code="invalid_data",
            faults=[("$", "must be an object")],
        )
    with run_locked(approval.run_id) as txn:
        locked = Approval.objects.select_for_update().get(pk=approval.pk)
        if locked.status != ApprovalStatus.PENDING:
            raise ApprovalError(closed_message(locked), code="not_pending")
        votes = list(locked.votes.order_by("at", "id"))
        if any(_same_reviewer(vote, reviewer) for vote in votes):
            missing = locked.required_approvals - _approvals(votes)
            raise ApprovalError(
                f"{reviewer.name} has already approved this request; it needs {missing} more "
                f"approval{'s' if missing != 1 else ''} from other reviewers",
                code="already_voted",
            )
        now = timezone.now()
        merged = None
        if decision == ApprovalDecision.APPROVE:
            edits = [vote.data for vote in votes if vote.decision == ApprovalDecision.APPROVE]
            if locked.form_schema is not None:
                merged = kind.merged_form_data(locked.form_values, [*edits, data])
            proposed = merged if locked.form_schema is not None else data
            faults = kind.form_data_faults(locked.form_schema, proposed)
            if faults:
                listed = "; ".join(f"{path}: {message}" for path, message in faults[:5])
                raise ApprovalError(
                    f"the form does not fit its schema: {listed}",
                    code="invalid_data",
                    faults=faults,
                )
        vote = ApprovalVote.objects.create(
            approval=locked,
            user_id=reviewer.user_id,
            api_key_name=reviewer.api_key_name,
            reviewer=reviewer.name,
            decision=decision,
            comment=comment,
            data=data,
            at=now,
        )
        votes.append(vote)
        step = step_lock(txn, locked.step_run_id)
        txn.log.add(
            "approval.voted",
            step=step,
            approval=str(locked.public_id),
            decision=decision,
            by=reviewer.name,
            approvals=_approvals(votes),
            required_approvals=locked.required_approvals,
        )
        names = [vote.reviewer for vote in votes]
        if decision == ApprovalDecision.REJECT:
            outcome = _Outcome(
                status=ApprovalStatus.REJECTED,
                decision=ApprovalDecision.REJECT,
                decided_by=reviewer.name,
                comment=comment,
                data=locked.form_values if locked.form_schema is not None else {},
                reviewers=names,
            )
        elif _approvals(votes) >= locked.required_approvals:
            approvers = [v.reviewer for v in votes if v.decision == ApprovalDecision.APPROVE]
            outcome = _Outcome(
                status=ApprovalStatus.APPROVED,
                decision=ApprovalDecision.APPROVE,
                decided_by=", ".join(approvers),
                comment=comment,
                data=merged if merged is not None else {},
                reviewers=names,
            )
        else:
            _announce(locked, "approval.voted")
            return locked
        _settle(txn, locked, step, outcome, now, event="approval.decided")
        return locked


def closed_message(approval: Approval) -> str:
    """Why a request can no longer be decided, for the reviewer who tried."""
    when = approval.decided_at.strftime("%Y-%m-%d %H:%M UTC") if approval.decided_at else ""
    if approval.status == ApprovalStatus.APPROVED:
        return f"this request was already approved by {approval.decided_by} at {when}"
    if approval.status == ApprovalStatus.REJECTED:
        return f"this request was already rejected by {approval.decided_by} at {when}"
    if approval.status == ApprovalStatus.EXPIRED:
        return (
            f"this request expired at {when} without a decision; its on_timeout "
            f"({approval.on_timeout}) was applied"
        )
    if approval.status == ApprovalStatus.CANCELLED:
        return f"this request was withdrawn at {when}: {approval.comment}"
    return f"this request is {approval.status}"


def _same_reviewer(vote: ApprovalVote, reviewer: Reviewer) -> bool:
    if reviewer.user_id is not None:
        return vote.user_id == reviewer.user_id
    return vote.user_id is None and vote.api_key_name == reviewer.api_key_name


def _approvals(votes: list[ApprovalVote]) -> int:
    return sum(vote.decision == ApprovalDecision.APPROVE for vote in votes)


def _settle(
    txn: RunTxn, approval: Approval, step: StepRun, outcome: _Outcome, now: datetime, *, event: str
) -> None:
    """Close the approval (once) and settle its waiting step; the graph advances."""
    approval.status = outcome.status
    approval.decision = outcome.decision
    approval.decided_at = now
    approval.decided_by = outcome.decided_by
    approval.comment = outcome.comment
    approval.data = outcome.data
    approval.save(
        update_fields=["status", "decision", "decided_at", "decided_by", "comment", "data"]
    )
    data: dict[str, Any] = {
        "approval": str(approval.public_id),
        "status": outcome.status,
        "decision": outcome.decision or None,
        "by": outcome.decided_by,
    }
    if outcome.comment:
        data["comment"] = outcome.comment
    if event == "approval.expired":
        data["on_timeout"] = approval.on_timeout
    txn.log.add(event, step=step, **data)
    _announce(approval, event)
    if step.status != StepStatus.WAITING:  # cannot happen while the approval was pending
        log.error("approval %s settled while its step was %s", approval.public_id, step.status)
        return
    approved = outcome.decision == ApprovalDecision.APPROVE
    output = kind.decision_output(
        approved=approved,
        decision=outcome.decision or "fail",
        comment=outcome.comment,
        reviewers=outcome.reviewers,
        data=outcome.data,
        timed_out=outcome.timed_out,
    )
    fails = outcome.decision == "" or (not approved and approval.on_reject == "fail")
    if not fails:
        txn.log.wake_scheduler()
        step_succeed_waiting(txn, step, output=output, approval=str(approval.public_id))
        return
    if outcome.timed_out:
        error, code = outcome.comment, "approval_timeout"
    else:
        said = f": {outcome.comment}" if outcome.comment else " (no comment)"
        error, code = f"rejected by {outcome.decided_by}{said}", "rejected"
    step_fail_final(txn, step, error=error, code=code, output=output)


# --- the scheduler's sweeps ------------------------------------------------------------------


def approvals_expire_due(*, now: datetime | None = None) -> int:
    """Apply `on_timeout` to every pending approval past its `due_at`; how many expired.

    Called once per scheduler cycle (several schedulers may call it at once). `now` is the
    clock (tests pass a later one).
    """
    now = now or timezone.now()
    due = Approval.objects.filter(status=ApprovalStatus.PENDING, due_at__lte=now)
    ids = list(due.order_by("due_at").values_list("id", flat=True)[: _batch()])
    return sum(approval_expire(approval_id=approval_id, now=now) for approval_id in ids)


@skips_busy_runs(False)
def approval_expire(*, approval_id: int, now: datetime | None = None) -> bool:
    """pending → expired at `due_at`, with `on_timeout` applied to the step."""
    now = now or timezone.now()
    run_pk = Approval.objects.filter(pk=approval_id).values_list("run_id", flat=True).first()
    if run_pk is None:
        return False
    with run_locked(run_pk, skip_locked=True) as txn:
        approval = Approval.objects.select_for_update().get(pk=approval_id)
        if not approval.is_pending or approval.due_at is None or approval.due_at > now:
            return False
        step = step_lock(txn, approval.step_run_id)
        rule = approval.on_timeout or "reject"
        waited = _duration(approval.due_at - approval.created_at)
        votes = list(approval.votes.order_by("at", "id"))
        outcome = _Outcome(
            status=ApprovalStatus.EXPIRED,
            decision={"approve": "approve", "reject": "reject"}.get(rule, ""),
            decided_by="timeout",
            comment=f"no decision within {waited} (on_timeout: {rule})",
            data=approval.form_values if approval.form_schema is not None else {},
            reviewers=[vote.reviewer for vote in votes],
            timed_out=True,
        )
        _settle(txn, approval, step, outcome, now, event="approval.expired")
        return True


def approvals_escalate_due(*, now: datetime | None = None) -> int:
    """Open every pending approval past its `escalate_at` to its `escalate_to` group."""
    now = now or timezone.now()
    due = Approval.objects.filter(
        status=ApprovalStatus.PENDING, escalated=False, escalate_at__lte=now
    )
    ids = list(due.order_by("escalate_at").values_list("id", flat=True)[: _batch()])
    return sum(approval_escalate(approval_id=approval_id, now=now) for approval_id in ids)


@skips_busy_runs(False)
def approval_escalate(*, approval_id: int, now: datetime | None = None) -> bool:
    now = now or timezone.now()
    run_pk = Approval.objects.filter(pk=approval_id).values_list("run_id", flat=True).first()
    if run_pk is None:
        return False
    with run_locked(run_pk, skip_locked=True) as txn:
        updated = Approval.objects.filter(
            pk=approval_id,
            status=ApprovalStatus.PENDING,
            escalated=False,
            escalate_at__lte=now,
        ).update(escalated=True, escalated_at=now)
        if not updated:
            return False
        approval = Approval.objects.get(pk=approval_id)
        step = StepRun.objects.get(pk=approval.step_run_id)
        txn.log.add(
            "approval.escalated",
            step=step,
            approval=str(approval.public_id),
            to=approval.escalate_to,
            reviewers=approval.reviewers,
        )
        _webhook(approval, "approval.escalated", now)
        _announce(approval, "approval.escalated")
        return True


def _batch() -> int:
    return settings.SWITCHYARD_SCHEDULER_BATCH


def _duration(delta: timedelta) -> str:
    seconds = round(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


# --- cancellation (run_cancel, a failing run) ------------------------------------------------


def approvals_cancel_for_step(*, txn: RunTxn, step: StepRun, reason: str) -> int:
    """Withdraw the pending approval of a cancelled step. Call inside the run's `run_locked`."""
    now = timezone.now()
    cancelled = 0
    for approval in Approval.objects.select_for_update().filter(
        step_run=step, status=ApprovalStatus.PENDING
    ):
        approval.status = ApprovalStatus.CANCELLED
        approval.decided_at = now
        approval.comment = reason
        approval.save(update_fields=["status", "decided_at", "comment"])
        txn.log.add(
            "approval.cancelled", step=step, approval=str(approval.public_id), reason=reason
        )
        _announce(approval, "approval.cancelled")
        cancelled += 1
    return cancelled


# --- notification ----------------------------------------------------------------------------


def _absolute(path: str) -> str:
    return settings.SWITCHYARD_PUBLIC_URL.rstrip("/") + path


def approval_links(approval: Approval) -> dict[str, str]:
    """Absolute URLs of an approval: its inbox page, its API resource and decision endpoint."""
    return {
        "inbox": _absolute(reverse("inbox:detail", kwargs={"approval_id": approval.public_id})),
        "self": _absolute(
            reverse("approvals-api:approval-detail", kwargs={"approval_id": approval.public_id})
        ),
        "decision": _absolute(
            reverse("approvals-api:approval-decision", kwargs={"approval_id": approval.public_id})
        ),
    }


def approval_webhook_payload(
    approval: Approval, *, event_id: uuid.UUID, event_type: str, at: datetime
) -> dict[str, Any]:
    """The body of an approval webhook (docs/approvals.md): the request and its links."""
    run = approval.run
    step = approval.step_run
    return {
        "id": str(event_id),
        "type": event_type,
        "created_at": at.isoformat(),
        "approval": {
            "id": str(approval.public_id),
            "status": approval.status,
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
            "created_at": iso(approval.created_at),
            "due_at": iso(approval.due_at),
            "run": str(run.public_id),
            "workflow": run.workflow_version.workflow.name,
            "step": step.step_id,
            "map_index": step.map_index,
            "links": approval_links(approval),
        },
    }


def _webhook(approval: Approval, event_type: str, now: datetime) -> WebhookDelivery | None:
    """Queue the tenant's approval webhook, if it has one (delivered like run webhooks)."""
    url = approval.tenant.approval_webhook_url
    if not url:
        return None
    event_id = uuid.uuid4()
    body = approval_webhook_payload(approval, event_id=event_id, event_type=event_type, at=now)
    delivery = WebhookDelivery.objects.create(
        event_id=event_id,
        run=approval.run,
        tenant_id=approval.tenant_id,
        event_type=event_type,
        url=url,
        payload=json.dumps(body, separators=(",", ":"), default=str),
        next_attempt_at=now,
    )
    with connection.cursor() as cursor:  # wakes the scheduler's sweep, on commit only
        cursor.execute("SELECT pg_notify(%s, '')", [READY_CHANNEL])
    return delivery


# Open approval webhooks (pending, or failed with another attempt due) about a request that is
# no longer pending, locked unless a delivery worker holds them.
_MOOT_NOTIFICATIONS = """
WITH moot AS (
    SELECT d.id FROM jobs_webhookdelivery d
    JOIN jobs_approval a ON a.public_id = ((d.payload::jsonb) -> 'approval' ->> 'id')::uuid
    WHERE d.status = ANY(%(open)s) AND d.event_type LIKE 'approval.%%'
      AND a.status <> %(pending)s
    ORDER BY d.id LIMIT %(batch)s
    FOR UPDATE OF d SKIP LOCKED
)
UPDATE jobs_webhookdelivery d
SET status = %(gave_up)s, next_attempt_at = NULL, finished_at = %(now)s,
    last_error = 'withdrawn: the approval was decided, expired or cancelled before delivery'
FROM moot WHERE d.id = moot.id
"""


def approval_notifications_withdraw(*, now: datetime | None = None, batch: int) -> int:
    """Give up (at most `batch`) approval webhooks still to be delivered about requests that
    are no longer pending: a request that expired or was decided while its notification kept
    failing is not announced late. One short transaction; returns how many were given up.
    Called by the housekeeping (`maintenance.housekeeping`)."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            _MOOT_NOTIFICATIONS,
            {
                "open": [str(status) for status in WEBHOOK_OPEN],
                "pending": str(ApprovalStatus.PENDING),
                "batch": batch,
                "gave_up": str(WebhookStatus.GAVE_UP),
                "now": now or timezone.now(),
            },
        )
        return cursor.rowcount


def _announce(approval: Approval, change_type: str) -> None:
    """After commit, tell the open inboxes of the approval's tenant (a hint to re-read)."""
    tenant_public_id = approval.tenant.public_id
    change = {
        "type": change_type,
        "approval": str(approval.public_id),
        "status": approval.status,
        "tenant": approval.tenant.slug,
    }
    transaction.on_commit(lambda: publish_inbox(tenant_public_id, change))
