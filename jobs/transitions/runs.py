"""Run transitions: creation (a submission, a child run), the graph's advance after every
step transition, a run's end, cancel, retry, and a step's final failure.

The engine (`jobs.engine`) decides; `run_advance` turns its plan into rows (`_Writes`) and
one statement writes them (`jobs.transitions.txn.apply_writes`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from jobs import engine
from jobs.definitions import Definition, Fault, validate_input
from jobs.dispatch import publish_after_commit
from jobs.events import publish_live_on_commit
from jobs.models import (
    Run,
    RunStatus,
    StepRun,
    StepStatus,
    WorkflowVersion,
)
from jobs.services.webhooks import webhook_delivery_create
from jobs.statuses import RUN_FINAL, STEP_FINAL
from jobs.steps import registry
from jobs.transitions import sql
from jobs.transitions.txn import (
    RunTxn,
    StepRow,
    admission_settings,
    apply_writes,
    definition_for,
    definition_of,
    dispatch_of,
    run_from_row,
    run_locked,
    run_pk_of,
    step_lock,
    step_rows,
)
from jobs.wakeups import wake_after_commit
from tenants.models import LANE_RANK, Lane, Tenant


class RunError(Exception):
    """A refused request on a run; `code` maps to the API's error envelope."""

    def __init__(self, message: str, *, code: str, faults: list[Fault] | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.faults = faults or []


@dataclass
class _Writes:
    """What one transaction writes for a run through `switchyard_run_apply` (its `p_plan`)."""

    events: list[dict[str, Any]] = field(default_factory=list)
    new_steps: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    admit: list[list[Any]] = field(default_factory=list)
    run: dict[str, Any] | None = None

    def event(self, type: str, key: engine.StepKey | None = None, **data: Any) -> None:
        step_id, index = key if key is not None else ("", None)
        self.events.append({"type": type, "step_id": step_id, "map_index": index, "data": data})

    def change(self, key: engine.StepKey, status: str, **fields: Any) -> None:
        self.steps.append({"step_id": key[0], "map_index": key[1], "status": status, **fields})

    def new_step(self, step_def, *, map_index: int | None) -> None:
        self.new_steps.append(
            {
                "step_id": step_def.id,
                "map_index": map_index,
                "kind": step_def.kind,
                "queue": step_def.queue,
                "max_attempts": step_def.retry.max_attempts,
                "timeout_s": _attempt_timeout(step_def),
            }
        )

    def new_child(self, agent_def, ready: engine.ReadyStep) -> None:
        """A row for a child of an agent (a turn or a tool call): its kind's queue, the
        agent's attempts per child, the default attempt timeout."""
        self.new_steps.append(
            {
                "step_id": ready.key[0],
                "map_index": ready.key[1],
                "kind": ready.kind,
                "queue": ready.queue,
                "max_attempts": agent_def.retry.max_attempts,
                "timeout_s": _default_timeout(),
            }
        )

    def plan(self) -> dict[str, Any]:
        return {
            "new_steps": self.new_steps,
            "steps": self.steps,
            "run": self.run,
            "events": self.events,
            "admit": self.admit,
        }

    def add_steps_of(self, definition: Definition, plan: engine.Plan) -> None:
        """The engine's plan as step rows and their events."""
        for map_id, items in plan.expanded:
            self.change((map_id, None), StepStatus.RUNNING, started=True)
            self.event("step.expanded", (map_id, None), items=len(items))
            for index in range(len(items)):
                self.new_step(definition.step(map_id).item, map_index=index)
        for key in plan.waiting:
            self.change(key, StepStatus.WAITING, started=True)
            self.event("step.waiting", key, agent=True)
        for ready in plan.spawned:
            self.new_child(definition.step(ready.key[0]), ready)
        for key, event_type, data in plan.events:
            self.event(event_type, key, **data)
        for ready in [*plan.spawned, *plan.ready]:
            self.change(ready.key, StepStatus.READY, input=ready.input, ready=True)
            self.event("step.ready", ready.key)
            self.admit.append(list(ready.key))
        for key in plan.skipped:
            self.change(key, StepStatus.SKIPPED, finish=True)
            self.event("step.skipped", key)
        for key, output in plan.completed:
            self.change(key, StepStatus.SUCCEEDED, output=output, finish=True)
            self.event("step.succeeded", key)
        for key, error in plan.failed:
            self.change(key, StepStatus.FAILED, error=error, finish=True)
            self.event("step.failed", key, error=error)
        for key in plan.cancelled:
            self.change(key, StepStatus.CANCELLED, finish=True)
            self.event("step.cancelled", key)

    def add_run_end_of(self, plan: engine.Plan) -> bool:
        """The run's end, if the plan ends it (its final event last); True if it does."""
        if plan.run_status == RunStatus.SUCCEEDED:
            self.run = {
                "status": RunStatus.SUCCEEDED,
                "output": plan.run_output,
                "started": True,
                "finished": True,
            }
            self.event("run.succeeded", status=RunStatus.SUCCEEDED)
        elif plan.run_status == RunStatus.FAILED:
            error = plan.run_error or "failed"
            self.run = {
                "status": RunStatus.FAILED,
                "output": None,
                "error": error,
                "started": True,
                "finished": True,
            }
            self.event("run.failed", status=RunStatus.FAILED, error=error)
        return self.run is not None


def run_advance(txn: RunTxn, *, rows: list[StepRow] | None = None, wake: str | None = None) -> None:
    """Apply what the engine decides after a transition, in one statement. Call inside
    `run_locked`, after the transition's own writes; `rows` are the run's steps as they are
    now, if the caller has them (a report gets them from its compare-and-set).

    The steps this makes ready are admitted directly in the same statement (see
    `switchyard_run_apply`); nothing of the run is written between the engine's reading and
    the apply, since the run's lock is held.
    """
    run = txn.run
    if run.status in RUN_FINAL:
        return
    definition = definition_for(run.workflow_version_id)
    rows = step_rows(run.pk) if rows is None else rows
    states = {
        (sid, index): engine.StepState(status=status, output=output, error=error)
        for sid, index, status, output, error, _kind, _pk in rows
    }
    plan = engine.advance(definition, run.input, states)
    pending, log_wake = txn.log.take()
    writes = _Writes(events=pending)
    writes.add_steps_of(definition, plan)
    # Cancelled steps that wait on others: a `workflow` step cancels its child run (after this
    # commit), an approval withdraws its request (in this transaction, before the run's end).
    waiting_on_others = {
        (sid, index): (pk, kind)
        for sid, index, _s, _o, _e, kind, pk in rows
        if kind in ("workflow", "approval")
    }
    for key in plan.cancelled:
        if key not in waiting_on_others:
            continue
        pk, kind = waiting_on_others[key]
        step = StepRun(pk=pk, run_id=run.pk, step_id=key[0], map_index=key[1], kind=kind)
        if kind == "workflow":
            _cancel_child_after_commit(step)
        else:
            _cancel_approvals(txn, step, reason=plan.run_error or "the step was cancelled")
            writes.events.extend(txn.log.take()[0])
    if not writes.add_run_end_of(plan):
        target = _activity(run, definition, engine.apply(states, plan))
        if target is not None:
            writes.run = {"status": target}
            writes.event(f"run.{target}")
    if not (writes.events or writes.steps or writes.run or log_wake or wake):
        return
    apply_writes(txn, writes.plan(), log_wake or wake)
    if writes.run is not None:
        run.status = writes.run["status"]
        if run.status in RUN_FINAL:
            run.output = writes.run.get("output")
            run.error = writes.run.get("error", "")
            run.finished_at = timezone.now()
            run.started_at = run.started_at or run.finished_at
            _run_ended(txn, run.status)


def _activity(run: Run, definition: Definition, states) -> str | None:
    """`running` ⇄ `waiting`: the run's status after a plan, if it changes. Waiting when
    nothing of the run is being worked on (no step ready, queued, running or due for a retry)
    and something waits on people or a child run.

    Pending steps do not count: after an advance, a pending step is blocked on an unfinished
    one. Nor does a map's own row, whose `running` only means that its items exist.
    """
    if run.status == RunStatus.ACCEPTED:
        return None
    worked_on = (StepStatus.READY, StepStatus.QUEUED, StepStatus.RUNNING, StepStatus.RETRY_WAIT)
    items = [
        state
        for (step_id, index), state in states.items()
        if not (index is None and definition.step(step_id).is_map)
    ]
    busy = any(state.status in worked_on for state in items)
    waiting = not busy and any(state.status == StepStatus.WAITING for state in items)
    target = RunStatus.WAITING if waiting else RunStatus.RUNNING
    return target if run.status != target else None


def _finish_step(step: StepRun, status: str, now, *extra_fields: str) -> None:
    step.status = status
    step.finished_at = now
    step.lease_expires_at = None
    step.save(update_fields=["status", "finished_at", "lease_expires_at", *extra_fields])


def _run_ended(txn: RunTxn, status: str) -> None:
    """What follows a run's end in its transaction: the webhook delivery, the parent's step."""
    webhook_delivery_create(run=txn.run, event_type=f"run.{status}")
    if txn.run.parent_step_id is not None:
        _parent_step_settle(txn.run)


def _parent_step_settle(child: Run) -> None:
    """A child run ended: complete or fail the parent's `workflow` step (lock: child, parent)."""
    step_settle_from_child(child=child)


def _cancel_child_after_commit(step: StepRun) -> None:
    def cancel() -> None:
        child = Run.objects.filter(parent_step_id=step.pk).first()
        if child is not None:
            run_cancel(run=child, reason="parent step cancelled")

    transaction.on_commit(cancel)


def _cancel_approvals(txn: RunTxn, step: StepRun, *, reason: str) -> None:
    """A cancelled step of a kind that waits on people withdraws its pending request, in this
    transaction (the kind's `on_cancel`: the approval kind's is in approvals.services)."""
    on_cancel = registry.kind(step.kind).load_on_cancel()
    if on_cancel is not None:
        on_cancel(txn=txn, step=step, reason=reason)


def _default_timeout() -> float:
    return settings.SWITCHYARD_STEP_DEFAULT_TIMEOUT_S


def _attempt_timeout(step_def) -> float:
    """How long one attempt may run (its lease). An approval's `timeout_s` is its decision
    deadline instead (`KindSpec.timeout_is_deadline`), which the approval keeps itself."""
    spec = registry.kinds().get(step_def.kind)
    if step_def.timeout_s is None or (spec is not None and spec.timeout_is_deadline):
        return _default_timeout()
    return step_def.timeout_s


def lane_for(tenant: Tenant, requested: str | None) -> str:
    lane = requested or tenant.default_lane
    if lane not in Lane.values:
        raise RunError(
            f"lane must be one of {', '.join(Lane.values)}, got {lane!r}", code="invalid_lane"
        )
    if LANE_RANK[lane] > LANE_RANK[tenant.max_lane]:
        raise RunError(
            f"lane {lane!r} is above this tenant's highest lane {tenant.max_lane!r}",
            code="lane_not_allowed",
        )
    return lane


@dataclass(frozen=True)
class SubmissionChecks:
    """What a client's submission checks in the statement that creates its run."""

    idempotency_ttl_s: float
    # The version came from the caller's cache: refused as `stale_version` if it is gone, or
    # if `latest` and a newer one exists.
    cached_version: bool = False
    latest: bool = False
    api_key_id: int | None = None  # refused as `key_revoked` if the key was revoked since


@dataclass(frozen=True)
class RunInsert:
    """The outcome of `run_insert`: `created`, `replay` (the run that holds the key),
    `queued_runs_full` (`queued` counted), `stale_version` or `key_revoked`."""

    outcome: str
    run: Run | None = None
    queued: int = 0


def run_insert(
    *,
    tenant: Tenant,
    version: WorkflowVersion,
    input: dict[str, Any],
    lane: str | None = None,
    webhook_url: str = "",
    idempotency_key: str = "",
    request_hash: str = "",
    parent_step: StepRun | None = None,
    checks: SubmissionChecks | None = None,
) -> RunInsert:
    """Create a run, its steps and its first events, make its first steps ready and admit
    them directly where nothing else waits: one statement (`switchyard_run_submit`), with the
    submission's `checks`. The engine's first plan is computed here, before the statement.

    Raises RunError(code="invalid_input") with the faults when `input` does not match the
    definition's input schema; nothing is stored then.
    """
    definition = definition_of(version)
    faults = validate_input(definition, input)
    if faults:
        raise RunError(
            "input does not match the workflow's input_schema", code="invalid_input", faults=faults
        )
    resolved_lane = lane_for(tenant, lane)
    plan = engine.advance(definition, input, engine.initial_states(definition))
    writes = _Writes()
    writes.event(
        "run.accepted", workflow=version.workflow.name, version=version.version, lane=resolved_lane
    )
    for step_def in definition.steps:
        writes.new_step(step_def, map_index=None)
    writes.add_steps_of(definition, plan)
    ends = writes.add_run_end_of(plan)
    body = writes.plan()
    body["wake"] = None
    if body["admit"]:
        body["admission"] = admission_settings()
    row = {
        "tenant_id": tenant.pk,
        "workflow_version_id": version.pk,
        "input": input,
        "lane": resolved_lane,
        "webhook_url": webhook_url,
        "idempotency_key": idempotency_key,
        "request_hash": request_hash,
        "parent_step_id": parent_step.pk if parent_step is not None else None,
        "idempotency_ttl_s": checks.idempotency_ttl_s if checks else 0,
        "check_queued_runs": checks is not None,
        "cached_version": (
            {
                "workflow_id": version.workflow_id,
                "version": version.version,
                "latest": checks.latest,
            }
            if checks and checks.cached_version
            else None
        ),
        "api_key_id": checks.api_key_id if checks else None,
    }
    # A run that ends at once (every step skipped, a first template that fails) writes its
    # webhook delivery and settles its parent in the same transaction; otherwise the one
    # statement is the whole transaction.
    with transaction.atomic() if ends else contextlib.nullcontext():
        result = sql.run_submit(run=row, plan=body)
        outcome = result["outcome"]
        if outcome == "queued_runs_full":
            return RunInsert(outcome, queued=result["queued"])
        if outcome in ("stale_version", "key_revoked"):
            return RunInsert(outcome)
        run = run_from_row(result["run"])
        if outcome == "replay":
            return RunInsert(outcome, run=run)
        run.tenant = tenant
        run.workflow_version = version
        publish_live_on_commit(run.public_id, result["events"])
        publish_after_commit([dispatch_of(d, run.tenant_id) for d in result["dispatches"]])
        if result["wake"]:
            wake_after_commit()
        if run.status in RUN_FINAL:
            with run_locked(run.pk) as txn:
                _run_ended(txn, run.status)
    return RunInsert(outcome, run=run)


def run_create(
    *,
    tenant: Tenant,
    version: WorkflowVersion,
    input: dict[str, Any],
    lane: str | None = None,
    webhook_url: str = "",
    idempotency_key: str = "",
    request_hash: str = "",
    parent_step: StepRun | None = None,
) -> Run:
    """Create a run (`run_insert`, without a client submission's checks): child runs, the
    demo's seed, tests. Raises RunError(code="idempotency_key_taken") if the key is held."""
    created = run_insert(
        tenant=tenant,
        version=version,
        input=input,
        lane=lane,
        webhook_url=webhook_url,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        parent_step=parent_step,
    )
    if created.outcome != "created":
        raise RunError(
            f"the Idempotency-Key {idempotency_key!r} is held by another run",
            code="idempotency_key_taken",
        )
    return created.run


def run_cancel(*, run: Run, reason: str = "cancelled", by: str = "") -> Run:
    """Cancel a run and every unfinished step. Raises RunError(code="run_final") if it ended."""
    with run_locked(run.pk) as txn:
        locked = txn.run
        if locked.status in RUN_FINAL:
            raise RunError(f"run already {locked.status}", code="run_final")
        now = timezone.now()
        for step in locked.steps.select_for_update().exclude(status__in=STEP_FINAL):
            _finish_step(step, StepStatus.CANCELLED, now)
            txn.log.add("step.cancelled", step=step)
            if step.kind == "workflow":
                _cancel_child_after_commit(step)
            elif step.kind == "approval":
                _cancel_approvals(txn, step, reason=f"the run was cancelled: {reason}")
        locked.status = RunStatus.CANCELLED
        locked.finished_at = now
        locked.error = reason
        locked.save(update_fields=["status", "finished_at", "error", "updated_at"])
        data = {"reason": reason}
        if by:
            data["by"] = by
        txn.log.add("run.cancelled", **data)
        webhook_delivery_create(run=locked, event_type="run.cancelled")
        if locked.parent_step_id is not None:
            _parent_step_settle(locked)
        return locked


def run_retry(*, run: Run, by: str = "") -> Run:
    """Retry a failed run from its failed steps; succeeded checkpoints are kept.

    Failed and cancelled steps (and map items) go back to pending with a fresh attempt budget;
    a failed map goes back to running over its kept items. Raises RunError(code="not_failed").
    """
    with run_locked(run.pk) as txn:
        locked = txn.run
        if locked.status != RunStatus.FAILED:
            raise RunError(
                f"only failed runs can be retried; this run is {locked.status}", code="not_failed"
            )
        definition = definition_of(locked.workflow_version)
        reset = 0
        for step in locked.steps.select_for_update().filter(
            status__in=[StepStatus.FAILED, StepStatus.CANCELLED]
        ):
            step_def = definition.step(step.step_id)
            # A map or an agent whose children exist resumes over them (a map's row runs, an
            # agent's waits); its failed children go back to pending below.
            parent = step.map_index is None and (
                step.kind in ("map", "agent")
                and locked.steps.filter(step_id=step.step_id, map_index__isnull=False).exists()
            )
            if parent:
                step.status = StepStatus.RUNNING if step.kind == "map" else StepStatus.WAITING
            else:
                step.status = StepStatus.PENDING
            is_item = step.map_index is not None and step_def.is_map
            policy = step_def.item.retry if is_item else step_def.retry
            step.max_attempts = step.attempt + policy.max_attempts
            step.error = ""
            step.error_code = ""
            step.finished_at = None
            step.dispatch_token = None
            step.save(
                update_fields=[
                    "status",
                    "max_attempts",
                    "error",
                    "error_code",
                    "finished_at",
                    "dispatch_token",
                ]
            )
            reset += 1
        locked.status = RunStatus.RUNNING
        locked.error = ""
        locked.finished_at = None
        locked.save(update_fields=["status", "error", "finished_at", "updated_at"])
        data: dict[str, Any] = {"steps_reset": reset}
        if by:
            data["by"] = by
        txn.log.add("run.retried", **data)
        run_advance(txn)
        return locked


def step_fail_final(
    txn: RunTxn, step: StepRun, *, error: str, code: str, output: Any = None
) -> None:
    """Fail `step` for good (no retry) and advance the run. `output`, when given, is kept as
    the step's output (a rejected approval's decision). Call inside the run's `run_locked`."""
    step.status = StepStatus.FAILED
    step.error = error
    step.error_code = code
    step.finished_at = timezone.now()
    step.lease_expires_at = None
    fields = ["status", "error", "error_code", "finished_at", "lease_expires_at"]
    if output is not None:
        step.output = output
        fields.append("output")
    step.save(update_fields=fields)
    txn.log.add("step.failed", step=step, attempt=step.attempt, error=error, code=code)
    run_advance(txn)


def step_succeed_waiting(txn: RunTxn, step: StepRun, *, output: Any, **event: Any) -> None:
    """A `waiting` step's wait ended well (its child run succeeded, people approved): it
    succeeds with `output`, `step.succeeded` is logged with `event`, and the run advances.
    Call inside the run's `run_locked`, holding the step's row."""
    step.status = StepStatus.SUCCEEDED
    step.output = output
    step.finished_at = timezone.now()
    step.save(update_fields=["status", "output", "finished_at"])
    txn.log.add("step.succeeded", step=step, **event)
    run_advance(txn)


def step_settle_from_child(*, child: Run) -> None:
    """The child of a waiting `workflow` step ended: the step succeeds or fails with it.

    Called inside the child's `run_locked`; takes the parent run's lock next.
    """
    parent_step_id = child.parent_step_id
    run_pk = run_pk_of(parent_step_id)
    if run_pk is None:
        return
    with run_locked(run_pk) as txn:
        step = step_lock(txn, parent_step_id)
        if step.status != StepStatus.WAITING:
            return
        if child.status == RunStatus.SUCCEEDED:
            step_succeed_waiting(txn, step, output=child.output, child_run=str(child.public_id))
        else:
            step_fail_final(
                txn,
                step,
                error=f"child run {child.public_id} {child.status}: {child.error}",
                code=f"child_{child.status}",
            )
