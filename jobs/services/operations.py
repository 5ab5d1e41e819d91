"""Operators' actions on runs: re-run from a step, and bulk retry or cancel.

Each goes through the same transitions as the API (`run_retry`, `run_cancel`, `run_advance`)
under the run's row lock, and leaves an event naming the operator (`by`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from django.db.models import Q

from jobs.models import Run, RunStatus, StepStatus
from jobs.statuses import RUN_FINAL
from jobs.transitions.runs import RunError, run_advance, run_cancel, run_retry
from jobs.transitions.txn import definition_of, run_locked

# Steps in these states are being worked on: resetting them under a worker would race it.
_BUSY = (StepStatus.QUEUED, StepStatus.RUNNING, StepStatus.RETRY_WAIT, StepStatus.WAITING)


def steps_to_rerun(definition: Any, step_id: str) -> list[str]:
    """`step_id` and every step that depends on it, transitively, in definition order."""
    reset = {step_id}
    frontier = [step_id]
    while frontier:
        for dependent in definition.dependents(frontier.pop()):
            if dependent not in reset:
                reset.add(dependent)
                frontier.append(dependent)
    return [step.id for step in definition.steps if step.id in reset]


def run_rerun_from(*, run: Run, step_id: str, by: str) -> Run:
    """Run `step_id` and everything that depends on it again; earlier checkpoints are kept.

    The step and its transitive dependents go back to pending with a fresh attempt budget
    (their outputs and errors cleared, a reset map's items deleted, a `workflow` step's old
    child run detached), the run goes back to running, and the graph advances: the step is
    ready again at once, since its own dependencies kept their outputs. Raises RunError with
    code `unknown_step`, `not_started` (the run never ran) or `steps_busy` (a step to reset
    is queued, running, waiting or due for a retry: cancel the run or wait).
    """
    with run_locked(run.pk) as txn:
        locked = txn.run
        definition = definition_of(locked.workflow_version)
        if step_id not in {step.id for step in definition.steps}:
            raise RunError(f"the workflow has no step {step_id!r}", code="unknown_step")
        if locked.status == RunStatus.ACCEPTED:
            raise RunError("this run has not started; nothing to re-run", code="not_started")
        reset_ids = steps_to_rerun(definition, step_id)
        rows = list(locked.steps.select_for_update().filter(step_id__in=reset_ids))
        busy = sorted({row.key for row in rows if row.status in _BUSY})
        if busy:
            raise RunError(
                f"step(s) {', '.join(busy)} are still being worked on; cancel the run first "
                "or wait until they finish",
                code="steps_busy",
            )
        items_deleted = 0
        for row in rows:
            if row.map_index is not None:
                row.delete()
                items_deleted += 1
                continue
            if row.kind == "workflow":
                Run.objects.filter(parent_step=row).update(parent_step=None)
            step_def = definition.step(row.step_id)
            row.status = StepStatus.PENDING
            row.max_attempts = row.attempt + step_def.retry.max_attempts
            row.input = None
            row.output = None
            row.error = ""
            row.error_code = ""
            row.dispatch_token = None
            row.dispatched_at = None
            row.lease_expires_at = None
            row.retry_at = None
            row.ready_at = None
            row.started_at = None
            row.finished_at = None
            row.held_reason = ""
            row.save()
        if locked.status in RUN_FINAL:
            locked.status = RunStatus.RUNNING
            locked.output = None
            locked.error = ""
            locked.finished_at = None
            locked.save(update_fields=["status", "output", "error", "finished_at", "updated_at"])
        data = {"from": step_id, "steps_reset": reset_ids, "map_items_deleted": items_deleted}
        txn.log.add("run.rerun", by=by, **data)
        run_advance(txn)
        return locked


@dataclass
class BulkResult:
    """What a bulk action did: runs changed, and runs it left alone with why."""

    done: list[Run] = field(default_factory=list)
    skipped: list[tuple[Run, str]] = field(default_factory=list)


def runs_bulk_retry(*, runs: Iterable[Run], by: str) -> BulkResult:
    """Retry each failed run (one transaction per run); others are skipped with the reason."""
    result = BulkResult()
    for run in runs:
        try:
            result.done.append(run_retry(run=run, by=by))
        except RunError as exc:
            result.skipped.append((run, exc.message))
    return result


def runs_bulk_cancel(*, runs: Iterable[Run], by: str, reason: str = "") -> BulkResult:
    """Cancel each unfinished run (one transaction per run); finished runs are skipped."""
    result = BulkResult()
    for run in runs:
        try:
            result.done.append(run_cancel(run=run, reason=reason or f"cancelled by {by}", by=by))
        except RunError as exc:
            result.skipped.append((run, exc.message))
    return result


def bulk_action_filter(action: str) -> Q:
    """The runs a bulk action can act on at all: failed runs to retry, open runs to cancel."""
    if action == "retry":
        return Q(status=RunStatus.FAILED)
    if action == "cancel":
        return ~Q(status__in=RUN_FINAL)
    raise ValueError(f"unknown bulk action {action!r}")


def step_keys(run: Run) -> list[str]:
    """The top-level step ids of a run, in definition order (choices to re-run from)."""
    definition = definition_of(run.workflow_version)
    return [step.id for step in definition.steps]
