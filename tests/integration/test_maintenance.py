"""The housekeeping (maintenance.housekeeping): retention removes exactly what is old and final,
in batches, while runs execute; metric samples are rolled up; idempotency keys and approvals'
notifications expire."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from approvals.services import approval_decide
from dashboard.models import MetricSample
from jobs.models import (
    Event,
    Run,
    RunStatus,
    StepAttempt,
    StepRun,
    WebhookDelivery,
    WebhookStatus,
)
from jobs.transitions.runs import run_cancel
from jobs.transitions.txn import run_locked
from maintenance.housekeeping import (
    approval_notifications_expire,
    idempotency_keys_expire,
    metric_samples_roll_up,
    retention_sweep,
)
from tests.support.approvals import as_reviewer, make_reviewer, refund_workflow, run_ready_steps
from tests.support.workflows import assert_gapless, submit, tool_step

TWO_ECHOES = {
    "name": "two-echoes",
    "steps": [
        tool_step("first", "echo", args={"n": 1}),
        tool_step("second", "echo", after=["first"], args={"n": 2}),
    ],
    "output": {"second": "{{ steps.second.output }}"},
}


def finished_run(tenant, *, days_ago: float = 0) -> Run:
    run = submit(tenant, TWO_ECHOES)
    run_ready_steps(run)
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED
    if days_ago:
        Run.objects.filter(pk=run.pk).update(finished_at=timezone.now() - timedelta(days=days_ago))
    return run


def history(run: Run) -> tuple[int, int]:
    """(events, attempts) the run still has."""
    return (
        Event.objects.filter(run=run).count(),
        StepAttempt.objects.filter(step_run__run=run).count(),
    )


def test_retention_removes_exactly_the_old_final_runs_history_in_batches(owner, outsider):
    owner.tenant.retention_days = 7
    owner.tenant.save(update_fields=["retention_days"])
    old = [finished_run(owner.tenant, days_ago=8) for _ in range(2)]
    young = finished_run(owner.tenant, days_ago=6)
    # Not final: running, with a finished_at it should not have (even that does not count).
    running = submit(owner.tenant, TWO_ECHOES)
    Run.objects.filter(pk=running.pk).update(
        status=RunStatus.RUNNING, finished_at=timezone.now() - timedelta(days=30)
    )
    waiting = submit(owner.tenant, refund_workflow(), {"customer": "Ann", "amount": 5})
    run_ready_steps(waiting)
    Run.objects.filter(pk=waiting.pk).update(finished_at=timezone.now() - timedelta(days=30))
    # Another tenant keeps its runs 30 days (the default).
    theirs = finished_run(outsider.tenant, days_ago=8)
    kept = {run.pk: history(run) for run in (young, running, waiting, theirs)}
    doomed_events = sum(history(run)[0] for run in old)
    doomed_attempts = sum(history(run)[1] for run in old)
    assert doomed_events > 4 and doomed_attempts == 4

    outcome = retention_sweep(batch=3)

    assert outcome.removed == {"events": doomed_events, "attempts": doomed_attempts}
    assert outcome.batches >= -(-doomed_events // 3)  # at most 3 rows of a table per batch
    assert outcome.finished and outcome.errors == []
    for run in old:
        assert history(run) == (0, 0)
        run.refresh_from_db()  # the run, its steps and its output stay
        assert run.status == RunStatus.SUCCEEDED and run.output == {"second": {"args": {"n": 2}}}
        assert StepRun.objects.filter(run=run).count() == 2
    assert {run.pk: history(run) for run in (young, running, waiting, theirs)} == kept
    assert retention_sweep(batch=3).rows == 0  # nothing left to do


@pytest.mark.django_db(transaction=True)
def test_retention_never_waits_for_a_locked_run_and_takes_it_next_time(owner):
    owner.tenant.retention_days = 1
    owner.tenant.save(update_fields=["retention_days"])
    locked_run = finished_run(owner.tenant, days_ago=2)
    other = finished_run(owner.tenant, days_ago=2)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with run_locked(locked_run.pk):
            holding.set()
            release.wait(10)
        connection.close()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(5)
        started = time.monotonic()
        outcome = retention_sweep(batch=1000)
        assert time.monotonic() - started < 2
    finally:
        release.set()
        holder.join()
    assert history(other) == (0, 0)
    assert history(locked_run) != (0, 0)
    assert outcome.errors == []
    retention_sweep(batch=1000)
    assert history(locked_run) == (0, 0)


@pytest.mark.django_db(transaction=True)
def test_retention_in_batches_while_runs_execute_loses_no_live_event(owner):
    owner.tenant.retention_days = 1
    owner.tenant.save(update_fields=["retention_days"])
    old = [finished_run(owner.tenant, days_ago=3) for _ in range(4)]
    stop = threading.Event()
    outcomes = []

    def sweep() -> None:
        while not stop.is_set():
            outcomes.append(retention_sweep(batch=1))
        connection.close()

    sweeper = threading.Thread(target=sweep)
    sweeper.start()
    try:
        live = [finished_run(owner.tenant) for _ in range(6)]
        cancelled = submit(owner.tenant, TWO_ECHOES)
        run_cancel(run=cancelled, reason="changed my mind")
    finally:
        stop.set()
        sweeper.join()
    outcomes.append(retention_sweep(batch=1))
    for run in old:
        assert history(run) == (0, 0)
    for run in [*live, cancelled]:  # young: every event and attempt is there, gapless
        assert_gapless(run)
        events, _attempts = history(run)
        run.refresh_from_db()
        assert events == run.next_seq - 1
    assert sum(outcome.removed.get("attempts", 0) for outcome in outcomes) == 8
    assert all(outcome.errors == [] for outcome in outcomes)


def test_metric_samples_older_than_the_roll_up_age_become_one_point_per_minute(db, settings):
    settings.SWITCHYARD_METRICS_ROLLUP_AFTER_H = 1
    now = timezone.now().replace(second=30, microsecond=0)
    start = (now - timedelta(hours=2)).replace(second=0)
    for second in range(0, 180, 10):  # three minutes at 10 s, values 0..17
        MetricSample.objects.create(
            at=start + timedelta(seconds=second),
            metric="queue_depth",
            key="steps.llm",
            value=second / 10,
        )
    recent = MetricSample.objects.create(at=now, metric="queue_depth", key="steps.llm", value=9)

    outcome = metric_samples_roll_up(now=now)

    minutes = list(
        MetricSample.objects.filter(rolled_up=True).order_by("at").values_list("at", "value")
    )
    assert minutes == [
        (start, 2.5),
        (start + timedelta(minutes=1), 8.5),
        (start + timedelta(minutes=2), 14.5),
    ]
    assert outcome.removed == {"samples": 18 - 3}
    assert MetricSample.objects.filter(rolled_up=False).get() == recent
    assert metric_samples_roll_up(now=now).rows == 0  # a rolled-up point is not rolled again


def test_idempotency_keys_are_released_after_their_time_to_live(owner, settings):
    settings.SWITCHYARD_IDEMPOTENCY_TTL_S = 3600
    old = submit(owner.tenant, TWO_ECHOES, idempotency_key="old-key", request_hash="h1")
    fresh = submit(owner.tenant, TWO_ECHOES, idempotency_key="fresh-key", request_hash="h2")
    Run.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(hours=2))

    outcome = idempotency_keys_expire(batch=1)

    assert outcome.removed == {"idempotency keys": 1}
    assert Run.objects.get(pk=old.pk).idempotency_key == ""
    assert Run.objects.get(pk=fresh.pk).idempotency_key == "fresh-key"


def test_an_approval_webhook_about_a_request_no_longer_pending_is_given_up(owner):
    owner.tenant.approval_webhook_url = "https://hooks.example.com/approvals"
    owner.tenant.save(update_fields=["approval_webhook_url"])
    ann = make_reviewer("ann", owner.tenant)
    decided_run = submit(owner.tenant, refund_workflow("a"), {"customer": "Ann", "amount": 5})
    [decided] = run_ready_steps(decided_run)
    pending_run = submit(owner.tenant, refund_workflow("b"), {"customer": "Bo", "amount": 5})
    run_ready_steps(pending_run)
    approval_decide(approval=decided, reviewer=as_reviewer(ann), decision="approve")
    # The request's notification kept failing; the decided one's is moot now.
    WebhookDelivery.objects.filter(event_type="approval.requested").update(
        status=WebhookStatus.FAILED
    )

    outcome = approval_notifications_expire(batch=1)

    assert outcome.removed == {"approval notifications": 1}
    moot = WebhookDelivery.objects.get(run=decided_run, event_type="approval.requested")
    assert moot.status == WebhookStatus.GAVE_UP and moot.next_attempt_at is None
    assert "withdrawn" in moot.last_error
    still = WebhookDelivery.objects.get(run=pending_run, event_type="approval.requested")
    assert still.status == WebhookStatus.FAILED
