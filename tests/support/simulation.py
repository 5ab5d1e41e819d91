"""A deployment simulated in one process, for liveness properties: every part that decides
is real, every part that only carries or waits is simulated.

Real: PostgreSQL, the scheduler's cycle (`jobs.scheduler.run_cycle`: due retries, leases,
stale dispatches, approvals past their time, then `admission.decide` and `steps_admit`),
direct admission in the transactions that make steps ready, and every transition
(`jobs.transitions`: claim, complete, fail, child runs; `approvals.services`: approval
requests and decisions).

Simulated:
- the broker: `jobs.scheduler.publish` and the after-commit publisher of direct admissions put
  their messages in one in-memory FIFO per step queue (`Broker`);
- the workers: per queue, a pool of `SWITCHYARD_POOL_CAPACITY[queue]` slots takes messages
  in order, claims each (`step_claim`), holds it for a random number of ticks, then runs the
  kind's handler and reports, as `jobs.execution.step_execute` does; `workflow` and
  `approval` steps are handed to their services at once;
- reviewers: each approval requested is approved, rejected or (when it has a deadline) left
  to expire, a random number of ticks later;
- the passing of time: each tick moves every timestamp stored by the jobs and tenants apps
  `tick_s` seconds into the past (`pass_time`). Python (`timezone.now`) and PostgreSQL
  (`now()`, which the transitions' SQL functions use) keep one real clock, and to both it is
  as if `tick_s` had passed: retry delays, leases, stale dispatches, approval deadlines and
  rate-limit refills come due without sleeping.

A tick is: let time pass, run one scheduler cycle, report the steps whose time is up, fill
free worker slots from the broker, decide the approvals that are due. `observe` is
called after the cycle and after every transition a worker or reviewer causes, so a test can
check an invariant at each of those instants.
"""

from __future__ import annotations

import random
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import cache
from typing import Any
from unittest import mock

from django.apps import apps
from django.db import connection, models
from django.db.models import Count, Q
from django.test import override_settings

from approvals.models import Approval
from approvals.services import ApprovalError, Reviewer, approval_decide, step_request_approval
from jobs import admission, dispatch
from jobs.dispatch import Dispatch
from jobs.models import Run, RunStatus, StepRun, StepStatus
from jobs.scheduler import run_cycle
from jobs.statuses import RUN_FINAL, STEP_FINAL
from jobs.steps import registry
from jobs.steps.registry import StepContext, StepFailure
from jobs.transitions.steps import (
    Claim,
    step_claim,
    step_complete,
    step_fail,
    step_start_child_run,
)
from tenants.models import Tenant

REVIEWER = Reviewer(name="api key simulated-reviewer", api_key_name="simulated-reviewer")


def reset_database() -> None:
    """Empty every table that holds tenant data (tenants, and by cascade their workflows,
    runs, steps, events, approvals, quotas' state): hypothesis runs many examples in one
    transactional test, and admission reads the whole platform."""
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {Tenant._meta.db_table} CASCADE")


@cache
def _timestamp_columns() -> tuple[tuple[str, tuple[str, ...]], ...]:
    tables = []
    for app in ("tenants", "jobs", "approvals"):
        for model in apps.get_app_config(app).get_models():
            if model._meta.proxy or not model._meta.managed:
                continue
            columns = tuple(
                field.column
                for field in model._meta.concrete_fields
                if isinstance(field, models.DateTimeField)
            )
            if columns:
                tables.append((model._meta.db_table, columns))
    return tuple(tables)


def pass_time(seconds: float) -> None:
    """As if `seconds` passed: every timestamp the jobs, tenants and approvals apps store moves
    that far into the past (NULLs stay NULL), in one round trip. Call between transactions."""
    shift = f"interval '{seconds:.6f} seconds'"
    statements = [
        f'UPDATE "{table}" SET '
        + ", ".join(f'"{column}" = "{column}" - {shift}' for column in columns)
        for table, columns in _timestamp_columns()
    ]
    with connection.cursor() as cursor:
        cursor.execute("; ".join(statements))


class Broker:
    """The step queues of RabbitMQ: what was published, per queue, in order."""

    def __init__(self) -> None:
        self.queues: dict[str, deque[Dispatch]] = defaultdict(deque)

    def publish(self, dispatches: list[Dispatch]) -> tuple[int, int]:
        """Stands for `jobs.dispatch.publish` (the scheduler's) and for the publisher thread
        that direct admissions hand their messages to after commit."""
        for message in dispatches:
            self.queues[message.queue].append(message)
        return len(dispatches), 0

    def depths(self) -> dict[str, int]:
        return {queue: len(messages) for queue, messages in self.queues.items() if messages}


@dataclass
class Busy:
    """A worker slot holding a claimed step until `done_at` (a tick number)."""

    claim: Claim
    done_at: int


@dataclass
class PendingDecision:
    approval: Approval
    decision: str  # approve, reject, or ignore (left to its deadline)
    due_at: int


