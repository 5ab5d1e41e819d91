"""Which ready steps of a tenant admission takes first: work in progress before new runs."""

from __future__ import annotations

import pytest
from django.db import transaction

from jobs import admission
from jobs.models import Run, StepRun
from jobs.transitions.steps import step_claim, step_complete, steps_admit
from tests.conftest import make_tenant_client
from tests.support.workflows import submit, tool_step

CHAIN = {"name": "pair", "steps": [tool_step("a", "echo"), tool_step("b", "echo", after=["a"])]}


def _cycle() -> int:
    """One admission by the scheduler's rules, then every admitted step run to success."""
    with transaction.atomic():
        admitted = steps_admit(step_run_ids=admission.decide().admit)
    for step in StepRun.objects.filter(status="queued").order_by("id"):
        claim = step_claim(
            step_run_id=step.pk, dispatch_token=str(step.dispatch_token), worker="w/1"
        )
        step_complete(claim=claim, output={})
    return len(admitted)


@pytest.mark.django_db(transaction=True)
def test_a_started_runs_next_step_is_not_stuck_behind_runs_that_may_not_start(settings):
    # One run at a time may be active and one step at a time in flight: when the first run's
    # `b` becomes ready, the older `a` steps of five runs that may not start yet wait ahead of
    # it in the same bucket. It must be admitted all the same, and every run must finish.
    tenant = make_tenant_client("single", max_active_runs=1, max_concurrent_steps=1).tenant
    runs = [submit(tenant, CHAIN) for _ in range(6)]
    for _ in range(40):
        if (
            not Run.objects.filter(pk__in=[run.pk for run in runs])
            .exclude(status="succeeded")
            .exists()
        ):
            break
        _cycle()
    statuses = list(
        Run.objects.filter(pk__in=[r.pk for r in runs]).values_list("status", flat=True)
    )
    assert statuses == ["succeeded"] * 6
