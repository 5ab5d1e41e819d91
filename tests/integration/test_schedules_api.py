"""The schedules and events API against the real PostgreSQL: CRUD, pause/resume, trigger now,
backfill and fires of a schedule; events that start their subscribed workflows once per id,
filtered by `when`, never another tenant's (docs/schedules.md)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from jobs.models import Run
from jobs.services.workflows import workflow_version_create
from schedules.models import ScheduleFire, TriggerEvent
from schedules.services import schedules_fire_due
from schedules.triggers import event_receive
from tests.support.workflows import tool_step


def orders_workflow(tenant, name="big-orders", when="event.data.total > 100", **trigger):
    return workflow_version_create(
        tenant=tenant,
        document={
            "name": name,
            "steps": [tool_step("note", "echo", args={"total": "{{ input.total }}"})],
            "triggers": [{"event": "order.created", "when": when, **trigger}],
        },
    )


@pytest.fixture
def report(owner):
    workflow_version_create(
        tenant=owner.tenant,
        document={"name": "report", "steps": [tool_step("write", "echo", args={})]},
    )
    return owner


def create(client, **fields):
    body = {"name": "hourly", "workflow": "report", "cron": "0 * * * *", **fields}
    return client.api.post("/api/v1/schedules/", body, format="json")


# --- schedules --------------------------------------------------------------------------------


def test_create_read_change_and_delete_a_schedule(report):
    created = create(report, timezone="Europe/Berlin", input={"day": "{{ fire.date }}"})
    assert created.status_code == 201, created.json()
    schedule = created.json()
    assert created["Location"] == f"/api/v1/schedules/{schedule['id']}/"
    assert schedule["overlap"] == "skip" and schedule["paused"] is False
    next_fire = timezone.datetime.fromisoformat(schedule["next_fire_at"])
    assert next_fire.minute == 0 and next_fire > timezone.now()

    listed = report.api.get("/api/v1/schedules/").json()["schedules"]
    assert [s["name"] for s in listed] == ["hourly"]

    changed = report.api.patch(
        f"/api/v1/schedules/{schedule['id']}/",
        {"cron": "", "interval_s": 60, "overlap": "allow_all"},
        format="json",
    )
    assert changed.status_code == 200, changed.json()
    assert changed.json()["interval_s"] == 60 and changed.json()["cron"] == ""

    assert report.api.delete(f"/api/v1/schedules/{schedule['id']}/").status_code == 204
    assert report.api.get(f"/api/v1/schedules/{schedule['id']}/").status_code == 404


def test_a_bad_schedule_is_refused_with_the_path_of_each_fault(report):
    response = create(report, cron="0 25 * * *", timezone="Nowhere/Else")
    assert response.status_code == 400
    paths = {fault["path"] for fault in response.json()["error"]["details"]}
    assert "timezone" in paths
    assert create(report, workflow="missing").status_code == 404
    assert create(report).status_code == 201
    assert create(report).json()["error"]["code"] == "name_taken"


def test_pause_trigger_now_resume_and_the_fires_with_their_runs(report):
    schedule = create(report, overlap="allow_all").json()
    base = f"/api/v1/schedules/{schedule['id']}/"

    assert report.api.post(base + "pause/").json()["paused"] is True
    fired = report.api.post(base + "trigger/")
    assert fired.status_code == 202
    fire = fired.json()
    assert fire["status"] == "submitted" and fire["kind"] == "manual"
    run = Run.objects.get(public_id=fire["run"])
    assert run.tenant == report.tenant

    fires = report.api.get(base + "fires/").json()["fires"]
    assert [(f["kind"], f["run"]) for f in fires] == [("manual", str(run.public_id))]
    shown = report.api.get(base).json()
    assert shown["last_fire"]["run"] == str(run.public_id)
    assert report.api.post(base + "resume/").json()["paused"] is False


def test_backfill_queues_past_fire_times_that_the_sweep_fires_in_order(report):
    schedule = create(report, cron="*/10 * * * *", overlap="skip").json()
    base = f"/api/v1/schedules/{schedule['id']}/"
    now = timezone.now()
    start = (now - timedelta(hours=1)).replace(minute=0, second=0, microsecond=0)
    response = report.api.post(
        base + "backfill/",
        {"start": start.isoformat(), "end": (start + timedelta(minutes=30)).isoformat()},
        format="json",
    )
    assert response.status_code == 202, response.json()
    assert len(response.json()["fires"]) == 4  # :00, :10, :20, :30

    schedules_fire_due(now=timezone.now())

    fires = ScheduleFire.objects.filter(kind="backfill").order_by("fire_at")
    assert [f.status for f in fires] == ["submitted"] * 4  # no overlap policy for backfills
    assert [f.run.created_at for f in fires] == sorted(f.run.created_at for f in fires)
    future = report.api.post(
        base + "backfill/",
        {"start": now.isoformat(), "end": (now + timedelta(hours=1)).isoformat()},
        format="json",
    )
    assert future.status_code == 400 and future.json()["error"]["code"] == "invalid_range"


def test_another_tenants_schedule_is_a_404_on_every_route(report, outsider):
    schedule = create(report).json()
    base = f"/api/v1/schedules/{schedule['id']}/"
    assert outsider.api.get("/api/v1/schedules/").json() == {"schedules": []}
    for method, suffix in [
        ("get", ""),
        ("patch", ""),
        ("delete", ""),
        ("post", "pause/"),
        ("post", "resume/"),
        ("post", "trigger/"),
        ("post", "backfill/"),
        ("get", "fires/"),
    ]:
        response = getattr(outsider.api, method)(base + suffix, {}, format="json")
        assert response.status_code == 404, (method, suffix)
    assert report.api.get(base).json()["paused"] is False
    assert not ScheduleFire.objects.exists()


# --- events -----------------------------------------------------------------------------------


def send(client, **body):
    return client.api.post("/api/v1/events/", body, format="json")


def test_an_event_starts_each_subscribed_workflow_whose_condition_holds(owner):
    orders_workflow(owner.tenant)
    orders_workflow(owner.tenant, name="every-order", when="event.name == 'order.created'")
    orders_workflow(owner.tenant, name="other-event", when="true", event="order.paid")

    big = send(owner, name="order.created", data={"total": 250}, id="o-1")
    small = send(owner, name="order.created", data={"total": 20}, id="o-2")

    assert big.status_code == 202, big.json()
    assert sorted(r["workflow"] for r in big.json()["runs"]) == ["big-orders", "every-order"]
    assert [r["workflow"] for r in small.json()["runs"]] == ["every-order"]
    assert small.json()["skipped"] == [
        {"workflow": "big-orders", "reason": "when 'event.data.total > 100' is false"}
    ]
    run = Run.objects.get(public_id=big.json()["runs"][0]["id"])
    assert run.input == {"total": 250}


def test_the_same_event_id_twice_starts_its_workflows_once(owner):
    orders_workflow(owner.tenant)
    first = send(owner, name="order.created", data={"total": 500}, id="dup-1")
    again = send(owner, name="order.created", data={"total": 500}, id="dup-1")

    assert again.status_code == 202
    assert again.json()["duplicate"] is True
    assert again.json()["runs"] == first.json()["runs"]
    assert Run.objects.filter(tenant=owner.tenant).count() == 1
    assert TriggerEvent.objects.filter(tenant=owner.tenant).count() == 1


def test_an_event_of_another_tenant_starts_nothing_of_this_tenants(owner, outsider):
    orders_workflow(owner.tenant)
    response = send(outsider, name="order.created", data={"total": 999}, id="x-1")

    assert response.status_code == 202
    assert response.json()["runs"] == []
    assert not Run.objects.filter(tenant=owner.tenant).exists()
    assert owner.api.get("/api/v1/events/").json() == {"events": []}
    listed = outsider.api.get("/api/v1/events/").json()["events"]
    assert [(e["event_id"], e["sent_by"], e["runs"]) for e in listed] == [("x-1", "default", [])]


def test_the_events_list_says_who_sent_what_and_which_runs_it_started(owner):
    orders_workflow(owner.tenant, input={"total": "{{ event.data.total * 2 }}"})
    sent = send(owner, name="order.created", data={"total": 300})
    [event] = owner.api.get("/api/v1/events/").json()["events"]

    assert event["name"] == "order.created" and event["data"] == {"total": 300}
    assert event["sent_by"] == "default" and event["event_id"]  # an id was generated
    assert [r["id"] for r in event["runs"]] == [r["id"] for r in sent.json()["runs"]]
    assert Run.objects.get(public_id=event["runs"][0]["id"]).input == {"total": 600}


def test_an_event_refused_by_the_quota_stores_nothing_and_can_be_sent_again(owner):
    orders_workflow(owner.tenant)
    owner.tenant.max_queued_runs = 0
    owner.tenant.save()
    refused = send(owner, name="order.created", data={"total": 500}, id="q-1")
    assert refused.status_code == 429 and "Retry-After" in refused
    assert not TriggerEvent.objects.exists()

    owner.tenant.max_queued_runs = 10
    owner.tenant.save()
    assert len(send(owner, name="order.created", data={"total": 500}, id="q-1").json()["runs"]) == 1


def test_a_trigger_reading_steps_is_refused_at_upload(owner):
    response = owner.api.post(
        "/api/v1/workflows/",
        {
            "name": "bad",
            "steps": [tool_step("a", "echo", args={})],
            "triggers": [{"event": "x", "when": "steps.a.output"}],
        },
        format="json",
    )
    assert response.status_code == 400
    assert response.json()["error"]["details"] == [
        {
            "path": "triggers[0].when",
            "message": "template error: unknown name 'steps'; templates see event",
        }
    ]


def test_the_same_event_sent_eight_times_at_once_starts_one_run(transactional_db, owner):
    """Concurrent deliveries of one event (a sender's retries racing): the advisory lock on
    (tenant, id) lets one store it; the others answer with its runs."""
    orders_workflow(owner.tenant)
    barrier = threading.Barrier(8)

    def deliver(_: int):
        barrier.wait()
        try:
            return event_receive(
                tenant=owner.tenant,
                name="order.created",
                data={"total": 700},
                event_id="race-1",
                now=timezone.now(),
            )
        finally:
            connection.close()

    with ThreadPoolExecutor(8) as pool:
        receipts = list(pool.map(deliver, range(8)))

    assert sorted(r.duplicate for r in receipts) == [False] + [True] * 7
    assert {tuple(run.pk for run in r.runs) for r in receipts} == {
        tuple(Run.objects.filter(tenant=owner.tenant).values_list("pk", flat=True))
    }
    assert Run.objects.filter(tenant=owner.tenant).count() == 1
    assert TriggerEvent.objects.filter(tenant=owner.tenant).count() == 1


def test_a_longest_event_id_starts_each_long_named_workflow_its_own_run(owner):
    first, second = "w" * 99 + "1", "w" * 99 + "2"
    orders_workflow(owner.tenant, name=first, when="true")
    orders_workflow(owner.tenant, name=second, when="true")
    response = send(owner, name="order.created", data={"total": 1}, id="i" * 128)

    assert sorted(r["workflow"] for r in response.json()["runs"]) == [first, second]
    assert Run.objects.filter(tenant=owner.tenant).count() == 2
    assert send(owner, name="order.created", id="i" * 129).status_code == 400
