"""Step transitions: admission, claim, completion, failure, retries, leases, child runs.

Every transition is a compare-and-set under the run's row lock (`run_locked`). A worker's
claim and its report carry the step's dispatch token and attempt number, so a message that
was re-dispatched, or a worker that was paused past its lease, cannot overwrite a newer
attempt. Attempts are counted in the database, per step, so a step that kills its worker
every time ends after its attempts instead of being redelivered forever.
"""

from __future__ import annotations

import logging
import random
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from jobs.dispatch import Dispatch
from jobs.events import publish_live_on_commit
from jobs.models import AttemptOutcome, StepAttempt, StepRun, StepStatus
from jobs.selectors import workflow_version_for
from jobs.steps import registry
from jobs.transitions import sql
from jobs.transitions.runs import (
    RunError,
    run_advance,
    run_create,
    step_fail_final,
    step_settle_from_child,
)
from jobs.transitions.txn import (
    RunTxn,
    attempt_close,
    definition_for,
    dispatch_of,
    run_from_row,
    run_locked,
    run_pk_of,
    skips_busy_runs,
    step_lock,
)
from jobs.wakeups import wake_after_commit
from tenants.quotas import usage_day

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claim:
    step_run_id: int
    run_public_id: uuid.UUID
    tenant_id: int
    step_id: str
    map_index: int | None
    kind: str
    attempt: int
    dispatch_token: uuid.UUID
    input: dict[str, Any]
    deadline: datetime
    run_pk: int = 0  # the run's row: the report locks it without looking it up
    max_attempts: int = 1
    workflow_version_id: int = 0
    # Until when the attempt is this worker's: a report refused for a transient reason (a lock
    # timeout, a session ended by the idle-in-transaction timeout) is retried until then.
    lease_expires_at: datetime | None = None

    @property
    def idempotency_key(self) -> str:
        suffix = "" if self.map_index is None else f"[{self.map_index}]"
        return f"{self.run_public_id}:{self.step_id}{suffix}"


def steps_admit(*, step_run_ids: list[int]) -> list[Dispatch]:
    """ready → queued, with fresh dispatch tokens, for the scheduler's admission: one
    statement (`switchyard_steps_admit`, the one writer of this transition). A run that
    another transaction holds right now (a worker claiming or reporting one of its steps, or a
    stalled one) is skipped, not waited for: its steps stay ready for the next cycle. Waiting
    there could meet a child run's completion (child, then parent) in a deadlock, and would
    let one stalled worker stop admission for every tenant. Messages are published after the
    commit by the caller (the scheduler publishes its batch itself).
    """
    if not step_run_ids:
        return []
    admitted = sql.steps_admit(step_run_ids=step_run_ids)
    for logged in admitted["events"]:
        publish_live_on_commit(logged["run"], logged["events"])
    return [dispatch_of(row, row["tenant_id"]) for row in admitted["dispatches"]]


def step_admit(*, step_run_id: int) -> Dispatch | None:
    """`steps_admit` of one step (operators' tools and tests); None if it was not admitted."""
    dispatches = steps_admit(step_run_ids=[step_run_id])
    return dispatches[0] if dispatches else None


@skips_busy_runs(False)
def step_hold(*, step_run_id: int, reason: str) -> bool:
    """Note in the run's log, once per reason, why a ready step is being held back."""
    run_pk = run_pk_of(step_run_id)
    if run_pk is None:
        return False
    with run_locked(run_pk, skip_locked=True) as txn:
        updated = (
            StepRun.objects.filter(pk=step_run_id, status=StepStatus.READY)
            .exclude(held_reason=reason)
            .update(held_reason=reason)
        )
        if updated:
            txn.log.add("step.held", step=StepRun.objects.get(pk=step_run_id), reason=reason)
        return bool(updated)


@skips_busy_runs(None)
def step_redispatch(*, step_run_id: int, stale_before: datetime) -> Dispatch | None:
    """A queued step whose message may be lost (crash before publish, purged queue) gets a
    new token; a late delivery of the old message is then refused at claim."""
    run_pk = run_pk_of(step_run_id)
    if run_pk is None:
        return None
    with run_locked(run_pk, skip_locked=True) as txn:
        token = uuid.uuid4()
        updated = StepRun.objects.filter(
            pk=step_run_id, status=StepStatus.QUEUED, dispatched_at__lt=stale_before
        ).update(dispatch_token=token, dispatched_at=timezone.now())
        if not updated:
            return None
        step = StepRun.objects.get(pk=step_run_id)
        txn.log.add("step.redispatched", step=step, queue=step.queue)
        return Dispatch.of(step)


