"""The scheduler's cycle decides without the admission lock and holds it only for its writes
(jobs/scheduler.py `run_cycle`): a direct admission never waits for a whole decision, and a
decision that another admission overtook is taken again, holding the lock, so no quota is
exceeded."""

from __future__ import annotations

import pytest

from jobs import admission, dispatch, scheduler
from jobs.models import StepRun
from tests.conftest import make_tenant_client
from tests.integration.test_fairness import parallel_steps
from tests.support.sessions import other_session
from tests.support.workflows import submit, tool_step

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def quiet_broker(monkeypatch):
    """What the cycle and the direct admissions publish goes nowhere."""
    monkeypatch.setattr(scheduler, "publish", lambda dispatches: (len(dispatches), 0))
    monkeypatch.setattr(dispatch._publisher, "submit", lambda batch: None)


def _other_session_takes_the_lock() -> bool:
    with other_session() as other:
        taken = other.execute(
            "SELECT pg_try_advisory_lock(%s)", [admission.ADMISSION_LOCK_ID]
        ).fetchone()[0]
        other.execute("SELECT pg_advisory_unlock_all()")
    return taken


def _in_flight(tenant) -> int:
    return StepRun.objects.filter(tenant=tenant, status__in=["queued", "running"]).count()


def test_the_lock_is_free_while_the_cycle_decides(settings, monkeypatch, quiet_broker):
    settings.SWITCHYARD_DIRECT_ADMISSION = False
    tenant = make_tenant_client("waiting").tenant
    submit(tenant, parallel_steps("work", 2, 10))
    real_decide = admission.decide
    free_while_deciding = []

    def deciding(now=None):
        free_while_deciding.append(_other_session_takes_the_lock())
        return real_decide(now)

    monkeypatch.setattr(admission, "decide", deciding)
    stats = scheduler.run_cycle(sweeps=False)

    assert stats.admitted == 2
    assert free_while_deciding == [True]  # one decision, and no lock held while it was taken


def test_a_decision_overtaken_by_a_direct_admission_is_taken_again(
    settings, monkeypatch, quiet_broker
):
    # One slot for the tenant. The cycle decides to give it to the llm step; before it takes
    # the lock, a submission admits a tool step of the same tenant directly. Admitting the
    # decision as taken would put two steps in flight.
    settings.SWITCHYARD_DIRECT_ADMISSION = False
    tenant = make_tenant_client("one-slot", max_concurrent_steps=1).tenant
    waiting = submit(tenant, parallel_steps("first", 1, 10))
    settings.SWITCHYARD_DIRECT_ADMISSION = True
    real_decide = admission.decide
    decisions = []

    def overtaken(now=None):
        decision = real_decide(now)
        decisions.append(list(decision.admit))
        if len(decisions) == 1:
            submit(tenant, {"name": "tool", "steps": [tool_step("t", "echo", args={})]})
        return decision

    monkeypatch.setattr(admission, "decide", overtaken)
    stats = scheduler.run_cycle(sweeps=False)

    assert len(decisions) == 2, "the overtaken decision was admitted as taken"
    assert decisions[0] == list(StepRun.objects.filter(run=waiting).values_list("id", flat=True))
    assert decisions[1] == [] and stats.admitted == 0
    assert _in_flight(tenant) == 1
    assert StepRun.objects.get(run=waiting).status == "ready"