@dataclass
class Simulation:
    """The simulated workers, broker and reviewers of one workload, and its tick count."""

    capacity: dict[str, int]
    tick_s: float
    rng: random.Random
    # The longest a step holds its worker slot, in ticks (0: it reports as soon as claimed).
    max_hold_ticks: int = 2
    max_decision_ticks: int = 2
    observe: Callable[[str], None] = lambda where: None
    broker: Broker = field(default_factory=Broker)
    busy: dict[str, list[Busy]] = field(default_factory=lambda: defaultdict(list))
    decisions: list[PendingDecision] = field(default_factory=list)
    tick_number: int = 0

    @contextmanager
    def running(self, **platform_settings: Any) -> Iterator[Simulation]:
        """Install the simulated broker in place of the scheduler's publish and of the
        publisher of direct admissions, with `platform_settings` (SWITCHYARD_* overrides) and
        direct admission on, as in production."""
        with ExitStack() as stack:
            stack.enter_context(
                override_settings(SWITCHYARD_DIRECT_ADMISSION=True, **platform_settings)
            )
            stack.enter_context(mock.patch("jobs.scheduler.publish", self.broker.publish))
            stack.enter_context(
                mock.patch.object(dispatch._publisher, "submit", self.broker.publish)
            )
            yield self

    # --- one tick ---------------------------------------------------------------------------

    def tick(self) -> None:
        self.tick_number += 1
        pass_time(self.tick_s)
        run_cycle(sweeps=True)
        self.observe("after the scheduler's cycle")
        self._report_due()
        self._take_messages()
        self._decide_due()

    def _report_due(self) -> None:
        for queue, slots in self.busy.items():
            due = [slot for slot in slots if slot.done_at <= self.tick_number]
            slots[:] = [slot for slot in slots if slot.done_at > self.tick_number]
            for slot in due:
                self._run_and_report(slot.claim)
                self.observe(f"after a {queue} worker reported {_label(slot.claim)}")

    def _take_messages(self) -> None:
        """Each pool takes messages while it has a free slot, in the order they were
        published (a message whose token is stale is dropped, as a worker's claim drops it)."""
        progress = True
        while progress:  # a report may admit directly a step of another queue
            progress = False
            for queue in sorted(self.broker.queues):
                messages = self.broker.queues[queue]
                while messages and len(self.busy[queue]) < self.capacity.get(queue, 0):
                    message = messages.popleft()
                    progress = True
                    self._deliver(queue, message)

    def _deliver(self, queue: str, message: Dispatch) -> None:
        claim = step_claim(
            step_run_id=message.step_run_id,
            dispatch_token=str(message.dispatch_token),
            worker=f"simulated@{queue}",
        )
        if claim is None:
            return
        self.observe(f"after a {queue} worker claimed {_label(claim)}")
        if claim.kind == "workflow":
            step_start_child_run(claim=claim)
        elif claim.kind == "approval":
            approval = step_request_approval(claim=claim)
            if approval is not None:
                self._plan_decision(approval)
        else:
            # Half the steps report at once (as `step_execute` would); the others hold their
            # slot for up to `max_hold_ticks` ticks.
            if self.max_hold_ticks and self.rng.random() < 0.5:
                hold = self.rng.randint(1, self.max_hold_ticks)
                self.busy[queue].append(Busy(claim, self.tick_number + hold))
                return
            self._run_and_report(claim)
        self.observe(f"after a {queue} worker reported {_label(claim)}")

    def _run_and_report(self, claim: Claim) -> None:
        """What `jobs.execution.step_execute` does after its claim: the kind's handler, then
        `step_complete` or `step_fail`."""
        context = StepContext(
            run_id=str(claim.run_public_id),
            tenant_id=claim.tenant_id,
            step_id=claim.step_id,
            map_index=claim.map_index,
            kind=claim.kind,
            attempt=claim.attempt,
            input=claim.input,
            idempotency_key=claim.idempotency_key,
            deadline=claim.deadline,
        )
        try:
            output = registry.kind(claim.kind).load_handler()(context)
        except StepFailure as failure:
            step_fail(
                claim=claim, error=failure.message, code=failure.code, retryable=failure.retryable
            )
        else:
            step_complete(claim=claim, output=output)

    def _plan_decision(self, approval: Approval) -> None:
        choices = ["approve", "reject"] + (["ignore"] if approval.due_at else [])
        self.decisions.append(
            PendingDecision(
                approval=approval,
                decision=self.rng.choice(choices),
                due_at=self.tick_number + self.rng.randint(0, self.max_decision_ticks),
            )
        )

    def _decide_due(self) -> None:
        due = [d for d in self.decisions if d.due_at <= self.tick_number]
        self.decisions = [d for d in self.decisions if d.due_at > self.tick_number]
        for pending in due:
            if pending.decision == "ignore":
                continue
            try:
                approval_decide(
                    approval=pending.approval,
                    reviewer=REVIEWER,
                    decision=pending.decision,
                    comment="decided by the simulation",
                )
            except ApprovalError:
                continue  # expired or cancelled meanwhile: nothing left to decide
            self.observe(f"after a reviewer's {pending.decision} of approval {pending.approval.pk}")

    # --- what the test reads ------------------------------------------------------------------

    def workers_busy(self) -> dict[str, list[str]]:
        return {q: [_label(s.claim) for s in slots] for q, slots in self.busy.items() if slots}