@skips_busy_runs(False)
def step_release_retry(*, step_run_id: int) -> bool:
    """retry_wait → ready once its retry time has come."""
    run_pk = run_pk_of(step_run_id)
    if run_pk is None:
        return False
    with run_locked(run_pk, skip_locked=True) as txn:
        now = timezone.now()
        updated = StepRun.objects.filter(
            pk=step_run_id, status=StepStatus.RETRY_WAIT, retry_at__lte=now
        ).update(status=StepStatus.READY, ready_at=now, retry_at=None)
        if updated:
            step = StepRun.objects.get(pk=step_run_id)
            txn.log.add("step.ready", step=step, retry=True)
            txn.ready.append(step)
        return bool(updated)


@skips_busy_runs(False)
def step_expire_lease(*, step_run_id: int) -> bool:
    """A running step whose lease ran out (its worker died, hung or overran `timeout_s`):
    the attempt is lost, and the step retries or fails by its policy."""
    run_pk = run_pk_of(step_run_id)
    if run_pk is None:
        return False
    with run_locked(run_pk, skip_locked=True) as txn:
        step = step_lock(txn, step_run_id)
        now = timezone.now()
        if step.status != StepStatus.RUNNING or step.lease_expires_at is None:
            return False
        if step.lease_expires_at >= now:
            return False
        error = (
            f"attempt {step.attempt} did not finish within its lease "
            f"(timeout {step.timeout_s:g}s): the worker died, hung or the step timed out"
        )
        attempt_close(step, AttemptOutcome.LOST, error=error, code="timeout")
        _after_failed_attempt(txn, step, error=error, code="timeout", retryable=True)
        return True


def step_claim(*, step_run_id: int, dispatch_token: str, worker: str) -> Claim | None:
    """queued → running for the holder of the current dispatch token; None to drop the message.

    One statement (`switchyard_step_claim`). A redelivered message whose step is still
    `running` under the same token means the worker that had it died (SIGKILL, OOM): that
    attempt is recorded as lost and counts against the step's attempts (`_step_requeue_lost`),
    so a poison step ends instead of looping; otherwise the step is claimed again.
    """
    token = uuid.UUID(str(dispatch_token))
    grace_s = settings.SWITCHYARD_LEASE_GRACE_S
    claimed = sql.step_claim(step_run_id=step_run_id, token=token, worker=worker, grace_s=grace_s)
    if claimed["outcome"] == "lost" and _step_requeue_lost(
        run_pk=claimed["run_pk"], step_run_id=step_run_id, token=token
    ):
        claimed = sql.step_claim(
            step_run_id=step_run_id, token=token, worker=worker, grace_s=grace_s
        )
    if claimed["outcome"] != "claimed":
        return None
    publish_live_on_commit(claimed["run_public_id"], claimed["events"])
    if claimed["wake"]:
        wake_after_commit()
    started_at = sql.parse_time(claimed["started_at"])
    return Claim(
        run_pk=claimed["run_pk"],
        step_run_id=step_run_id,
        run_public_id=uuid.UUID(claimed["run_public_id"]),
        tenant_id=claimed["tenant_id"],
        step_id=claimed["step_id"],
        map_index=claimed["map_index"],
        kind=claimed["kind"],
        attempt=claimed["attempt"],
        max_attempts=claimed["max_attempts"],
        workflow_version_id=claimed["workflow_version_id"],
        dispatch_token=token,
        input=claimed["input"],
        deadline=started_at + timedelta(seconds=claimed["timeout_s"]),
        lease_expires_at=sql.parse_time(claimed["lease_expires_at"]),
    )


def _step_requeue_lost(*, run_pk: int, step_run_id: int, token: uuid.UUID) -> bool:
    """running → queued under the same token, because the worker running it was lost: the
    attempt is closed as lost; a step whose attempts are spent fails instead (False)."""
    with run_locked(run_pk) as txn:
        step = step_lock(txn, step_run_id)
        if step.status != StepStatus.RUNNING or step.dispatch_token != token:
            return False
        error = f"worker {step.worker or '?'} was lost while running attempt {step.attempt}"
        attempt_close(step, AttemptOutcome.LOST, error=error, code="worker_lost")
        txn.log.add("step.attempt_lost", step=step, attempt=step.attempt, error=error)
        if step.attempt >= step.max_attempts:
            message = (
                f"the worker running this step was lost on each of its "
                f"{step.attempt} attempts (the step may crash its worker)"
            )
            step_fail_final(txn, step, error=message, code="worker_lost")
            return False
        StepRun.objects.filter(pk=step.pk).update(status=StepStatus.QUEUED)
        return True


