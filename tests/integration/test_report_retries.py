"""A worker keeps its finished work when PostgreSQL ends the report's transaction.

A report whose session PostgreSQL ended (its transaction idle past
`idle_in_transaction_session_timeout`, as when the worker was stopped inside it) is tried
again while the attempt's lease holds, and the step succeeds with that attempt; it is not
left `running` until the lease expires (minutes for an llm step).
"""

from __future__ import annotations

import time

import pytest
from django.db import connection, transaction

from jobs import dispatch, execution
from jobs.models import StepAttempt, StepRun
from jobs.transitions.steps import steps_admit
from tests.support.workflows import dispatch_token_of, submit

pytestmark = pytest.mark.django_db(transaction=True)

ONE = {"name": "one", "steps": [{"id": "a", "kind": "llm", "provider": "simulated", "prompt": "a"}]}


def test_a_report_whose_session_was_ended_for_idling_in_its_transaction_is_retried(
    owner, settings, monkeypatch
):
    settings.SWITCHYARD_DIRECT_ADMISSION = False
    monkeypatch.setattr(dispatch._publisher, "submit", lambda dispatches: None)
    run = submit(owner.tenant, ONE)
    [step] = StepRun.objects.filter(run=run)
    steps_admit(step_run_ids=[step.pk])
    step.refresh_from_db()

    real_complete = execution.step_complete
    tries: list[str] = []

    def stalled_once(**kwargs):
        if tries:
            tries.append("again")
            return real_complete(**kwargs)
        tries.append("stalled")
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL idle_in_transaction_session_timeout = '100ms'")
            time.sleep(0.5)  # the process stalls inside its transaction; PostgreSQL ends it
            return real_complete(**kwargs)

    monkeypatch.setattr(execution, "step_complete", stalled_once)

    execution.step_execute(
        step_run_id=step.pk, dispatch_token=dispatch_token_of(step), worker="test/1"
    )

    assert tries == ["stalled", "again"]
    step.refresh_from_db()
    assert (step.status, step.attempt) == ("succeeded", 1)
    assert list(StepAttempt.objects.filter(step_run=step).values_list("outcome", flat=True)) == [
        "succeeded"
    ]
