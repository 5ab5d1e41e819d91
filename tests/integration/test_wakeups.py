"""Waking the scheduler (jobs/wakeups.py): transitions that leave work for it say so, and the
process sends the NOTIFY after their commit, from a thread and connection of its own, at most
once per `SWITCHYARD_WAKE_INTERVAL_S`, never losing the last wake-up of a burst."""

from __future__ import annotations

import time

import psycopg
import pytest
from django.db import connection, transaction

from jobs import dispatch, wakeups
from jobs.events import READY_CHANNEL
from jobs.execution import step_execute
from jobs.models import StepRun
from jobs.transitions.steps import steps_admit
from tests.support.workflows import dispatch_token_of, submit

pytestmark = pytest.mark.django_db(transaction=True)

ONE = {"name": "one", "steps": [{"id": "a", "kind": "llm", "provider": "simulated", "prompt": "a"}]}


@pytest.fixture
def listener():
    conn = wakeups.channel_connection("test listener")
    conn.execute(f"LISTEN {READY_CHANNEL}")
    yield conn
    conn.close()


def _arrivals(conn: psycopg.Connection, within_s: float) -> list[float]:
    """When each notification arrived (monotonic), over `within_s` seconds."""
    seen: list[float] = []
    deadline = time.monotonic() + within_s
    while (left := deadline - time.monotonic()) > 0:
        for _ in conn.notifies(timeout=left, stop_after=1):
            seen.append(time.monotonic())
    return seen


def test_a_wake_up_is_sent_after_the_commit_and_not_for_a_rollback(listener):
    with transaction.atomic():
        wakeups.wake_after_commit()
        assert _arrivals(listener, 0.3) == []  # not while the transaction is open
    assert len(_arrivals(listener, 5.0)) == 1

    with pytest.raises(RuntimeError), transaction.atomic():
        wakeups.wake_after_commit()
        raise RuntimeError("rolled back")
    assert _arrivals(listener, 0.5) == []


def test_a_wake_up_after_postgresql_ended_the_wakers_connection_still_arrives(listener):
    wakeups.wake_after_commit()
    assert len(_arrivals(listener, 5.0)) == 1
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'switchyard wake-ups'"
        )
        assert cursor.fetchone()[0] == 1

    wakeups.wake_after_commit()

    assert len(_arrivals(listener, 5.0)) == 1


def test_a_burst_of_wake_ups_is_joined_and_its_last_is_not_lost(listener, settings):
    settings.SWITCHYARD_WAKE_INTERVAL_S = 0.3
    _arrivals(listener, 0.4)  # whatever an earlier test left
    started = time.monotonic()
    for _ in range(200):
        wakeups.wake_after_commit()
    time.sleep(0.05)
    wakeups.wake_after_commit()  # inside the interval of the first: joined, sent at its end

    arrivals = _arrivals(listener, 3.0)

    assert len(arrivals) == 2, arrivals
    assert arrivals[0] - started < 0.3  # the first at once, before the interval's end
    assert arrivals[1] - arrivals[0] >= 0.25  # the rest together, one interval later


def test_a_claim_that_frees_a_slot_while_steps_wait_wakes_the_scheduler(
    owner, settings, monkeypatch, listener
):
    """One step queued, one left ready behind it (the scheduler admits nothing here): the
    claim of the first frees a queued slot, and the scheduler hears of it; a claim with
    nothing ready sends nothing."""
    settings.SWITCHYARD_DIRECT_ADMISSION = False
    monkeypatch.setattr(dispatch._publisher, "submit", lambda dispatches: None)
    first, second = submit(owner.tenant, ONE), submit(owner.tenant, ONE)
    [step] = StepRun.objects.filter(run=first)
    steps_admit(step_run_ids=[step.pk])
    _arrivals(listener, 0.3)  # the submissions' own wake-ups

    step.refresh_from_db()
    step_execute(step_run_id=step.pk, dispatch_token=dispatch_token_of(step), worker="test/1")
    assert len(_arrivals(listener, 5.0)) >= 1

    [other] = StepRun.objects.filter(run=second)
    steps_admit(step_run_ids=[other.pk])
    other.refresh_from_db()
    _arrivals(listener, 0.3)
    step_execute(step_run_id=other.pk, dispatch_token=dispatch_token_of(other), worker="test/1")
    assert _arrivals(listener, 0.6) == []