def step_fenced(txn: RunTxn, claim: Claim, *, reported: str) -> StepRun | None:
    """The step if `claim` still holds it; else record the refusal and return None."""
    step = step_lock(txn, claim.step_run_id)
    if (
        step.status == StepStatus.RUNNING
        and step.dispatch_token == claim.dispatch_token
        and step.attempt == claim.attempt
    ):
        return step
    StepAttempt.objects.filter(
        step_run=step, number=claim.attempt, outcome=AttemptOutcome.LOST
    ).update(outcome=AttemptOutcome.REFUSED)
    if not txn.run.is_final:
        # A final run's log ends with its final event (streams end there); the refusal of a
        # report that arrives later is kept on the attempt (outcome `refused`) and logged.
        txn.log.add(
            "step.result_refused",
            step=step,
            attempt=claim.attempt,
            reported=reported,
            reason=f"the step is now {step.status} at attempt {step.attempt}",
        )
    log.warning("refused late %s of %s attempt %s", reported, step, claim.attempt)
    return None


def step_complete(*, claim: Claim, output: Any) -> bool:
    """Checkpoint a step's output and advance the graph, in one transaction (`_report`)."""
    tokens = 0
    if claim.kind == "llm" and isinstance(output, dict):
        tokens = int((output.get("usage") or {}).get("total_tokens") or 0)
    return _report(
        claim,
        reported="success",
        status=StepStatus.SUCCEEDED,
        outcome=AttemptOutcome.SUCCEEDED,
        output=output,
        event={"type": "step.succeeded", "data": {"attempt": claim.attempt}},
        llm_tokens=tokens,
    )


@dataclass(frozen=True)
class _AfterFailure:
    """What a failed attempt leads to, by the step's retry policy."""

    retry_at: datetime | None  # None: the step fails
    delay_s: float
    step_error: str  # the step's error (a final failure says after how many attempts)

    def retrying_data(self, *, attempt: int, error: str, code: str) -> dict[str, Any]:
        return {
            "attempt": attempt,
            "error": error,
            "code": code,
            "retry_at": self.retry_at.isoformat() if self.retry_at else None,
            "delay_s": round(self.delay_s, 3),
        }


def _after_failure(
    *,
    version_pk: int,
    step_id: str,
    map_index: int | None,
    attempt: int,
    max_attempts: int,
    error: str,
    code: str,
    retryable: bool,
) -> _AfterFailure:
    step_def = definition_for(version_pk).step(step_id)
    # A map's item retries by the map's inner step; an agent's children by the agent's policy.
    policy = step_def.item.retry if map_index is not None and step_def.is_map else step_def.retry
    fatal = not retryable or code in policy.non_retryable
    if not fatal and attempt < max_attempts:
        delay = policy.delay_before_retry(attempt, random.random())
        return _AfterFailure(timezone.now() + timedelta(seconds=delay), delay, error)
    return _AfterFailure(None, 0.0, error if fatal else f"{error} (after {attempt} attempts)")


def step_fail(*, claim: Claim, error: str, code: str, retryable: bool) -> bool:
    """Record a failed attempt; retry later (in the database) or fail the step."""
    after = _after_failure(
        version_pk=claim.workflow_version_id,
        step_id=claim.step_id,
        map_index=claim.map_index,
        attempt=claim.attempt,
        max_attempts=claim.max_attempts,
        error=error,
        code=code,
        retryable=retryable,
    )
    if after.retry_at is not None:
        return _report(
            claim,
            reported="failure",
            status=StepStatus.RETRY_WAIT,
            outcome=AttemptOutcome.FAILED,
            error=error,
            code=code,
            retry_at=after.retry_at,
            event={
                "type": "step.retrying",
                "data": after.retrying_data(attempt=claim.attempt, error=error, code=code),
            },
        )
    return _report(
        claim,
        reported="failure",
        status=StepStatus.FAILED,
        outcome=AttemptOutcome.FAILED,
        error=error,
        step_error=after.step_error,
        code=code,
        event={
            "type": "step.failed",
            "data": {"attempt": claim.attempt, "error": after.step_error, "code": code},
        },
    )


