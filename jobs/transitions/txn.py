"""The run's transaction: its row lock, its event log, and the one statement that writes
what it changed (`switchyard_run_apply`).

Concurrency rule: every transition of a run or of one of its steps happens inside
`run_locked`, which holds the run's row lock for the transaction. Lock order is always the
run first, then its step rows; a child run's completion locks the child, then the parent.
"""

from __future__ import annotations

import functools
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F, Value
from django.db.models.functions import Extract
from django.utils import timezone

from jobs import admission
from jobs.definitions import Definition, parse_definition
from jobs.dispatch import Dispatch, publish_after_commit, unheld_timeout_above_s
from jobs.events import RunLog, publish_live_on_commit
from jobs.models import Run, StepAttempt, StepRun, WorkflowVersion
from jobs.transitions import sql
from jobs.wakeups import wake_after_commit

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
    # The queue of a worker slot this transaction freed (a step's attempt ended): the run's
    # tenant's next ready steps there are admitted directly, as for steps made ready.
    freed: str | None = None


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
    if not (events or txn.ready or wake or txn.freed):
        return
    ready, txn.ready = txn.ready, []
    apply_writes(txn, {"events": events, "admit": [[s.step_id, s.map_index] for s in ready]}, wake)


def admission_settings() -> dict[str, Any] | None:
    """What `switchyard_run_apply` needs to admit directly (None: direct admission is off)."""
    if not settings.SWITCHYARD_DIRECT_ADMISSION:
        return None
    fair = settings.SWITCHYARD_ADMISSION_POLICY == "fair"
    return {
        "lock": admission.ADMISSION_LOCK_ID,
        "lock_wait_ms": settings.SWITCHYARD_ADMISSION_LOCK_WAIT_MS,
        "burst_s": settings.SWITCHYARD_RATE_BURST_S,
        "unheld_s": unheld_timeout_above_s(),
        "fair": fair,
        "lane_min_share": dict(settings.SWITCHYARD_LANE_MIN_SHARE),
        "queues": {
            queue: {
                "max_queued": admission.max_queued(queue),
                "reserve": admission.fair_reserve(queue) if fair else 0,
                "capacity": admission.queue_capacity(queue),
            }
            for queue in admission.step_queues()
        },
    }


def apply_writes(txn: RunTxn, plan: dict[str, Any], wake: str | None) -> dict[str, Any]:
    """Write `plan` (see `switchyard_run_apply`) for the locked run; publish its events and
    dispatches after the commit; keep `txn.run` in step with the row."""
    plan["wake"] = wake
    if txn.freed is not None:
        plan["freed"], txn.freed = [txn.freed], None
    if plan.get("admit") or plan.get("freed"):
        plan["admission"] = admission_settings()
    result = sql.run_apply(run_pk=txn.run.pk, plan=plan)
    txn.run.next_seq = result["run"]["next_seq"]
    publish_live_on_commit(txn.run.public_id, result["events"])
    for logged in result.get("other_events") or []:  # the tenant's older steps it admitted
        publish_live_on_commit(logged["run"], logged["events"])
    publish_after_commit([dispatch_of(row, txn.run.tenant_id) for row in result["dispatches"]])
    if result["wake"]:
        wake_after_commit()
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


def step_rows(run_pk: int) -> list[StepRow]:
    with connection.cursor() as cursor:
        cursor.execute(_STEP_ROWS, [run_pk])
        return [
            (sid, index, status, json.loads(out) if isinstance(out, str) else out, err, kind, pk)
            for sid, index, status, out, err, kind, pk in cursor.fetchall()
        ]


def step_lock(txn: RunTxn, step_run_id: int) -> StepRun:
    return StepRun.objects.select_for_update().get(pk=step_run_id, run_id=txn.run.pk)


def attempt_close(step: StepRun, outcome: str, *, error: str = "", code: str = "") -> None:
    """The step's current attempt ends with `outcome` (one UPDATE; its duration computed from
    its start)."""
    now = timezone.now()
    StepAttempt.objects.filter(step_run=step, number=step.attempt).update(
        outcome=outcome,
        error=error,
        error_code=code,
        finished_at=now,
        duration_ms=Extract(Value(now) - F("started_at"), "epoch") * 1000,
    )


def run_pk_of(step_run_id: int) -> int | None:
    return StepRun.objects.filter(pk=step_run_id).values_list("run_id", flat=True).first()
