"""The operators' Schedules and Events pages: what they show, their actions through the
services (recorded in the audit trail), their live frames, and the admin's schedules."""

from __future__ import annotations

from datetime import timedelta

from django.contrib.auth import get_user_model
from django.utils import timezone

from dashboard.models import OperatorAction
from jobs.services.workflows import workflow_version_create
from schedules.dashboard import events_frame, schedules_frame
from schedules.models import ScheduleFire
from schedules.services import schedule_create, schedule_update, schedules_fire_due
from schedules.triggers import event_receive
from tests.support.dashboard import make_operator, signed_in
from tests.support.workflows import tool_step


def nightly(tenant):
    workflow_version_create(
        tenant=tenant,
        document={
            "name": "nightly",
            "steps": [tool_step("a", "echo", args={})],
            "triggers": [{"event": "ping"}],
        },
    )
    return schedule_create(
        tenant=tenant, name="nightly", workflow="nightly", now=timezone.now(), cron="0 3 * * *"
    )


def test_the_schedules_page_shows_each_schedule_and_its_actions_work(owner):
    schedule = nightly(owner.tenant)
    staff = signed_in(make_operator())
    page = staff.get("/dashboard/schedules/").content.decode()
    assert f'data-schedule="{schedule.public_id}"' in page
    assert "0 3 * * *" in page and "active" in page and "Trigger now" in page

    base = f"/dashboard/schedules/{schedule.public_id}/"
    assert staff.post(base + "pause/")["Location"] == "/dashboard/schedules/"
    assert staff.post(base + "trigger/").status_code == 302
    fire = ScheduleFire.objects.get(schedule=schedule)
    assert fire.kind == "manual" and fire.run is not None

    page = staff.get("/dashboard/schedules/").content.decode()
    assert f'href="/dashboard/runs/{fire.run.public_id}/"' in page
    assert ">paused<" in page
    assert list(OperatorAction.objects.order_by("id").values_list("action", flat=True)) == [
        "schedule.pause",
        "schedule.trigger",
    ]
    figures = schedules_frame()["figures"]["schedules"][str(schedule.public_id)]
    assert figures == {
        "paused": True,
        "next_fire_at": schedule.next_fire_at.isoformat(),
        "last_status": "submitted",
        "last_run": str(fire.run.public_id),
    }


def test_the_events_page_shows_who_sent_what_and_the_runs_it_started(owner):
    nightly(owner.tenant)
    receipt = event_receive(
        tenant=owner.tenant, name="ping", data={"n": 1}, event_id="e-1", now=timezone.now()
    )
    page = signed_in(make_operator()).get("/dashboard/events/").content.decode()
    assert f'data-event="{receipt.event.public_id}"' in page
    assert f'data-run="{receipt.runs[0].public_id}"' in page
    assert events_frame()["figures"] == {"events": [str(receipt.event.public_id)]}


def test_the_admin_lists_schedules_per_tenant(owner, outsider):
    nightly(owner.tenant)
    nightly(outsider.tenant)
    root = get_user_model().objects.create_superuser("root", password=None)
    client = signed_in(root)
    page = client.get(f"/admin/schedules/schedule/?tenant__id__exact={owner.tenant.pk}")
    assert page.status_code == 200
    assert page.content.decode().count('class="field-name"') == 1


def test_metrics_count_fires_skips_and_lateness(owner, client, settings):
    settings.SWITCHYARD_METRICS_TOKEN = "scrape"
    schedule = nightly(owner.tenant)
    start = schedule.next_fire_at
    schedule_update(schedule=schedule, now=start - timedelta(seconds=1), catchup_window_s=60)
    # Two nights later: the first night is past the window (skipped), the second is 2 s late.
    schedules_fire_due(now=start + timedelta(days=1, seconds=2))

    text = client.get("/metrics", HTTP_AUTHORIZATION="Bearer scrape").content.decode()

    assert 'switchyard_schedule_fires_total{code="",status="submitted",tenant="owner"} 1.0' in text
    assert (
        'switchyard_schedule_fires_total{code="outside_catchup_window",status="skipped",'
        'tenant="owner"} 1.0' in text
    )
    assert 'switchyard_schedule_fire_lateness_seconds_bucket{le="1",tenant="owner"} 0.0' in text
    assert 'switchyard_schedule_fire_lateness_seconds_bucket{le="2",tenant="owner"} 1.0' in text
    assert 'switchyard_schedule_fire_lateness_seconds_sum{tenant="owner"} 2.0' in text
