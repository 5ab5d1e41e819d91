"""Which ready steps the scheduler admits to the broker next: fairness, lanes and quotas.

The broker is kept shallow: per queue, at most `max_queued(queue)` admitted-but-unstarted steps
wait in RabbitMQ (a share of that queue's pool capacity), so the backlog stays in PostgreSQL
where the whole of it is visible, and AMQP priorities only order the little that was admitted.

Each free slot of a queue goes, in order:
1. to a lower lane (standard, batch) whose share of the queue's in-flight steps is below its
   reserved minimum (`SWITCHYARD_LANE_MIN_SHARE`), so that no lane starves;
2. otherwise to the eligible tenant with the fewest in-flight steps per unit of weight
   (weighted fair share of worker slots). The state is the current occupancy, read from
   PostgreSQL every cycle: a tenant that was idle has nothing in flight and gets the next
   slots until it holds its share, with no credit hoarded while it was idle;
3. within the chosen tenant, to its most urgent lane, then its oldest ready step.

A tenant is eligible while it is active (not paused), below `max_concurrent_steps` in flight
(steps that occupy a worker: `jobs.selectors.in_flight_steps`; a map's own row, a step waiting
for a child run, people or its retry time holds no slot),
has a steps-per-minute token left, and, for llm steps, has LLM tokens left today. Steps of runs
that have not started wait while the tenant has `max_active_runs` active runs, except a child
run's (its parent is active and waits for it). A held step
gets one `step.held` event saying why.

With `SWITCHYARD_ADMISSION_POLICY=fifo` the scheduler admits by readiness time alone (quotas
still hold): the baseline the benchmark compares fairness against.

Direct admission: a transaction that makes steps ready (a worker's report, a submission)
admits its tenant's next ready steps itself (in this module's order within a tenant,
`_concrete_steps`: its older ones first) when no other tenant's step waits in their queue, or
when others wait but the fair policy would pick this tenant first (`_next_fair`: its load is
the lowest, no lower lane below its share waits), so that a step does not wait for a
scheduler cycle. The last places of each queue (`fair_reserve`) go only to tenants below
their fair share, so a flood leaves room for a newcomer. The quotas are checked as the
scheduler checks them, under the same admission lock (waited for briefly when this tenant
would be picked first, else only tried: the scheduler is woken instead). It is written in
SQL, in the statement that makes the steps ready (`switchyard_run_apply` in
jobs/transitions/sql/functions.sql: the same rules as `queue_room`, `fair_reserve`,
`_concrete_steps` and `_blocked_reason` here, tested side by side in
tests/integration/test_direct_admission.py and test_fair_reserve.py). When the policy is
FIFO, every step waits for `decide` while another tenant's step waits.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime

from django.conf import settings
from django.db import connection
from django.db.models import Count, Q
from django.utils import timezone

from jobs.dispatch import unheld_timeout_above_s
from jobs.models import RunStatus, StepRun, StepStatus
from jobs.selectors import in_flight_steps
from jobs.steps import registry
from tenants.models import (
    LANE_RANK,
    Lane,
    Tenant,
)
from tenants.quotas import (
    TenantQuotaState,
    quota_states,
)

# Admission reads occupancy, quotas and buckets, then acts on them: two processes doing that
# at once could both admit a tenant's last free slot. One at a time admits: the scheduler takes
# this advisory lock for its session while it decides and admits (released when its connection
# ends, so a killed scheduler cannot keep it); a direct admission takes it for its transaction.
ADMISSION_LOCK_ID = 0x5357_4144  # "SWAD"

LANES_BY_URGENCY = sorted(LANE_RANK, key=LANE_RANK.get, reverse=True)
LOWER_LANES = [Lane.STANDARD, Lane.BATCH]


def pool_capacity() -> dict[str, int]:
    """Per queue, the concurrency of its worker pool(s), from `SWITCHYARD_POOL_CAPACITY`."""
    return dict(settings.SWITCHYARD_POOL_CAPACITY)


def queue_capacity(queue: str) -> int:
    """The concurrency of `queue`'s pools (`SWITCHYARD_QUEUE_MAX_QUEUED` for a queue not set)."""
    return pool_capacity().get(queue, settings.SWITCHYARD_QUEUE_MAX_QUEUED)


