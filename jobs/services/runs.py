"""Runs: submission, the graph advance after every step transition, cancel, retry.

Concurrency rule: every transition of a run or of one of its steps happens inside
`run_locked`, which holds the run's row lock for the transaction. Lock order is always the
run first, then its step rows; a child run's completion locks the child, then the parent.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from jobs import admission, engine
from jobs.definitions import Definition, Fault, parse_definition, validate_input
from jobs.dispatch import Dispatch, publish_after_commit
from jobs.events import RunLog
from jobs.models import (
    RUN_FINAL,
    STEP_FINAL,
    Run,
    RunStatus,
    StepRun,
    StepStatus,
    WorkflowVersion,
)
from jobs.services.webhooks import webhook_delivery_create
from jobs.steps import registry
from tenants.models import LANE_RANK, Lane, Tenant

log = logging.getLogger(__name__)


class RunError(Exception):
    """A refused request on a run; `code` maps to the API's error envelope."""

    def __init__(self, message: str, *, code: str, faults: list[Fault] | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.faults = faults or []


@functools.lru_cache(maxsize=512)
def _parsed(version_pk: int, definition_json: str) -> Definition:
    return parse_definition(json.loads(definition_json))


def definition_of(version: WorkflowVersion) -> Definition:
    """The parsed definition of a version (versions are immutable, so parsing is cached)."""
    return _parsed(version.pk, json.dumps(version.definition, sort_keys=True))


@dataclass
class RunTxn:
    run: Run
    log: RunLog
    # Steps this transaction made ready: admitted directly or left to the scheduler at its end.
    ready: list[StepRun] = field(default_factory=list)


_open = threading.local()


class RunBusy(Exception):
    """Another transaction holds the run's row lock (`run_locked(..., skip_locked=True)`)."""


def skips_busy_runs(default: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """For the scheduler's transitions, which never wait for a run's row lock (a stalled
    worker holding one run must not stall admission and recovery for everyone): the decorated
    function locks with `run_locked(..., skip_locked=True)` and returns `default` when the run
    is busy; the next cycle tries again."""

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return function(*args, **kwargs)
            except RunBusy:
                return default

        return wrapper

    return decorate


@contextmanager
def run_locked(run_pk: int, *, skip_locked: bool = False) -> Iterator[RunTxn]:
    """A transaction holding the run's row lock, with its event log flushed at the end.

    Re-entrant: inside an open `run_locked` of the same run (a child run that ends at once
    settles its parent's step, for instance) it yields the same RunTxn, so that one event log
    numbers the events of one transaction. With `skip_locked`, raises RunBusy instead of
    waiting when another transaction holds the lock.
    """
    open_txns: dict[int, RunTxn] = _open.__dict__.setdefault("txns", {})
    if run_pk in open_txns:
        yield open_txns[run_pk]
        return
    with transaction.atomic():
        locked = (
            Run.objects.select_for_update(of=("self",), skip_locked=skip_locked)
            .select_related("workflow_version", "tenant")
            .filter(pk=run_pk)
            .first()
        )
        if locked is None:
            if skip_locked and Run.objects.filter(pk=run_pk).exists():
                raise RunBusy(run_pk)
            raise Run.DoesNotExist(f"run {run_pk} does not exist")
        run = locked
        txn = RunTxn(run=run, log=RunLog(run))
        open_txns[run_pk] = txn
        try:
            yield txn
            _admit_ready(txn)
            txn.log.flush()
        finally:
            del open_txns[run_pk]


def _admit_ready(txn: RunTxn) -> None:
    """The steps this transaction made ready go to `queued` now if nothing else waits in their
    queue and their tenant's quotas allow (`admission.admit_directly`; published after the
    commit); the scheduler is woken for the others."""
    ready, txn.ready = txn.ready, []
    if not ready:
        return
    now = timezone.now()
    admitted = admission.admit_directly(
        tenant=txn.run.tenant,
        run_accepted=txn.run.status == RunStatus.ACCEPTED,
        steps=ready,
        now=now,
    )
    if admitted:
        with connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {StepRun._meta.db_table} SET status = %s, dispatched_at = %s, "
                "dispatch_token = gen_random_uuid(), held_reason = '' "
                "WHERE id = ANY(%s) AND status = %s RETURNING id, dispatch_token",
                [StepStatus.QUEUED, now, [step.pk for step in admitted], StepStatus.READY],
            )
            tokens = dict(cursor.fetchall())
        admitted = [step for step in admitted if step.pk in tokens]
        for step in admitted:
            step.status = StepStatus.QUEUED
            step.dispatch_token = tokens[step.pk]
            step.dispatched_at = now
            txn.log.add("step.queued", step=step, queue=step.queue)
        publish_after_commit([Dispatch.of(step) for step in admitted])
    if len(admitted) < len(ready):
        txn.log.wake_scheduler()


def _states(steps: list[StepRun]) -> dict[engine.StepKey, engine.StepState]:
    return {
        (step.step_id, step.map_index): engine.StepState(
            status=step.status, output=step.output, error=step.error or None
        )
        for step in steps
    }


def run_advance(txn: RunTxn) -> None:
    """Apply what the engine decides after a transition. Call inside `run_locked`."""
    run = txn.run
    if run.status in RUN_FINAL:
        return
    definition = definition_of(run.workflow_version)
    steps = list(run.steps.select_for_update().order_by("id"))
    by_key = {(step.step_id, step.map_index): step for step in steps}
    plan = engine.advance(definition, run.input, _states(steps))
    now = timezone.now()

    for map_id, items in plan.expanded:
        map_step = by_key[(map_id, None)]
        item_def = definition.step(map_id).item
        map_step.status = StepStatus.RUNNING
        map_step.started_at = now
        map_step.save(update_fields=["status", "started_at"])
        txn.log.add("step.expanded", step=map_step, items=len(items))
        created = StepRun.objects.bulk_create(
            [_new_step_row(run, item_def, map_index=index, now=now) for index in range(len(items))]
        )
        for row in created:
            by_key[(row.step_id, row.map_index)] = row

    for ready in plan.ready:
        step = by_key[ready.key]
        step.status = StepStatus.READY
        step.input = ready.input
        step.ready_at = now
        step.save(update_fields=["status", "input", "ready_at"])
        txn.log.add("step.ready", step=step)
        txn.ready.append(step)

    for key in plan.skipped:
        step = by_key[key]
        _finish_step(step, StepStatus.SKIPPED, now)
        txn.log.add("step.skipped", step=step)

    for key, output in plan.completed:
        step = by_key[key]
        step.output = output
        _finish_step(step, StepStatus.SUCCEEDED, now, "output")
        txn.log.add("step.succeeded", step=step)

    for key, error in plan.failed:
        step = by_key[key]
        step.error = error
        _finish_step(step, StepStatus.FAILED, now, "error")
        txn.log.add("step.failed", step=step, error=error)

    for key in plan.cancelled:
        step = by_key[key]
        _finish_step(step, StepStatus.CANCELLED, now)
        txn.log.add("step.cancelled", step=step)
        if step.kind == "workflow":
            _cancel_child_after_commit(step)
        elif step.kind == "approval":
            _cancel_approvals(txn, step, reason=plan.run_error or "the step was cancelled")

    if plan.run_status == RunStatus.SUCCEEDED:
        _run_finish(txn, RunStatus.SUCCEEDED, output=plan.run_output)
    elif plan.run_status == RunStatus.FAILED:
        _run_finish(txn, RunStatus.FAILED, error=plan.run_error or "failed")
    else:
        _run_refresh_activity(txn, list(by_key.values()))


def _finish_step(step: StepRun, status: str, now, *extra_fields: str) -> None:
    step.status = status
    step.finished_at = now
    step.lease_expires_at = None
    step.save(update_fields=["status", "finished_at", "lease_expires_at", *extra_fields])


def _run_refresh_activity(txn: RunTxn, steps: list[StepRun]) -> None:
    """`running` ⇄ `waiting`: waiting when nothing of the run is being worked on (no step
    ready, queued, running or due for a retry) and something waits on people or a child run.

    Pending steps do not count: after an advance, a pending step is blocked on an unfinished
    one. Nor does a map's own row, whose `running` only means that its items exist.
    """
    run = txn.run
    if run.status == RunStatus.ACCEPTED:
        return
    worked_on = (StepStatus.READY, StepStatus.QUEUED, StepStatus.RUNNING, StepStatus.RETRY_WAIT)
    items = [s for s in steps if not (s.kind == "map" and s.map_index is None)]
    busy = any(s.status in worked_on for s in items)
    waiting = not busy and any(s.status == StepStatus.WAITING for s in items)
    target = RunStatus.WAITING if waiting else RunStatus.RUNNING
    if run.status != target:
        run.status = target
        run.save(update_fields=["status", "updated_at"])
        txn.log.add(f"run.{target}")


def run_mark_started(txn: RunTxn) -> None:
    run = txn.run
    if run.status == RunStatus.ACCEPTED:
        run.status = RunStatus.RUNNING
        run.started_at = timezone.now()
        run.save(update_fields=["status", "started_at", "updated_at"])
        txn.log.add("run.started")
    elif run.status == RunStatus.WAITING:
        run.status = RunStatus.RUNNING
        run.save(update_fields=["status", "updated_at"])
        txn.log.add("run.running")


def _run_finish(txn: RunTxn, status: str, *, output: Any = None, error: str = "") -> None:
    run = txn.run
    now = timezone.now()
    run.status = status
    run.output = output
    run.error = error
    run.finished_at = now
    if run.started_at is None:
        run.started_at = now
    run.save(update_fields=["status", "output", "error", "finished_at", "started_at", "updated_at"])
    data: dict[str, Any] = {"status": status}
    if error:
        data["error"] = error
    txn.log.add(f"run.{status}", **data)
    webhook_delivery_create(run=run, event_type=f"run.{status}")
    if run.parent_step_id is not None:
        _parent_step_settle(run)


def _parent_step_settle(child: Run) -> None:
    """A child run ended: complete or fail the parent's `workflow` step (lock: child, parent)."""
    from jobs.services.steps import step_settle_from_child

    step_settle_from_child(child=child)


def _cancel_child_after_commit(step: StepRun) -> None:
    def cancel() -> None:
        child = Run.objects.filter(parent_step_id=step.pk).first()
        if child is not None:
            run_cancel(run=child, reason="parent step cancelled")

    transaction.on_commit(cancel)


def _cancel_approvals(txn: RunTxn, step: StepRun, *, reason: str) -> None:
    """A cancelled approval step withdraws its pending request (in this transaction)."""
    from jobs.services.approvals import approvals_cancel_for_step

    approvals_cancel_for_step(txn=txn, step=step, reason=reason)


def _new_step_row(run: Run, step_def, *, map_index: int | None, now) -> StepRun:
    return StepRun(
        run=run,
        tenant_id=run.tenant_id,
        lane=run.lane,
        step_id=step_def.id,
        map_index=map_index,
        kind=step_def.kind,
        queue=step_def.queue,
        max_attempts=step_def.retry.max_attempts,
        timeout_s=_attempt_timeout(step_def),
        status=StepStatus.PENDING,
    )


def _default_timeout() -> float:
    from django.conf import settings

    return settings.SWITCHYARD_STEP_DEFAULT_TIMEOUT_S


def _attempt_timeout(step_def) -> float:
    """How long one attempt may run (its lease). An approval's `timeout_s` is its decision
    deadline instead (`KindSpec.timeout_is_deadline`), which the approval keeps itself."""
    spec = registry.kinds().get(step_def.kind)
    if step_def.timeout_s is None or (spec is not None and spec.timeout_is_deadline):
        return _default_timeout()
    return step_def.timeout_s


def request_fingerprint(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


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
    """Create a run, its steps and its first events, and make its first steps ready.

    Raises RunError(code="invalid_input") with the faults when `input` does not match the
    definition's input schema; nothing is stored then. Runs in (or opens) a transaction.
    """
    definition = definition_of(version)
    faults = validate_input(definition, input)
    if faults:
        raise RunError(
            "input does not match the workflow's input_schema", code="invalid_input", faults=faults
        )
    resolved_lane = lane_for(tenant, lane)
    with transaction.atomic():
        run = Run.objects.create(
            tenant=tenant,
            workflow_version=version,
            input=input,
            lane=resolved_lane,
            webhook_url=webhook_url,
            idempotency_key=idempotency_key,
            request_hash=request_hash,
            parent_step=parent_step,
        )
        now = timezone.now()
        StepRun.objects.bulk_create(
            [_new_step_row(run, step_def, map_index=None, now=now) for step_def in definition.steps]
        )
        with run_locked(run.pk) as txn:
            txn.log.add(
                "run.accepted",
                workflow=version.workflow.name,
                version=version.version,
                lane=resolved_lane,
            )
            run_advance(txn)
    return run


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
            expanded_map = (
                step.kind == "map"
                and locked.steps.filter(step_id=step.step_id, map_index__isnull=False).exists()
            )
            step.status = StepStatus.RUNNING if expanded_map else StepStatus.PENDING
            policy = step_def.item.retry if step.map_index is not None else step_def.retry
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
