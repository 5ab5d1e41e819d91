"""Direct admission: a transaction that makes steps ready admits them itself when nothing else
waits in their queue, within the tenant's quotas, under the scheduler's admission lock
(jobs/admission.py, "Direct admission"); everything else is left to the scheduler's cycle."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import httpx
import pytest
from django.db import connection, transaction
from django.test import override_settings
from django.utils import timezone

from jobs import admission, dispatch
from jobs.models import Run, StepRun
from jobs.transitions.runs import run_cancel
from jobs.transitions.steps import step_claim, step_complete
from tenants.models import Tenant
from tenants.quotas import quota_states
from tests.conftest import make_tenant_client
from tests.support.sessions import other_session
from tests.support.workflows import event_types, submit

pytestmark = pytest.mark.django_db(transaction=True)


def _llm(step_id: str, **fields) -> dict:
    return {"id": step_id, "kind": "llm", "provider": "simulated", "prompt": step_id, **fields}


CHAIN = {"name": "chain", "steps": [_llm("a"), _llm("b", after=["a"])]}
FAN = {"name": "fan", "steps": [_llm("x"), _llm("y"), _llm("z")]}


@pytest.fixture
def published(settings, monkeypatch):
    """Direct admission on (the in-process tests' default is off); what the process hands to
    its publisher thread after each commit."""
    settings.SWITCHYARD_DIRECT_ADMISSION = True
    batches: list[list[dispatch.Dispatch]] = []
    monkeypatch.setattr(dispatch._publisher, "submit", batches.append)
    return batches


def _status(run: Run) -> dict[str, str]:
    return dict(StepRun.objects.filter(run=run).values_list("step_id", "status"))


def test_a_step_made_ready_on_an_idle_system_is_queued_and_published_after_commit(owner, published):
    run = submit(owner.tenant, CHAIN)

    assert _status(run) == {"a": "queued", "b": "pending"}
    assert event_types(run) == ["run.accepted", "step.ready", "step.queued"]
    step = StepRun.objects.get(run=run, step_id="a")
    [[message]] = published
    assert (message.step_run_id, message.dispatch_token) == (step.pk, step.dispatch_token)
    assert message.queue == "steps.llm" and message.lane == owner.tenant.default_lane


def test_a_rolled_back_transaction_publishes_nothing(owner, published):
    with pytest.raises(RuntimeError), transaction.atomic():
        submit(owner.tenant, CHAIN)
        raise RuntimeError("the request failed after the submission")

    assert not Run.objects.exists() and published == []


def test_a_step_waiting_in_the_queue_leaves_the_next_one_to_the_scheduler(
    owner, outsider, settings, published
):
    settings.SWITCHYARD_DIRECT_ADMISSION = False
    waiting = submit(outsider.tenant, CHAIN)  # another tenant's step, ready, not admitted
    settings.SWITCHYARD_DIRECT_ADMISSION = True

    run = submit(owner.tenant, CHAIN)

    assert _status(waiting)["a"] == "ready"
    assert _status(run)["a"] == "ready"  # the fair choice between the two is the scheduler's
    assert published == []


def _older_step_waiting(tenant, *, started: bool) -> Run:
    """A run of the tenant whose first step is ready, not admitted (the scheduler's, as if its
    cycle had not come yet); `started`: the run has begun (an earlier step of it ran)."""
    with override_settings(SWITCHYARD_DIRECT_ADMISSION=False):
        older = submit(tenant, {**CHAIN, "name": "older"})
    if started:
        Run.objects.filter(pk=older.pk).update(status="running")
    return older


def test_a_tenants_older_ready_step_is_admitted_before_its_newer_one(owner, published):
    older = _older_step_waiting(owner.tenant, started=True)

    newer = submit(owner.tenant, CHAIN)

    assert _status(older)["a"] == "queued" and _status(newer)["a"] == "queued"
    assert event_types(older)[-1] == "step.queued"  # in the older run's own log
    [batch] = published
    older_a = StepRun.objects.get(run=older, step_id="a")
    assert batch[0].step_run_id == older_a.pk  # in the tenant's order


def test_a_tenants_last_slot_goes_to_its_older_step(published):
    single = make_tenant_client("single-slot", max_concurrent_steps=1)
    older = _older_step_waiting(single.tenant, started=True)

    newer = submit(single.tenant, CHAIN)

    assert _status(older)["a"] == "queued"
    assert _status(newer)["a"] == "ready"


def test_runs_not_started_start_in_order_within_the_active_runs_quota(published):
    one_run = make_tenant_client("one-run", max_active_runs=1)
    older = _older_step_waiting(one_run.tenant, started=False)

    newer = submit(one_run.tenant, CHAIN)

    # The older run takes the one active place; the newer one waits for the scheduler.
    assert _status(older)["a"] == "queued" and _status(newer)["a"] == "ready"


def test_a_started_runs_next_step_is_admitted_past_runs_that_may_not_start(published):
    one_run = make_tenant_client("one-active", max_active_runs=1).tenant
    first = submit(one_run, CHAIN)
    step = StepRun.objects.get(run=first, step_id="a")
    claim = step_claim(step_run_id=step.pk, dispatch_token=str(step.dispatch_token), worker="w/1")
    later = [submit(one_run, {**CHAIN, "name": f"later-{n}"}) for n in range(3)]
    assert [_status(run)["a"] for run in later] == ["ready"] * 3  # may not start yet

    step_complete(claim=claim, output={})

    assert _status(first)["b"] == "queued"  # by the report, past the older steps
    assert [_status(run)["a"] for run in later] == ["ready"] * 3


def test_a_report_that_frees_a_slot_admits_the_tenants_waiting_step(published):
    single = make_tenant_client("one-slot-report", max_concurrent_steps=1).tenant
    one_step = {"name": "one", "steps": [_llm("only")]}
    first = submit(single, one_step)
    step = StepRun.objects.get(run=first)
    claim = step_claim(step_run_id=step.pk, dispatch_token=str(step.dispatch_token), worker="w/1")
    waiting = submit(single, {**one_step, "name": "two"})
    assert _status(waiting)["only"] == "ready"  # the one slot is taken

    step_complete(claim=claim, output={})  # the run ends: nothing of it becomes ready

    assert _status(waiting)["only"] == "queued"  # the freed slot, taken by the report
    assert event_types(waiting)[-1] == "step.queued"


def test_direct_admission_keeps_the_concurrency_quota(published):
    capped = make_tenant_client("capped", max_concurrent_steps=2)
    run = submit(capped.tenant, FAN)
    assert sorted(_status(run).values()) == ["queued", "queued", "ready"]


def test_direct_admission_spends_the_rate_quota_s_tokens(published):
    metered = make_tenant_client("metered", steps_per_minute=6)  # a bucket of one token
    run = submit(metered.tenant, FAN)
    assert sorted(_status(run).values()) == ["queued", "ready", "ready"]
    bucket = quota_states([metered.tenant], now=timezone.now())[metered.tenant.pk]
    assert bucket.step_tokens < 1
    assert _status(submit(metered.tenant, {**CHAIN, "name": "later"}))["a"] == "ready"


def test_a_paused_tenant_s_step_is_left_ready(published):
    paused = make_tenant_client("paused")
    Tenant.objects.filter(pk=paused.tenant.pk).update(is_active=False)
    paused.tenant.refresh_from_db()
    assert _status(submit(paused.tenant, CHAIN))["a"] == "ready"
    assert published == []


def test_a_run_over_the_active_runs_quota_is_left_to_the_scheduler(published):
    single = make_tenant_client("single", max_active_runs=1)
    first = submit(single.tenant, CHAIN)
    Run.objects.filter(pk=first.pk).update(status="running")
    assert _status(submit(single.tenant, {**CHAIN, "name": "second"}))["a"] == "ready"
    assert [len(batch) for batch in published] == [1]  # the first run's step only


@contextmanager
def admission_lock_held(release_after_s: float | None = None):
    """Another session (a scheduler's cycle) holds the admission lock: until the block ends, or
    for `release_after_s` from its start."""
    with other_session() as scheduler:
        scheduler.execute("SELECT pg_advisory_lock(%s)", [admission.ADMISSION_LOCK_ID])
        release = threading.Timer(
            release_after_s if release_after_s is not None else 3600,
            lambda: scheduler.execute(
                "SELECT pg_advisory_unlock(%s)", [admission.ADMISSION_LOCK_ID]
            ),
        )
        if release_after_s is not None:
            release.start()
        try:
            yield
        finally:
            release.cancel()
            if release_after_s is not None:
                release.join()
            scheduler.execute("SELECT pg_advisory_unlock_all()")


def test_a_step_that_would_be_admitted_first_waits_for_the_schedulers_lock(
    owner, published, settings
):
    settings.SWITCHYARD_ADMISSION_LOCK_WAIT_MS = 10_000
    with admission_lock_held(release_after_s=0.5):
        started = time.monotonic()
        run = submit(owner.tenant, CHAIN)
        waited = time.monotonic() - started

    assert _status(run)["a"] == "queued"  # admitted by the submission itself
    assert waited >= 0.4, "admitted before the lock was released"
    assert [len(batch) for batch in published] == [1]


def test_while_the_scheduler_holds_the_lock_past_the_wait_the_step_is_left_ready(
    owner, published, settings
):
    settings.SWITCHYARD_ADMISSION_LOCK_WAIT_MS = 50
    with connection.cursor() as cursor:
        cursor.execute("SET lock_timeout = '7s'")
    with admission_lock_held():
        held = submit(owner.tenant, CHAIN)
    assert _status(held)["a"] == "ready"
    assert not published
    with connection.cursor() as cursor:
        cursor.execute("SHOW lock_timeout")
        assert cursor.fetchone()[0] == "7s", "the session's lock timeout was not restored"
        cursor.execute("RESET lock_timeout")

    run_cancel(run=held)  # nothing waits any more
    free = submit(owner.tenant, {**CHAIN, "name": "after"})
    assert _status(free)["a"] == "queued"


def test_without_a_wait_the_step_is_left_to_the_scheduler_at_once(owner, published, settings):
    settings.SWITCHYARD_ADMISSION_LOCK_WAIT_MS = 0
    with admission_lock_held():
        held = submit(owner.tenant, CHAIN)
    assert _status(held)["a"] == "ready"


@pytest.mark.cluster
def test_a_chain_runs_to_its_end_with_no_scheduler_on_an_idle_system(owner, cluster, settings):
    """Each step's report admits the next one: with no scheduler process at all, a run of
    ten steps submitted to the web ends (with direct admission off it would wait for ever in
    `ready`). The web admits and publishes the first step, the workers the others."""
    settings.SWITCHYARD_QUEUE_PREFIX = cluster.prefix
    cluster.start_worker("steps.llm", concurrency=2)
    base_url = cluster.start_web()
    steps = [_llm("s0")] + [_llm(f"s{i}", after=[f"s{i - 1}"]) for i in range(1, 10)]
    headers = {"Authorization": f"Bearer {owner.raw_key}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:
        created = client.post("/api/v1/workflows/", json={"name": "ten", "steps": steps})
        assert created.status_code == 201, created.text
        accepted = client.post("/api/v1/runs/", json={"workflow": "ten", "input": {}})
        assert accepted.status_code == 202, accepted.text

    run = cluster.wait_run(Run.objects.get(public_id=accepted.json()["id"]), timeout=60)

    assert run.status == "succeeded", run.error
    types = event_types(run)
    assert types.count("step.queued") == 10 and types.count("step.succeeded") == 10


def test_steps_running_unheld_leave_no_room_for_held_messages_behind_them(
    owner, settings, published
):
    """A worker prefetches up to its free slots, and a step running unheld (acknowledged at
    start, it may run for hours) frees its prefetch credit at once: a held message admitted
    behind it would wait for the slot past RabbitMQ's consumer_timeout. So the slots that
    unheld steps take are not offered, by the scheduler or by a direct admission."""
    settings.SWITCHYARD_POOL_CAPACITY = {"steps.tool": 2, "steps.llm": 8}
    settings.SWITCHYARD_DIRECT_ADMISSION = False
    slow = {
        "name": "slow",
        "steps": [{"id": name, "kind": "tool", "tool": "echo", "timeout_s": 3600} for name in "ab"],
    }
    long_run = submit(owner.tenant, slow)
    StepRun.objects.filter(run=long_run).update(status="running")  # both slots, unheld
    quick = {"name": "quick", "steps": [{"id": "q", "kind": "tool", "tool": "echo"}]}

    assert admission.decide().admit == []
    settings.SWITCHYARD_DIRECT_ADMISSION = True
    run = submit(owner.tenant, quick)
    assert _status(run)["q"] == "ready" and published == []

    StepRun.objects.filter(run=long_run, step_id="a").update(status="succeeded")
    assert admission.decide().admit == [StepRun.objects.get(run=run).pk]