def max_queued(queue: str) -> int:
    capacity = queue_capacity(queue)
    bound = max(2, math.ceil(capacity * settings.SWITCHYARD_QUEUE_DEPTH_FACTOR))
    return min(bound, settings.SWITCHYARD_QUEUE_MAX_QUEUED)


def step_queues() -> list[str]:
    return sorted({spec.queue for spec in registry.kinds().values()})


@dataclass
class Hold:
    step_run_id: int
    reason: str


@dataclass
class Decision:
    admit: list[int] = field(default_factory=list)
    holds: list[Hold] = field(default_factory=list)
    # (tenant id) → steps-per-minute tokens this decision consumes
    spent: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    # (tenant id) → its bucket's level before them (refilled up to the decision's `now`, the
    # direct admissions' spends taken off), for every bucket this admission writes
    levels_before: dict[int, float] = field(default_factory=dict)

    def levels_after(self, admitted: dict[int, int]) -> dict[int, float]:
        """The buckets' levels once `admitted` (tenant id → steps) were admitted: the steps
        a cycle actually admits, which may be fewer than it chose (a busy run is skipped)."""
        return {
            tenant_id: level - admitted.get(tenant_id, 0)
            for tenant_id, level in self.levels_before.items()
        }


@dataclass
class _Backlog:
    """Ready steps of one (queue, tenant, lane) that may be admitted, counted up to a cap."""

    available: int


def _in_flight() -> tuple[dict[tuple[str, int], int], dict[int, int], dict[tuple[str, str], int]]:
    """Steps in flight (`jobs.selectors.in_flight_steps`) per (queue, tenant), tenant and
    (queue, lane)."""
    rows = in_flight_steps().values_list("queue", "tenant_id", "lane").annotate(n=Count("id"))
    by_queue_tenant: dict[tuple[str, int], int] = defaultdict(int)
    by_tenant: dict[int, int] = defaultdict(int)
    by_queue_lane: dict[tuple[str, str], int] = defaultdict(int)
    for queue, tenant_id, lane, n in rows:
        by_queue_tenant[(queue, tenant_id)] += n
        by_tenant[tenant_id] += n
        by_queue_lane[(queue, lane)] += n
    return by_queue_tenant, by_tenant, by_queue_lane


def _queued_by_queue() -> dict[str, int]:
    return dict(
        in_flight_steps()
        .filter(status=StepStatus.QUEUED)
        .values_list("queue")
        .annotate(n=Count("id"))
        .values_list("queue", "n")
    )


def _unheld_running_by_queue() -> dict[str, int]:
    return dict(
        in_flight_steps()
        .filter(status=StepStatus.RUNNING, timeout_s__gt=unheld_timeout_above_s())
        .values_list("queue")
        .annotate(n=Count("id"))
        .values_list("queue", "n")
    )


def queue_room(queue: str, *, queued: int, unheld_running: int, reserve: int = 0) -> int:
    """How many more steps `queue` may have admitted now.

    At most `max_queued(queue)` wait in the broker, less the `reserve` when the step's tenant
    holds its fair share already (`fair_reserve`); and no more than the pool's slots that
    unheld steps do not take. A worker prefetches up to its free slots, and a step running
    unheld (acknowledged at its start, it may run for hours) frees its prefetch credit at once:
    a held message prefetched behind it would wait for the slot, past RabbitMQ's
    consumer_timeout (found by the chaos suite, with a prefork pool of two both running 20 s
    steps).
    """
    capacity = queue_capacity(queue)
    return min(max_queued(queue) - reserve - queued, capacity - unheld_running - queued)