def _label(claim: Claim) -> str:
    index = "" if claim.map_index is None else f"[{claim.map_index}]"
    return f"{claim.step_id}{index} (step run {claim.step_run_id})"


# --- occupancy, as a user of the quotas understands it ------------------------------------------


def occupies_a_worker() -> Q:
    """Steps admitted to a worker or running on one. A map's own row is not such a step (its
    items are); nor is a step waiting for a child run, for people or for its retry time."""
    return Q(status__in=[StepStatus.QUEUED, StepStatus.RUNNING]) & ~Q(
        kind="map", map_index__isnull=True
    )


@dataclass(frozen=True)
class Occupancy:
    """Steps occupying a worker per tenant, and admitted steps waiting in each queue."""

    in_flight: dict[int, int]
    queued: dict[str, int]


def occupancy() -> Occupancy:
    rows = (
        StepRun.objects.filter(occupies_a_worker())
        .values_list("tenant_id", "queue", "status")
        .annotate(n=Count("id"))
    )
    in_flight: dict[int, int] = defaultdict(int)
    queued: dict[str, int] = defaultdict(int)
    for tenant_id, queue, status, n in rows:
        in_flight[tenant_id] += n
        if status == StepStatus.QUEUED:
            queued[queue] += n
    return Occupancy(dict(in_flight), dict(queued))


def unfinished_runs() -> list[Run]:
    return list(
        Run.objects.exclude(status__in=RUN_FINAL)
        .select_related("tenant", "workflow_version__workflow")
        .order_by("id")
    )


def progress_fingerprint() -> tuple[tuple, tuple, tuple]:
    """(runs, steps, approvals) with their statuses (and steps' attempts): it changes whenever
    anything progresses."""
    runs = tuple(Run.objects.order_by("id").values_list("id", "status"))
    steps = tuple(StepRun.objects.order_by("id").values_list("id", "status", "attempt"))
    approvals = tuple(Approval.objects.order_by("id").values_list("id", "status"))
    return runs, steps, approvals


def diagnosis(simulation: Simulation) -> str:
    """Why the unfinished runs are where they are: quotas and occupancy per tenant, each
    unfinished step with its held reason, what admission would decide now, the broker and
    the workers."""
    passed = simulation.tick_number * simulation.tick_s
    lines = [f"tick {simulation.tick_number} ({passed:.0f} s of simulated time)"]
    now = occupancy()
    in_flight = now.in_flight
    # What a count of every queued or running row would say (a map's own row included).
    rows = dict(
        StepRun.objects.filter(status__in=[StepStatus.QUEUED, StepStatus.RUNNING])
        .values_list("tenant_id")
        .annotate(n=Count("id"))
        .values_list("tenant_id", "n")
    )
    active = dict(
        Run.objects.filter(status__in=[RunStatus.RUNNING, RunStatus.WAITING])
        .values_list("tenant_id")
        .annotate(n=Count("id"))
        .values_list("tenant_id", "n")
    )
    labels: dict[int, str] = {}
    for tenant in Tenant.objects.order_by("id"):
        lines.append(
            f"tenant {tenant.slug}: in flight {in_flight.get(tenant.pk, 0)}"
            f"/{tenant.max_concurrent_steps} max_concurrent_steps (queued or running rows of "
            f"any kind: {rows.get(tenant.pk, 0)}), active runs "
            f"{active.get(tenant.pk, 0)}/{tenant.max_active_runs} max_active_runs, "
            f"{tenant.steps_per_minute} steps/min, weight {tenant.weight}"
        )
    for run in unfinished_runs():
        parent = f", child of step run {run.parent_step_id}" if run.parent_step_id else ""
        lines.append(
            f"run {run.pk} ({run.tenant.slug}, {run.workflow_version.workflow.name}, "
            f"lane {run.lane}{parent}): {run.status}"
        )
        for step in run.steps.exclude(status__in=STEP_FINAL).order_by("id"):
            index = "" if step.map_index is None else f"[{step.map_index}]"
            label = f"{step.step_id}{index}"
            labels[step.pk] = f"run {run.pk} {label}"
            held = f", held: {step.held_reason}" if step.held_reason else ""
            lines.append(
                f"    step run {step.pk} {label} {step.kind} on {step.queue}: {step.status}, "
                f"attempt {step.attempt}/{step.max_attempts}{held}"
            )
    try:
        decision = admission.decide()
        admits = [labels.get(pk, str(pk)) for pk in decision.admit]
        holds = [f"{labels.get(h.step_run_id, h.step_run_id)}: {h.reason}" for h in decision.holds]
        lines.append(f"admission.decide() now: admit {admits}, holds {holds}")
    except Exception as exc:
        lines.append(f"admission.decide() raised {exc!r}")
    lines.append(f"broker depths {simulation.broker.depths()}, queued rows {now.queued}")
    lines.append(f"workers busy {simulation.workers_busy()}")
    pending = [f"{d.approval.pk}: {d.decision} at tick {d.due_at}" for d in simulation.decisions]
    lines.append(f"approvals to decide {pending}")
    return "\n".join(lines)
