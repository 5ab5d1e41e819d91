"""Runs: submission, the graph advance after every step transition, cancel, retry.

Concurrency rule: every transition of a run or of one of its steps happens inside
`run_locked`, which holds the run's row lock for the transaction. Lock order is always the
run first, then its step rows; a child run's completion locks the child, then the parent.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from jobs import admission, engine
from jobs.definitions import Definition, Fault, parse_definition, validate_input
from jobs.dispatch import Dispatch, publish_after_commit, unheld_timeout_above_s
from jobs.events import RunLog, publish_live_on_commit
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
from jobs.transitions import sql
from tenants.models import LANE_RANK, Lane, Tenant

log = logging.getLogger(__name__)


class RunError(Exception):
    """A refused request on a run; `code` maps to the API's error envelope."""

    def __init__(self, message: str, *, code: str, faults: list[Fault] | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.faults = faults or []


# Parsed definitions by version id: versions are immutable, and an id is never reused.
_DEFINITIONS: dict[int, Definition] = {}
_DEFINITIONS_MAX = 2048


def _remember(version_pk: int, document: dict[str, Any]) -> Definition:
    definition = parse_definition(document)
    if len(_DEFINITIONS) >= _DEFINITIONS_MAX:
        _DEFINITIONS.clear()
    _DEFINITIONS[version_pk] = definition
    return definition


def definition_for(version_pk: int) -> Definition:
    """The parsed definition of a version by its id (cached per process)."""
    found = _DEFINITIONS.get(version_pk)
    if found is None:
        document = WorkflowVersion.objects.values_list("definition", flat=True).get(pk=version_pk)
        found = _remember(version_pk, document)
    return found


def definition_of(version: WorkflowVersion) -> Definition:
    """The parsed definition of a version (cached per process)."""
    found = _DEFINITIONS.get(version.pk)
    return found if found is not None else _remember(version.pk, version.definition)


@dataclass
class RunTxn:
    run: Run
    log: RunLog
    # Steps this transaction made ready: admitted directly or left to the scheduler at its end.
    ready: list[StepRun] = field(default_factory=list)


_open = threading.local()


_RUN_TIMES = ("created_at", "started_at", "finished_at", "updated_at")


def run_from_row(row: dict[str, Any]) -> Run:
    """A run as a SQL function returned its row (`to_jsonb`), without another query."""
    fields = {name: row[name] for name in row if name != "id"}
    for name in _RUN_TIMES:
        fields[name] = sql.parse_time(fields.get(name))
    fields["public_id"] = uuid.UUID(fields["public_id"])
    return Run(pk=row["id"], **fields)


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
def run_locked(
    run_pk: int, *, skip_locked: bool = False, locked: Run | None = None
) -> Iterator[RunTxn]:
    """A transaction holding the run's row lock, with its event log flushed at the end.

    Re-entrant: inside an open `run_locked` of the same run (a child run that ends at once
    settles its parent's step, for instance) it yields the same RunTxn, so that one event log
    numbers the events of one transaction. With `skip_locked`, raises RunBusy instead of
    waiting when another transaction holds the lock. `locked`: the run as this transaction
    already locked and read it (a report's compare-and-set does), so it is not read again.
    """
    open_txns: dict[int, RunTxn] = _open.__dict__.setdefault("txns", {})
    if run_pk in open_txns:
        yield open_txns[run_pk]
        return
    # A run this transaction locked already needs no savepoint of its own (a round trip).
    with transaction.atomic(savepoint=locked is None):
        if locked is None:
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
            _flush(txn)
        finally:
            del open_txns[run_pk]


def _flush(txn: RunTxn) -> None:
    """What the transaction left to write, in one statement (`switchyard_run_apply`): its
    pending events, and the direct admission of the steps it made ready (published after the
    commit; the scheduler is woken for those it leaves)."""
    events, wake = txn.log.take()
    if not (events or txn.ready or wake):
        return
    ready, txn.ready = txn.ready, []
    _apply(txn, {"events": events, "admit": [[s.step_id, s.map_index] for s in ready]}, wake)


def admission_settings() -> dict[str, Any] | None:
    """What `switchyard_run_apply` needs to admit directly (None: direct admission is off)."""
    if not settings.SWITCHYARD_DIRECT_ADMISSION:
        return None
    return {
        "lock": admission.ADMISSION_LOCK_ID,
        "burst_s": settings.SWITCHYARD_RATE_BURST_S,
        "unheld_s": unheld_timeout_above_s(),
        "queues": {
            queue: {
                "max_queued": admission.max_queued(queue),
                "capacity": admission.pool_capacity().get(
                    queue, settings.SWITCHYARD_QUEUE_MAX_QUEUED
                ),
            }
            for queue in admission.step_queues()
        },
    }


def _apply(txn: RunTxn, plan: dict[str, Any], wake: str | None) -> dict[str, Any]:
    """Write `plan` (see `switchyard_run_apply`) for the locked run; publish its events and
    dispatches after the commit; keep `txn.run` in step with the row."""
    plan["wake"] = wake
    if plan.get("admit"):
        plan["admission"] = admission_settings()
    result = sql.run_apply(run_pk=txn.run.pk, plan=plan)
    txn.run.next_seq = result["run"]["next_seq"]
    publish_live_on_commit(txn.run.public_id, result["events"])
    publish_after_commit([dispatch_of(row, txn.run.tenant_id) for row in result["dispatches"]])
    return result


def dispatch_of(row: dict[str, Any], tenant_id: int) -> Dispatch:
    """The message for a step that `switchyard_steps_admit` admitted."""
    return Dispatch(
        step_run_id=row["id"],
        dispatch_token=uuid.UUID(row["token"]),
        queue=row["queue"],
        lane=row["lane"],
        lease_s=row["timeout_s"] + settings.SWITCHYARD_LEASE_GRACE_S,
        tenant_id=tenant_id,
    )


# A step's state as the engine reads it: (step id, map index, status, output, error, kind, id).
StepRow = tuple[str, "int | None", str, Any, "str | None", str, int]

_STEP_ROWS = (
    f"SELECT step_id, map_index, status, output, nullif(error, ''), kind, id "
    f"FROM {StepRun._meta.db_table} WHERE run_id = %s ORDER BY id"
)


def _step_rows(run_pk: int) -> list[StepRow]:
    with connection.cursor() as cursor:
        cursor.execute(_STEP_ROWS, [run_pk])
        return [
            (sid, index, status, json.loads(out) if isinstance(out, str) else out, err, kind, pk)
            for sid, index, status, out, err, kind, pk in cursor.fetchall()
        ]


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
        for ready in plan.ready:
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
    rows = _step_rows(run.pk) if rows is None else rows
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
    _apply(txn, writes.plan(), log_wake or wake)
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