def fair_reserve(queue: str) -> int:
    """The last places of `queue`'s broker depth that only a tenant below its fair share may
    take: the depth (`max_queued`, at most the pool's capacity) times
    `SWITCHYARD_FAIR_RESERVE`, rounded up, leaving at least one place for everyone.

    A flooding tenant fills the queue up to the reserve and no further, so a tenant that
    arrives finds room at once (its step is admitted in the transaction that made it ready)
    instead of waiting for a flood's step to start."""
    fraction = settings.SWITCHYARD_FAIR_RESERVE
    capacity = queue_capacity(queue)
    depth = min(max_queued(queue), capacity)
    if fraction <= 0 or depth < 2:
        return 0
    return min(depth - 1, math.ceil(depth * fraction))


def fair_share(queue: str, tenant_id: int, weights: dict[int, int]) -> float:
    """`tenant_id`'s share of `queue`'s pool: its weight's part of the weights of the tenants
    with steps in flight or ready there (`weights`, which includes it)."""
    capacity = queue_capacity(queue)
    return capacity * weights[tenant_id] / max(1, sum(weights.values()))


# The distinct (queue, tenant, lane) buckets with ready steps, by a skip scan over the partial
# index `steprun_ready_bucket`: one index probe per bucket, not one row per ready step, so a
# cycle costs the same with a thousand or a million steps waiting.
_BUCKETS = f"""
WITH RECURSIVE bucket AS (
    (SELECT queue, tenant_id, lane FROM {StepRun._meta.db_table}
     WHERE status = 'ready'
     ORDER BY queue, tenant_id, lane LIMIT 1)
    UNION ALL
    SELECT next.queue, next.tenant_id, next.lane FROM bucket, LATERAL (
        SELECT queue, tenant_id, lane FROM {StepRun._meta.db_table} s
        WHERE s.status = 'ready'
          AND (s.queue, s.tenant_id, s.lane) > (bucket.queue, bucket.tenant_id, bucket.lane)
        ORDER BY s.queue, s.tenant_id, s.lane LIMIT 1
    ) next
)
SELECT queue, tenant_id, lane FROM bucket
"""


def _bucket_steps(queue: str, tenant_id: int, lane: str, *, started_only: bool = False):
    steps = StepRun.objects.filter(
        status=StepStatus.READY, queue=queue, tenant_id=tenant_id, lane=lane
    )
    if started_only:
        # A child run is part of a run tree that has started: `max_active_runs` never holds
        # it back (its parent, active, waits for it: holding it would deadlock both).
        steps = steps.filter(
            Q(run__status__in=[RunStatus.RUNNING, RunStatus.WAITING])
            | Q(run__parent_step__isnull=False)
        )
    return steps.order_by("ready_at", "id")


def _ready_buckets(room: dict[str, int]) -> list[tuple[str, int, str]]:
    with connection.cursor() as cursor:
        cursor.execute(_BUCKETS)
        return [row for row in cursor.fetchall() if row[0] in room]


def _backlog(
    buckets: list[tuple[str, int, str]],
    room: dict[str, int],
    tenants: dict[int, Tenant],
    quotas: dict[int, TenantQuotaState],
) -> dict[tuple[str, int, str], _Backlog]:
    """Admissible ready steps per bucket, each count capped at its queue's free room.

    A tenant at its `max_active_runs` can only use steps of runs already started.
    """
    backlog = {}
    for queue, tenant_id, lane in buckets:
        tenant = tenants.get(tenant_id)
        if tenant is None or not tenant.is_active:
            continue
        at_run_limit = quotas[tenant_id].active_runs >= tenant.max_active_runs
        capped = _bucket_steps(queue, tenant_id, lane, started_only=at_run_limit)[: room[queue]]
        available = capped.count()
        if available:
            backlog[(queue, tenant_id, lane)] = _Backlog(available)
    return backlog


