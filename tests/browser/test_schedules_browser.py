"""An operator on the Schedules and Events pages in a real browser (headless Debian Chromium),
with a real scheduler and web: the scheduled fire's run appears without reloading, Pause stops
the fires, Trigger now starts a run at once; an event sent to the API appears with its run.
Screenshots: tests/browser/artifacts/dashboard-schedules.png, dashboard-events.png.
"""

from __future__ import annotations

import time

import httpx
import pytest
from django.utils import timezone

from jobs.services.workflows import workflow_version_create
from schedules.models import Schedule, ScheduleFire
from schedules.services import schedule_create
from tests.support.dashboard import PASSWORD, make_operator
from tests.support.workflows import tool_step

pytestmark = pytest.mark.cluster

VIEWPORT = {"width": 1366, "height": 900}


@pytest.fixture
def site(owner, cluster):
    cluster.start_scheduler()
    return cluster.start_web(SWITCHYARD_DASHBOARD_REFRESH_S="1")


def test_an_operator_sees_fires_live_pauses_and_triggers_a_schedule(
    owner, cluster, site, browser, screenshot
):
    make_operator("olga")
    workflow_version_create(
        tenant=owner.tenant,
        document={"name": "pulse", "steps": [tool_step("beat", "echo", args={})]},
    )
    page = browser.new_page(viewport=VIEWPORT)
    page.goto(f"{site}/dashboard/schedules/")
    page.fill("#id_username", "olga")
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{site}/dashboard/schedules/")
    assert "No schedule yet" in page.inner_text("#live-schedules")

    # Created after the page loaded: its row and its first fire's run arrive live.
    schedule = schedule_create(
        tenant=owner.tenant,
        name="pulse",
        workflow="pulse",
        now=timezone.now(),
        interval_s=2,
        overlap="allow_all",
    )
    row = page.locator(f'tr[data-schedule="{schedule.public_id}"]')
    row.locator("a[data-run]").wait_for(timeout=20_000)
    shown_run = row.locator("a[data-run]").get_attribute("data-run")
    fired = ScheduleFire.objects.get(run__public_id=shown_run)
    assert fired.schedule == schedule and fired.kind == "scheduled"
    assert row.locator('[data-figure="state"]').inner_text() == "active"

    row.locator("button", has_text="Pause").click()
    page.wait_for_selector(f'tr[data-schedule="{schedule.public_id}"].paused')
    assert Schedule.objects.get(pk=schedule.pk).paused is True
    scheduled = ScheduleFire.objects.filter(schedule=schedule, kind="scheduled").count()

    page.once("dialog", lambda dialog: dialog.accept())
    row.locator("button", has_text="Trigger now").click()
    manual = page.locator('#fires tr[data-kind="manual"]')
    manual.wait_for(timeout=10_000)
    fire = ScheduleFire.objects.get(schedule=schedule, kind="manual")
    assert manual.locator("a[data-run]").get_attribute("data-run") == str(fire.run.public_id)
    assert str(fire.run.public_id) in page.inner_text(".messages")
    screenshot(page, "dashboard-schedules")

    time.sleep(3)  # paused: the scheduler records no fire time
    assert ScheduleFire.objects.filter(schedule=schedule, kind="scheduled").count() == scheduled


def test_an_operator_sees_an_event_and_the_run_it_started_arrive_live(
    owner, cluster, site, browser, screenshot
):
    make_operator("olga")
    workflow_version_create(
        tenant=owner.tenant,
        document={
            "name": "on-order",
            "steps": [tool_step("note", "echo", args={})],
            "triggers": [{"event": "order.created", "when": "event.data.total > 100"}],
        },
    )
    page = browser.new_page(viewport=VIEWPORT)
    page.goto(f"{site}/dashboard/events/")
    page.fill("#id_username", "olga")
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{site}/dashboard/events/")
    assert "No event yet" in page.inner_text("#live-events")

    sent = httpx.post(
        f"{site}/api/v1/events/",
        json={"name": "order.created", "data": {"total": 120}, "id": "order-77"},
        headers={"Authorization": f"Bearer {owner.raw_key}"},
        timeout=10,
    )
    assert sent.status_code == 202, sent.text
    [run] = sent.json()["runs"]

    row = page.locator(f'tr[data-event="{sent.json()["event"]["id"]}"]')
    row.wait_for(timeout=20_000)
    assert row.locator("a[data-run]").get_attribute("data-run") == run["id"]
    assert "order-77" in row.inner_text() and "key default" in row.inner_text()
    screenshot(page, "dashboard-events")
