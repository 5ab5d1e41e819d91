"""A neighbour's flood leaves room for a newcomer (docs/scheduling.md, "The fair reserve").

The last places of a queue's broker depth are kept for tenants below their fair share, and a
transaction that makes a step ready admits it itself, even while other tenants' steps wait,
when the fair policy would pick its tenant first. Together: an interactive tenant's step is
admitted at once and starts with the pool's next free slot, ahead of the flood's messages.
"""

from __future__ import annotations

import time

import pytest
from django.test import override_settings
from django.utils import timezone

from jobs import admission, dispatch
from jobs.models import Run, StepRun
from tenants.services import tenant_pause
from tests.conftest import make_tenant_client
from tests.integration.test_direct_admission import admission_lock_held
from tests.integration.test_fairness import flood, parallel_steps
from tests.support.workflows import submit

pytestmark = pytest.mark.django_db(transaction=True)

# Four slots: a broker depth of two, one place of it reserved.
POOL = {"steps.llm": 4, "steps.tool": 2, "steps.retrieval": 2, "steps.control": 2}


@pytest.fixture
def published(settings, monkeypatch):
    settings.SWITCHYARD_DIRECT_ADMISSION = True
    settings.SWITCHYARD_POOL_CAPACITY = POOL
    batches: list[list[dispatch.Dispatch]] = []
    monkeypatch.setattr(dispatch._publisher, "submit", batches.append)
    return batches


def _statuses(run: Run) -> list[str]:
    return sorted(StepRun.objects.filter(run=run).values_list("status", flat=True))


def _run_on_the_pool(tenant, n: int) -> None:
    """`n` of the tenant's steps hold worker slots (as if a worker had claimed them)."""
    for _ in range(n):
        run = submit(tenant, parallel_steps("held", 1, 10))
        StepRun.objects.filter(run=run).update(status="running")


def test_the_reserve_is_one_place_of_a_depth_of_two(published):
    assert admission.max_queued("steps.llm") == 2
    assert admission.fair_reserve("steps.llm") == 1


def test_a_tenant_holding_its_share_leaves_the_reserve_free(published):
    flooder = make_tenant_client("flooder").tenant
    _run_on_the_pool(flooder, 4)  # its share of the pool: all of it, while alone

    run = submit(flooder, parallel_steps("more", 3, 10))

    assert _statuses(run) == ["queued", "ready", "ready"]  # two places, one reserved


def test_a_newcomer_is_admitted_into_the_reserve_while_the_flood_waits(published):
    flooder = make_tenant_client("flooder").tenant
    newcomer = make_tenant_client("newcomer").tenant
    _run_on_the_pool(flooder, 4)
    submit(flooder, parallel_steps("more", 3, 10))

    run = submit(newcomer, parallel_steps("ask", 1, 10))

    # The flooder's steps wait, but the fair policy picks the newcomer first (no step in
    # flight against the flooder's five), and it is below its share: the reserve is its.
    assert _statuses(run) == ["queued"]
    assert StepRun.objects.filter(tenant=flooder, status="ready").count() == 2


def test_a_tenant_not_first_in_the_fair_order_is_left_to_the_scheduler(published):
    flooder = make_tenant_client("flooder").tenant
    other = make_tenant_client("other").tenant
    _run_on_the_pool(other, 1)
    _run_on_the_pool(flooder, 4)
    waiting = submit(flooder, parallel_steps("more", 3, 10))
    assert _statuses(waiting) == ["queued", "ready", "ready"]
    _run_on_the_pool(other, 5)  # now the other tenant holds more than the flooder

    run = submit(other, parallel_steps("late", 1, 10))

    assert _statuses(run) == ["ready"]


def test_only_the_tenant_first_in_the_fair_order_waits_for_the_schedulers_lock(published, settings):
    """While a scheduler's cycle holds the admission lock, a newcomer's step (first in the fair
    order) waits for it and is admitted when the cycle ends; a step of a tenant that is not
    first is left to the scheduler at once, however long the allowed wait."""
    settings.SWITCHYARD_ADMISSION_LOCK_WAIT_MS = 20_000
    flooder = make_tenant_client("flooder").tenant
    newcomer = make_tenant_client("newcomer").tenant
    _run_on_the_pool(flooder, 4)
    submit(flooder, parallel_steps("more", 3, 10))

    with admission_lock_held():
        started = time.monotonic()
        more = submit(flooder, parallel_steps("even-more", 1, 10))
        assert time.monotonic() - started < 10, "a tenant not first waited for the lock"
    assert _statuses(more) == ["ready"]

    with admission_lock_held(release_after_s=0.5):
        ask = submit(newcomer, parallel_steps("ask", 1, 10))
    assert _statuses(ask) == ["queued"]