def decide(now: datetime | None = None) -> Decision:
    """Choose the steps to admit now. Call with the admission lock held (`scheduler`)."""
    now = now or timezone.now()
    decision = Decision()
    queued = _queued_by_queue()
    unheld = _unheld_running_by_queue()
    room = {
        q: queue_room(q, queued=queued.get(q, 0), unheld_running=unheld.get(q, 0))
        for q in step_queues()
    }
    room = {q: free for q, free in room.items() if free > 0}
    if not room:
        return decision
    buckets = _ready_buckets(room)
    if not buckets:  # nothing waits: no tenant or quota needs reading
        return decision
    tenants = Tenant.objects.in_bulk()
    quotas = quota_states(list(tenants.values()), now=now)
    backlog = _backlog(buckets, room, tenants, quotas)
    if not backlog:
        return decision
    in_flight_qt, in_flight_t, in_flight_ql = _in_flight()
    # Every bucket that changes: by this decision, or by direct admissions' spends to fold.
    levels_before = {tenant_id: quota.step_tokens for tenant_id, quota in quotas.items()}
    fifo = settings.SWITCHYARD_ADMISSION_POLICY == "fifo"
    picks: dict[tuple[str, int, str], int] = defaultdict(int)
    held: dict[tuple[str, int, str], str] = {}

    for queue, free in sorted(room.items()):
        queue_backlog = {k: v for k, v in backlog.items() if k[0] == queue}
        # Past `open_room`, only a tenant below its fair share is admitted (`fair_reserve`).
        open_room = queue_room(
            queue,
            queued=queued.get(queue, 0),
            unheld_running=unheld.get(queue, 0),
            reserve=0 if fifo else fair_reserve(queue),
        )
        weights = _active_weights(queue, queue_backlog, tenants, in_flight_qt)
        for slot in range(free):
            eligible = list(
                _eligible_buckets(queue, queue_backlog, tenants, quotas, in_flight_t, held)
            )
            if slot >= open_room:
                eligible = [
                    bucket
                    for bucket in eligible
                    if in_flight_qt[(queue, bucket[0])] < fair_share(queue, bucket[0], weights)
                ]
            if not eligible:
                break
            if fifo:
                choice = _oldest(queue, eligible, picks)
            else:
                choice = _next_fair(queue, eligible, tenants, in_flight_qt, in_flight_ql)
            if choice is None:
                break
            tenant_id, lane = choice
            queue_backlog[(queue, tenant_id, lane)].available -= 1
            picks[(queue, tenant_id, lane)] += 1
            in_flight_qt[(queue, tenant_id)] += 1
            in_flight_t[tenant_id] += 1
            in_flight_ql[(queue, lane)] += 1
            quotas[tenant_id].step_tokens -= 1
            decision.spent[tenant_id] += 1

    changed = set(decision.spent) | {t for t, quota in quotas.items() if quota.spends_to_fold}
    decision.levels_before = {tenant_id: levels_before[tenant_id] for tenant_id in changed}
    decision.admit = _concrete_steps(picks, tenants, quotas)
    decision.holds = _concrete_holds(held)
    return decision


def _active_weights(queue, queue_backlog, tenants, in_flight_qt) -> dict[int, int]:
    """The weights of the tenants with steps ready (`queue_backlog`) or in flight in `queue`."""
    active = {tenant_id for (_q, tenant_id, _lane) in queue_backlog}
    active |= {tenant_id for (q, tenant_id), n in in_flight_qt.items() if q == queue and n > 0}
    return {
        tenant_id: max(1, tenants[tenant_id].weight) for tenant_id in active if tenant_id in tenants
    }


def _blocked_reason(
    tenant: Tenant, quota: TenantQuotaState, queue: str, in_flight: int
) -> tuple[str, bool] | None:
    """Why a tenant's steps cannot be admitted now, and whether its runs should be told.

    Waiting for a concurrency slot or a rate token is ordinary queueing; an exhausted daily
    LLM token budget can hold steps for hours, so the run's log says so.
    """
    if in_flight >= tenant.max_concurrent_steps:
        return "max_concurrent_steps", False
    if quota.step_tokens < 1:
        return "steps_per_minute", False
    if queue == registry.QUEUE_LLM and quota.llm_tokens_today >= tenant.llm_tokens_per_day:
        return (
            f"tenant {tenant.slug!r} used {quota.llm_tokens_today} of its "
            f"{tenant.llm_tokens_per_day} LLM tokens for today (UTC); this llm step waits "
            "for the budget to renew",
            True,
        )
    return None


