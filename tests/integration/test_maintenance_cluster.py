"""The housekeeping as it runs in production: the scheduler enqueues a due job on the maintenance
queue, a maintenance worker (the Procfile's `maintenance` process) runs it, its outcome is
stored through django-celery-results, and operators see it on the dashboard and in the admin."""

from __future__ import annotations

import json

import pytest
from django.contrib.auth import get_user_model
from django_celery_results.models import TaskResult

from tests.integration.test_maintenance import finished_run, history
from tests.support.cluster import Cluster
from tests.support.dashboard import make_operator, signed_in

pytestmark = pytest.mark.cluster


def test_a_due_retention_runs_on_the_maintenance_worker_and_operators_see_its_outcome(
    transactional_db, tmp_path, ledger, owner
):
    owner.tenant.retention_days = 1
    owner.tenant.save(update_fields=["retention_days"])
    old = finished_run(owner.tenant, days_ago=2)
    events, attempts = history(old)
    cluster = Cluster(tmp_path, ledger, SWITCHYARD_HOUSEKEEPING_INTERVAL_S="1")
    try:
        cluster.start_worker("maintenance", pool="solo", concurrency=1)
        cluster.start_scheduler()
        cluster.wait_until(
            lambda: TaskResult.objects.filter(
                task_name="maintenance.retention", status="SUCCESS"
            ).exists(),
            60,
            "no retention result was stored",
        )
    finally:
        cluster.stop_all()

    stored = TaskResult.objects.filter(task_name="maintenance.retention").earliest("date_done")
    outcome = json.loads(stored.result)
    assert outcome["removed"] == {"events": events, "attempts": attempts}
    assert outcome["errors"] == [] and outcome["duration_s"] >= 0
    assert history(old) == (0, 0)
    # Every job ran once at least (each on its own timer), and each stored its outcome.
    assert set(TaskResult.objects.values_list("task_name", flat=True)) >= {
        "maintenance.retention",
        "maintenance.idempotency_keys",
        "maintenance.approval_notifications",
        "maintenance.metric_roll_up",
    }

    operator = signed_in(make_operator())
    page = operator.get("/dashboard/").content.decode()
    assert 'data-housekeeping="maintenance.retention"' in page
    assert "rows removed in" in page and "no errors" in page
    root = get_user_model().objects.create_superuser("root", password="pw")
    admin = signed_in(root).get(f"/admin/django_celery_results/taskresult/{stored.pk}/change/")
    assert admin.status_code == 200
    assert "maintenance.retention" in admin.content.decode()