def _after_failed_attempt(
    txn: RunTxn, step: StepRun, *, error: str, code: str, retryable: bool
) -> None:
    """The ORM form of a failed attempt's outcome, for transitions that hold the step's row
    (a lease that expired)."""
    after = _after_failure(
        version_pk=txn.run.workflow_version_id,
        step_id=step.step_id,
        map_index=step.map_index,
        attempt=step.attempt,
        max_attempts=step.max_attempts,
        error=error,
        code=code,
        retryable=retryable,
    )
    if after.retry_at is None:
        step_fail_final(txn, step, error=after.step_error, code=code)
        return
    step.status = StepStatus.RETRY_WAIT
    step.retry_at = after.retry_at
    step.error = error
    step.error_code = code
    step.lease_expires_at = None
    step.save(update_fields=["status", "retry_at", "error", "error_code", "lease_expires_at"])
    txn.log.add(
        "step.retrying",
        step=step,
        **after.retrying_data(attempt=step.attempt, error=error, code=code),
    )


def _report(
    claim: Claim,
    *,
    reported: str,
    status: str,
    outcome: str,
    event: dict[str, Any],
    output: Any = None,
    error: str = "",
    step_error: str | None = None,
    code: str = "",
    retry_at: datetime | None = None,
    llm_tokens: int = 0,
) -> bool:
    """A worker's report, in one transaction of at most two statements: the compare-and-set
    that checkpoints the attempt (`switchyard_step_report`), then, when the step ended, the
    engine's advance with the direct admission of what became ready (`run_advance`). A late
    report (the step was taken over) is refused and recorded; returns False then."""
    now = timezone.now()
    with transaction.atomic():
        reported_row = sql.step_report(
            step_run_id=claim.step_run_id,
            run_pk=claim.run_pk,
            token=claim.dispatch_token,
            attempt=claim.attempt,
            reported=reported,
            status=status,
            outcome=outcome,
            output=output,
            error=error,
            step_error=error if step_error is None else step_error,
            code=code,
            retry_at=retry_at,
            event=event,
            llm_tokens=llm_tokens,
            day=usage_day(now),
        )
        publish_live_on_commit(claim.run_public_id, reported_row["events"])
        if reported_row["outcome"] == "refused":
            log.warning(
                "refused late %s of step run %s attempt %s (now %s at attempt %s)",
                reported,
                claim.step_run_id,
                claim.attempt,
                reported_row["status"],
                reported_row["attempt"],
            )
            return False
        run = run_from_row(reported_row["run"])
        with run_locked(run.pk, locked=run) as txn:
            # A slot of this tenant and queue is free: its next ready steps take it, else the
            # scheduler matters if steps wait.
            txn.freed = registry.kind(claim.kind).queue
            if reported_row["steps"] is None:
                txn.log.wake_scheduler(only_if_ready=True)
            else:
                rows = [tuple(row) for row in reported_row["steps"]]
                run_advance(txn, rows=rows, wake="if_ready")
    return True


def step_park_waiting(txn: RunTxn, step: StepRun, **event: Any) -> None:
    """A claimed step that waits on something outside the workers (a child run, people) ends
    its attempt and parks in `waiting`, holding no worker and no lease; `step.waiting` is
    logged with `event`. Call inside the run's `run_locked`, holding the fenced step."""
    attempt_close(step, AttemptOutcome.SUCCEEDED)
    step.status = StepStatus.WAITING
    step.lease_expires_at = None
    step.save(update_fields=["status", "lease_expires_at"])
    txn.log.add("step.waiting", step=step, **event)


def step_start_child_run(*, claim: Claim) -> bool:
    """Start the child run of a `workflow` step and park the step in `waiting`, atomically."""
    with run_locked(claim.run_pk) as txn:
        step = step_fenced(txn, claim, reported="child start")
        if step is None:
            return False
        config = claim.input
        version = workflow_version_for(
            tenant=txn.run.tenant, name=config["workflow"], version=config.get("version")
        )
        if version is None:
            attempt_close(step, AttemptOutcome.FAILED, error="unknown workflow")
            step_fail_final(
                txn, step, error=f"unknown workflow {config['workflow']!r}", code="unknown_workflow"
            )
            return True
        try:
            child = run_create(
                tenant=txn.run.tenant,
                version=version,
                input=config.get("input") or {},
                lane=txn.run.lane,
                parent_step=step,
            )
        except RunError as exc:
            detail = "; ".join(str(fault) for fault in exc.faults) or exc.message
            attempt_close(step, AttemptOutcome.FAILED, error=detail, code=exc.code)
            step_fail_final(txn, step, error=f"child run refused: {detail}", code=exc.code)
            return True
        step_park_waiting(txn, step, child_run=str(child.public_id))
        child.refresh_from_db()
        if child.is_final:  # e.g. every step of the child was skipped
            step_settle_from_child(child=child)
        else:
            run_advance(txn)
        return True