def _eligible_buckets(queue, queue_backlog, tenants, quotas, in_flight_t, held):
    """The (tenant, lane) buckets of `queue` with steps that may be admitted now."""
    for (_q, tenant_id, lane), bucket in queue_backlog.items():
        if bucket.available <= 0:
            continue
        blocked = _blocked_reason(
            tenants[tenant_id], quotas[tenant_id], queue, in_flight_t[tenant_id]
        )
        if blocked is not None:
            reason, tell = blocked
            if tell:
                held.setdefault((queue, tenant_id, lane), reason)
            continue
        yield tenant_id, lane


def _next_fair(queue, eligible, tenants, in_flight_qt, in_flight_ql) -> tuple[int, str]:
    total = sum(n for (q, _lane), n in in_flight_ql.items() if q == queue)
    shares = settings.SWITCHYARD_LANE_MIN_SHARE
    # 1. A lower lane below its reserved share goes first.
    for lane in LOWER_LANES:
        in_lane = [bucket for bucket in eligible if bucket[1] == lane]
        if in_lane and in_flight_ql[(queue, lane)] < shares.get(lane, 0) * (total + 1):
            return min(in_lane, key=lambda b: _fair_key(b, queue, tenants, in_flight_qt))
    # 2. The tenant furthest below its weighted share; 3. its most urgent lane.
    return min(eligible, key=lambda b: _fair_key(b, queue, tenants, in_flight_qt))


def _fair_key(bucket, queue, tenants, in_flight_qt) -> tuple[float, int, int]:
    tenant_id, lane = bucket
    load = in_flight_qt[(queue, tenant_id)] / max(1, tenants[tenant_id].weight)
    return (load, -LANE_RANK[lane], tenant_id)


def _oldest(queue, eligible, picks) -> tuple[int, str] | None:
    """FIFO baseline: the bucket whose next unpicked step became ready first."""
    heads = {}
    for tenant_id, lane in eligible:
        offset = picks[(queue, tenant_id, lane)]
        head = (
            _bucket_steps(queue, tenant_id, lane)
            .values_list("ready_at", "id")[offset : offset + 1]
            .first()
        )
        if head is not None:
            heads[(tenant_id, lane)] = head
    return min(heads, key=heads.get) if heads else None


def _concrete_steps(picks, tenants, quotas) -> list[int]:
    """The steps of each picked bucket: first the oldest of runs already started (and child
    runs), so that work in progress finishes before new runs start; then the oldest of runs
    not yet started, while the tenant has room under `max_active_runs` (counting the runs this
    cycle starts). A started run's step is never stuck behind older steps of runs that may
    not start yet."""
    chosen: list[int] = []
    new_runs: dict[int, set[int]] = defaultdict(set)
    for (queue, tenant_id, lane), n in picks.items():
        if n <= 0:
            continue
        started = list(
            _bucket_steps(queue, tenant_id, lane, started_only=True).values_list("id", flat=True)[
                :n
            ]
        )
        chosen.extend(started)
        wanted = n - len(started)
        allowed = tenants[tenant_id].max_active_runs - quotas[tenant_id].active_runs
        if wanted <= 0 or len(new_runs[tenant_id]) >= allowed:
            continue
        unstarted = (
            _bucket_steps(queue, tenant_id, lane)
            .filter(run__status=RunStatus.ACCEPTED, run__parent_step__isnull=True)
            .values_list("id", "run_id")[: wanted * 4]
        )
        for step_run_id, run_id in unstarted:
            if wanted <= 0:
                break
            if run_id not in new_runs[tenant_id]:
                if len(new_runs[tenant_id]) >= allowed:
                    continue
                new_runs[tenant_id].add(run_id)
            chosen.append(step_run_id)
            wanted -= 1
    return chosen


def _concrete_holds(held) -> list[Hold]:
    """The held steps that have not been told why yet (at most 100 a cycle)."""
    holds: list[Hold] = []
    for (queue, tenant_id, lane), reason in held.items():
        ids = (
            _bucket_steps(queue, tenant_id, lane)
            .exclude(held_reason=reason)
            .values_list("id", flat=True)[:100]
        )
        holds.extend(Hold(step_run_id, reason) for step_run_id in ids)
        if len(holds) >= 100:
            break
    return holds