def test_a_paused_tenants_waiting_steps_do_not_hold_back_another_tenant(published):
    paused = make_tenant_client("paused-backlog").tenant
    with override_settings(SWITCHYARD_DIRECT_ADMISSION=False):
        submit(paused, parallel_steps("backlog", 3, 10))  # ready, none in flight
    tenant_pause(tenant=paused)
    other = make_tenant_client("other").tenant

    run = submit(other, parallel_steps("ask", 1, 10))

    # The scheduler would skip the paused tenant: its steps are not a fair rival.
    assert _statuses(run) == ["queued"]


def test_the_scheduler_keeps_the_reserve_for_tenants_below_their_share(published, settings):
    settings.SWITCHYARD_DIRECT_ADMISSION = False
    flooder = make_tenant_client("flooder").tenant
    _run_on_the_pool(flooder, 4)
    submit(flooder, parallel_steps("more", 5, 10))

    assert len(admission.decide().admit) == 1  # the open place only

    newcomer = make_tenant_client("newcomer").tenant
    ask = submit(newcomer, parallel_steps("ask", 1, 10))
    assert admission.decide().admit == list(
        StepRun.objects.filter(run=ask).values_list("id", flat=True)
    )


@pytest.mark.cluster
def test_an_interactive_step_starts_with_the_next_free_slot_under_a_flood(cluster, settings):
    # Two slots, a broker depth of two with one place reserved. The flood's 2 s batch steps
    # hold the slots and the open place. An interactive step submitted when the next slot is
    # still most of a second from freeing must be admitted into the reserve and, with its
    # higher priority, take that slot: no batch step may start in a slot that freed before its
    # own. (Without the reserve the flood holds both places, its queued step takes the next
    # slot, and the interactive one waits a whole batch step longer.)
    pool = {**POOL, "steps.llm": 2}
    cluster.env["SWITCHYARD_POOL_CAPACITY"] = ",".join(f"{q}={n}" for q, n in pool.items())
    settings.SWITCHYARD_DIRECT_ADMISSION = True
    settings.SWITCHYARD_QUEUE_PREFIX = cluster.prefix
    settings.SWITCHYARD_POOL_CAPACITY = pool
    cluster.start_scheduler()
    cluster.start_worker("steps.llm", pool="threads", concurrency=2)
    batch = make_tenant_client("batchco").tenant
    assistant = make_tenant_client("assistant").tenant
    flood(batch, runs=20, width=1, latency_ms=2000, lane="batch")
    ask = parallel_steps("ask", 1, 20)
    for _ in range(3):
        cluster.wait_until(
            lambda: (
                _next_slot_frees_in_s(batch, step_s=2.0) > 0.8
                and StepRun.objects.filter(tenant=batch, status="queued").count() == 1
            ),
            30,
            "the flood never held both slots and the open place",
        )
        run = submit(assistant, ask, lane="interactive")
        assert cluster.wait_run(run, timeout=30).status == "succeeded"
        step = StepRun.objects.get(run=run)
        # A batch step that started first may only have taken a slot that freed together with
        # the one the interactive step took (both claims then race by milliseconds).
        overtaking = StepRun.objects.filter(
            tenant=batch, started_at__gt=step.ready_at, started_at__lt=step.started_at
        ).order_by("started_at")
        first = overtaking.values_list("started_at", flat=True).first()
        assert first is None or (step.started_at - first).total_seconds() < 0.25, (
            f"ready {step.ready_at}, admitted {step.dispatched_at}, started {step.started_at}; "
            f"batch steps started meanwhile: {list(overtaking.values_list('started_at'))}"
        )
    assert StepRun.objects.filter(tenant=batch, status="ready").exists(), "the flood ran dry"


def _next_slot_frees_in_s(tenant, *, step_s: float) -> float:
    """How long until the first of the tenant's two running steps (of `step_s`) ends."""
    started = list(
        StepRun.objects.filter(tenant=tenant, status="running").values_list("started_at", flat=True)
    )
    if len(started) < 2:
        return 0.0
    return step_s - (timezone.now() - min(started)).total_seconds()
