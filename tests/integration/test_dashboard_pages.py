"""The operators' dashboard pages (Django session auth, PostgreSQL and RabbitMQ for real):
who may open them, what each shows against the database, and the actions on runs and tenants
that need no worker. Actions that run steps again are proven with real workers in
test_dashboard_cluster.py; the live sockets in test_dashboard_live.py; pages in a real browser
in tests/browser/."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.utils import timezone

from dashboard.consumers import tenants_frame
from dashboard.heartbeats import WorkerBeat
from dashboard.models import OperatorAction, ProcessHeartbeat
from dashboard.run_queries import failure_groups
from dashboard.tenant_usage import TENANTS_PER_PAGE, TenantQuery
from jobs.models import (
    Event,
    Run,
    RunStatus,
    StepRun,
    StepStatus,
    WebhookAttempt,
    WebhookDelivery,
)
from jobs.transitions.steps import step_claim, step_complete
from tenants.models import Role, Tenant
from tenants.services import tenant_create
from tests.support.approvals import make_reviewer
from tests.support.dashboard import chain, make_operator, make_user, signed_in, work_locally
from tests.support.workflows import dispatch_token_of, submit

PAGES = ["/dashboard/", "/dashboard/workers/", "/dashboard/tenants/", "/dashboard/runs/",
         "/dashboard/failures/", "/dashboard/runs/bulk/?action=retry"]  # fmt: skip


@pytest.fixture
def olga(db):
    return make_operator("olga")


@pytest.fixture
def staff(olga):
    return signed_in(olga)


def text(response) -> str:
    return response.content.decode()


def squash(html: str) -> str:
    return re.sub(r"\s+", " ", html)


# --- who gets in -------------------------------------------------------------------------------


def test_anonymous_visitors_are_sent_to_sign_in(client, owner):
    run = submit(owner.tenant, chain("two", "a", "b"))
    for url in [*PAGES, f"/dashboard/runs/{run.public_id}/"]:
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith("/accounts/login/?next="), url
    response = client.post(f"/dashboard/runs/{run.public_id}/cancel/")
    assert response.status_code == 302
    run.refresh_from_db()
    assert run.status != RunStatus.CANCELLED


def test_reviewers_and_other_non_staff_users_get_a_403_and_cannot_act(owner):
    run = submit(owner.tenant, chain("two", "a", "b"))
    reviewer = signed_in(make_reviewer("rita", owner.tenant, role=Role.REVIEWER))
    plain = signed_in(make_user("paul"))
    for client in (reviewer, plain):
        for url in [*PAGES, f"/dashboard/runs/{run.public_id}/"]:
            response = client.get(url)
            assert response.status_code == 403, url
            assert "Operators only" in text(response)
        assert client.post(f"/dashboard/runs/{run.public_id}/cancel/").status_code == 403
        assert client.post(f"/dashboard/tenants/{owner.tenant.slug}/pause/").status_code == 403
        assert client.post("/dashboard/runs/bulk/", {"action": "cancel"}).status_code == 403
    run.refresh_from_db()
    owner.tenant.refresh_from_db()
    assert run.status != RunStatus.CANCELLED and owner.tenant.is_active


def test_the_root_sends_operators_to_the_dashboard_and_reviewers_to_their_inbox(owner, staff):
    reviewer = signed_in(make_reviewer("rita", owner.tenant))
    assert staff.get("/")["Location"] == "/dashboard/"
    assert reviewer.get("/")["Location"] == "/inbox/"


def test_signing_in_lands_operators_on_the_dashboard(client, olga):
    response = client.post(
        "/accounts/login/", {"username": "olga", "password": "operator password 1234"}
    )
    assert response.status_code == 302 and response["Location"] == "/dashboard/"


# --- what each page shows --------------------------------------------------------------------


def test_the_overview_shows_backlog_active_runs_and_approval_queues_from_the_database(
    owner, outsider, staff, scheduler_only
):
    for _ in range(3):
        submit(owner.tenant, chain("pair", "a", "b"), lane="interactive")
    submit(outsider.tenant, chain("solo", "only"), lane="batch")

    page = squash(text(staff.get("/dashboard/")))

    owner_row = re.search(r'data-tenant="owner" data-lane="interactive">(.*?)</tr>', page).group(1)
    assert re.search(r'data-figure="ready">3<', owner_row)
    outsider_row = re.search(r'data-tenant="outsider" data-lane="batch">(.*?)</tr>', page).group(1)
    assert re.search(r'data-figure="ready">1<', outsider_row)
    ready = StepRun.objects.filter(status=StepStatus.READY).count()
    assert f'data-figure="ready-steps">{ready}<' in page
    accepted = Run.objects.filter(status=RunStatus.ACCEPTED).count()
    assert f'data-figure="accepted-runs">{accepted}<' in page
    assert 'id="queues"' in page or "RabbitMQ did not answer" in page
    assert "PostgreSQL" in page and "Redis" in page
    assert 'title="no scheduler has run a cycle" data-health="Scheduler"' in page


def test_the_overview_counts_pending_approvals_per_tenant_and_reviewer_group(owner, staff):
    from tests.support.approvals import refund_workflow, run_ready_steps

    for amount in (10, 20):
        run = submit(
            owner.tenant, refund_workflow(timeout_s=1800), {"customer": "A", "amount": amount}
        )
        run_ready_steps(run)

    page = squash(text(staff.get("/dashboard/")))

    row = re.search(r'data-tenant="owner" data-reviewers="reviewer">(.*?)</tr>', page).group(1)
    assert 'data-figure="pending">2<' in row
    assert '<td class="num warn">2</td>' in row  # both due within the hour


def test_the_workers_page_marks_a_silent_worker_down(staff, settings):
    now = timezone.now()
    settings.SWITCHYARD_WORKER_DOWN_AFTER_S = 15
    for name, seen in (("llm@alive", now), ("tool@silent", now - timedelta(seconds=40))):
        ProcessHeartbeat.objects.create(
            role="worker", name=name, queues=["steps.llm"], pool="threads", concurrency=8,
            started_at=now - timedelta(hours=1), last_seen_at=seen, steps_succeeded=7,
        )  # fmt: skip

    page = squash(text(staff.get("/dashboard/workers/")))

    assert re.search(r'data-worker="llm@alive" data-state="up"', page)
    assert re.search(r'data-worker="tool@silent" data-state="down"', page)
    assert '<td class="num" data-figure="succeeded">7</td>' in page


def test_a_webhook_worker_is_credited_with_its_deliveries(owner, staff):
    run = submit(owner.tenant, chain("pair", "a", "b"))
    delivery = WebhookDelivery.objects.create(
        run=run, tenant=owner.tenant, event_type="run.succeeded",
        url="https://hooks.example.com/", payload="{}",
    )  # fmt: skip
    webhooks = WorkerBeat(node="hooks@host", queues=["webhooks"], pool="threads", concurrency=2)
    tools = WorkerBeat(node="tools@host", queues=["steps.tool"], pool="threads", concurrency=2)
    for beat in (webhooks, tools):
        beat.register()
    ProcessHeartbeat.objects.update(counted_until=timezone.now() - timedelta(minutes=1))
    answered = timezone.now() - timedelta(seconds=30)
    for number, (status_code, error, worker) in enumerate(
        [
            (204, "", "hooks@host/7"),
            (200, "", "hooks@host/7"),
            (503, "", "hooks@host/8"),
            (None, "connection refused", "hooks@host/8"),
            (200, "", "tools@host/9"),  # not a webhook worker's: never counted
            (200, "", "other@host/1"),
        ],
        start=1,
    ):
        WebhookAttempt.objects.create(
            delivery=delivery, number=number, status_code=status_code, error=error,
            worker=worker, at=answered,
        )  # fmt: skip
    for beat in (webhooks, tools):
        beat.beat()

    page = squash(text(staff.get("/dashboard/workers/")))

    row = re.search(r'data-worker="hooks@host".*?</tr>', page).group(0)
    assert 'data-figure="succeeded">2</td>' in row
    assert 'data-figure="failed">2</td>' in row
    row = re.search(r'data-worker="tools@host".*?</tr>', page).group(0)
    assert 'data-figure="succeeded">0</td>' in row
    # Counted once: the next beat's window starts where this one ended.
    webhooks.beat()
    assert ProcessHeartbeat.objects.get(name="hooks@host").steps_succeeded == 2


def test_the_workers_page_says_what_to_do_when_none_reported(staff):
    assert "No worker has reported" in text(staff.get("/dashboard/workers/"))


def test_the_tenants_page_shows_usage_against_quotas(owner, staff):
    owner.tenant.max_queued_runs = 10
    owner.tenant.save()
    for _ in range(4):
        submit(owner.tenant, chain("pair", "a", "b"))

    page = squash(text(staff.get("/dashboard/tenants/")))

    section = re.search(r'data-tenant="owner">(.*?)</section>', page).group(1)
    queued = re.search(r'data-bar="queued runs".*?data-figure="used">(\d+)</b> / (\d+)', section)
    assert queued.groups() == ("4", "10")
    assert 'style="width: 40%"' in section
    assert f"/admin/tenants/tenant/{owner.tenant.pk}/change/" in section


def shown_tenants(page: str) -> list[str]:
    return re.findall(r'<section class="panel tenant[^"]*" data-tenant="([^"]+)"', page)


def test_the_tenants_page_searches_names_and_slugs(owner, outsider, staff):
    tenant_create(slug="acme-eu", name="Acme Europe")
    tenant_create(slug="globex", name="Globex for ACME")
    tenant_create(slug="initech", name="Initech")

    page = squash(text(staff.get("/dashboard/tenants/?q=acme")))

    assert shown_tenants(page) == ["acme-eu", "globex"]  # by slug, then by name
    assert "2 tenants matching “acme”" in page
    assert 'name="q" value="acme"' in page
    none = squash(text(staff.get("/dashboard/tenants/?q=umbrella")))
    assert shown_tenants(none) == [] and "No tenant's name or slug contains “umbrella”" in none


def test_the_tenants_page_sorts_by_a_column_either_way(owner, outsider, staff):
    busy = tenant_create(slug="busy", name="Zeta busy")[0]
    for _ in range(3):
        submit(busy, chain("pair", "a", "b"))
    submit(outsider.tenant, chain("pair", "a", "b"))

    assert shown_tenants(text(staff.get("/dashboard/tenants/"))) == ["busy", "outsider", "owner"]
    by_queued = squash(text(staff.get("/dashboard/tenants/?sort=-queued")))
    assert shown_tenants(by_queued) == ["busy", "outsider", "owner"]
    assert shown_tenants(text(staff.get("/dashboard/tenants/?sort=queued"))) == [
        "owner",
        "outsider",
        "busy",
    ]
    assert shown_tenants(text(staff.get("/dashboard/tenants/?sort=-name"))) == [
        "busy",  # Zeta busy
        "owner",
        "outsider",
    ]
    # The current sort's link turns it around; the others start from the largest count.
    assert 'href="?sort=queued" class="on" data-sort="queued" aria-current="true"' in by_queued
    assert 'href="?sort=-active" data-sort="active"' in by_queued
    assert 'href="?sort=name" data-sort="name"' in by_queued
    # An unknown sort is the default one.
    assert shown_tenants(text(staff.get("/dashboard/tenants/?sort=weight;drop"))) == [
        "busy",
        "outsider",
        "owner",
    ]


def test_the_tenants_page_pages_through_many_tenants(owner, outsider, staff):
    for n in range(30):
        tenant_create(slug=f"t{n:02}", name=f"Tenant {n:02}")
    first = squash(text(staff.get("/dashboard/tenants/?q=tenant&sort=-slug")))
    shown = shown_tenants(first)
    assert len(shown) == TENANTS_PER_PAGE and shown[:3] == ["t29", "t28", "t27"]
    assert "30 tenants matching “tenant” · page 1 of 2" in first
    assert 'href="?q=tenant&amp;sort=-slug&amp;page=2" rel="next"' in first
    second = squash(text(staff.get("/dashboard/tenants/?q=tenant&sort=-slug&page=2")))
    assert shown_tenants(second) == [f"t{n:02}" for n in range(5, -1, -1)]
    assert (
        'href="?q=tenant&amp;sort=-slug&amp;page=1" rel="prev"' in second
        and 'rel="next"' not in second
    )
    # A page past the end shows the last one.
    past = text(staff.get("/dashboard/tenants/?q=tenant&sort=-slug&page=9"))
    assert shown_tenants(past) == shown_tenants(second)
    everyone = squash(text(staff.get("/dashboard/tenants/")))
    assert "32 tenants · page 1 of 2" in everyone


def test_the_tenants_live_list_keeps_the_pages_search_and_sort(owner, outsider):
    tenant_create(slug="acme", name="Acme")
    frame = tenants_frame(TenantQuery.from_query({"q": "o", "sort": "-slug"}))
    assert shown_tenants(squash(frame["html"])) == ["owner", "outsider"]
    assert list(frame["figures"]["tenants"]) == ["owner", "outsider"]


def test_pause_and_resume_go_through_the_services_and_are_audited(owner, staff, olga):
    response = staff.post(f"/dashboard/tenants/{owner.tenant.slug}/pause/")
    assert response.status_code == 302
    assert not Tenant.objects.get(pk=owner.tenant.pk).is_active
    page = text(staff.get("/dashboard/tenants/"))
    assert "paused" in page and "Resume" in page

    staff.post(f"/dashboard/tenants/{owner.tenant.slug}/resume/")

    assert Tenant.objects.get(pk=owner.tenant.pk).is_active
    actions = list(OperatorAction.objects.order_by("at").values_list("operator", "action"))
    assert actions == [("operator:olga", "tenant.pause"), ("operator:olga", "tenant.resume")]


# --- runs -------------------------------------------------------------------------------------


def test_the_runs_list_filters_and_pages_by_keyset(owner, outsider, staff):
    mine = [submit(owner.tenant, chain("pair", "a", "b")) for _ in range(5)]
    failed = work_locally(submit(owner.tenant, chain("pair", "a", "b")), fail=frozenset({"b"}))
    theirs = submit(outsider.tenant, chain("other", "x"), lane="batch")

    def shown(query: str) -> list[str]:
        return re.findall(
            r'<tr data-run="([0-9a-f-]+)"', text(staff.get(f"/dashboard/runs/{query}"))
        )

    assert shown("?tenant=outsider") == [str(theirs.public_id)]
    assert shown("?lane=batch") == [str(theirs.public_id)]
    assert shown("?status=failed") == [str(failed.public_id)]
    assert shown("?error=b+broke") == [str(failed.public_id)]
    assert shown("?workflow=pair&tenant=owner") == [
        str(r.public_id) for r in [failed, *reversed(mine)]
    ]
    future = (timezone.now() + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")
    assert shown(f"?since={future}") == []

    from dashboard.run_queries import RunFilters, runs_page

    first = runs_page(RunFilters(tenant="owner"), limit=4)
    second = runs_page(RunFilters(tenant="owner"), after=first.older, limit=4)
    back = runs_page(RunFilters(tenant="owner"), before=second.newer, limit=4)
    everything = [failed, *reversed(mine)]
    assert [r.pk for r in first.runs] == [r.pk for r in everything[:4]]
    assert [r.pk for r in second.runs] == [r.pk for r in everything[4:]]
    assert second.older is None and first.newer is None
    assert [r.pk for r in back.runs] == [r.pk for r in first.runs]


def test_the_runs_list_says_so_when_empty(staff):
    assert "No run yet" in text(staff.get("/dashboard/runs/"))
    assert "No run matches" in text(staff.get("/dashboard/runs/?tenant=nobody"))


def test_the_run_page_draws_the_graph_timeline_steps_and_log(owner, staff):
    run = work_locally(
        submit(owner.tenant, chain("trio", "fetch", "think", "reply")), fail=frozenset({"think"})
    )

    page = squash(text(staff.get(f"/dashboard/runs/{run.public_id}/")))

    for step_id, status in (("fetch", "succeeded"), ("think", "failed"), ("reply", "cancelled")):
        assert f'data-step="{step_id}" data-status="{status}"' in page
    assert page.count('class="edge') == 2
    assert 'class="gbar gbar-attempt-succeeded"' in page and "gbar-attempt-failed" in page
    assert "think broke" in page
    seqs = [int(s) for s in re.findall(r'<tr data-seq="(\d+)"', page)]
    assert seqs == list(Event.objects.filter(run=run).order_by("seq").values_list("seq", flat=True))
    assert 'id="retry"' in page and "Cancel run" not in page


def test_a_map_step_shows_its_items_progress_not_an_attempt_count(owner, staff):
    run = submit(
        owner.tenant,
        {"name": "fanout", "steps": [
            {"id": "each", "kind": "map", "over": "{{ ['a', 'b', 'c'] }}",
             "step": {"kind": "tool", "tool": "echo", "args": {"value": "{{ item }}"}}},
        ]},
    )  # fmt: skip
    [item, *_] = StepRun.objects.filter(run=run, map_index__isnull=False).order_by("map_index")
    step_complete(
        claim=step_claim(
            step_run_id=item.pk, dispatch_token=dispatch_token_of(item), worker="local@test/1"
        ),
        output={"value": "a"},
    )

    page = squash(text(staff.get(f"/dashboard/runs/{run.public_id}/")))

    summary = re.search(r'<details class="step" data-step="each".*?</summary>', page).group(0)
    assert '<span data-figure="items">1/3 items done</span>' in summary
    assert "attempt" not in summary
    item_summary = re.search(
        r'<details class="step" data-step="each\[0\]".*?</summary>', page
    ).group(0)
    assert '<span data-figure="attempt">attempt 1/' in item_summary


def test_an_unknown_run_is_a_404(staff):
    assert staff.get("/dashboard/runs/not-a-uuid/").status_code == 404
    assert staff.get("/dashboard/runs/6f1c0c9e-0000-4000-8000-000000000000/").status_code == 404


def test_cancel_from_the_run_page_names_the_operator(owner, staff):
    run = submit(owner.tenant, chain("pair", "a", "b"))

    response = staff.post(f"/dashboard/runs/{run.public_id}/cancel/")

    assert response.status_code == 302
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED
    event = Event.objects.get(run=run, type="run.cancelled")
    assert event.data["by"] == "operator:olga"


def test_re_run_of_a_step_that_is_being_worked_on_is_refused_with_a_message(owner, staff):
    run = submit(owner.tenant, chain("pair", "a", "b"))
    step = StepRun.objects.get(run=run, step_id="a")
    dispatch_token_of(step)  # admitted: queued
    run.refresh_from_db()
    run.status = RunStatus.RUNNING
    run.save()

    response = staff.post(f"/dashboard/runs/{run.public_id}/rerun/", {"step": "a"}, follow=True)

    assert "still being worked on" in text(response)
    assert not Event.objects.filter(run=run, type="run.rerun").exists()


def test_bulk_cancel_confirms_the_count_then_cancels_exactly_those(owner, outsider, staff):
    for _ in range(3):
        submit(owner.tenant, chain("pair", "a", "b"))
    other = submit(outsider.tenant, chain("pair", "a", "b"))

    confirm = squash(text(staff.get("/dashboard/runs/bulk/?action=cancel&tenant=owner")))
    assert "This will cancel <b>3</b> runs" in confirm

    staff.post("/dashboard/runs/bulk/", {"action": "cancel", "tenant": "owner"})

    assert Run.objects.filter(tenant=owner.tenant, status=RunStatus.CANCELLED).count() == 3
    other.refresh_from_db()
    assert other.status == RunStatus.ACCEPTED
    bys = set(Event.objects.filter(type="run.cancelled").values_list("data__by", flat=True))
    assert bys == {"operator:olga"}


def test_the_failures_view_says_when_a_group_first_and_last_failed(owner, staff):
    now = timezone.now()
    # (created, failed) minutes ago: the first created is not the first to fail.
    times = [(180, 10), (120, 60), (90, 30)]
    runs = []
    for created, failed in times:
        run = work_locally(submit(owner.tenant, chain("pair", "a", "b")), fail=frozenset({"b"}))
        Run.objects.filter(pk=run.pk).update(
            created_at=now - timedelta(minutes=created), finished_at=now - timedelta(minutes=failed)
        )
        runs.append(run)

    [group] = failure_groups(since=now - timedelta(days=1))

    assert group.count == 3
    assert group.first_at == now - timedelta(minutes=60)
    assert group.last_at == now - timedelta(minutes=10)
    assert group.sample_run == runs[0].public_id  # the latest to fail
    page = squash(text(staff.get("/dashboard/failures/?window=24h")))
    row = re.search(r"<tr data-fingerprint=.*?</tr>", page).group(0)
    last, first = re.findall(r'<time datetime="([^"]+)"', row)
    assert (last, first) == (group.last_at.isoformat(), group.first_at.isoformat())
    assert ">10 min ago</time>" in row and ">1 h ago</time>" in row


def test_the_failures_view_groups_by_workflow_and_error_fingerprint(owner, staff):
    for _ in range(3):
        work_locally(submit(owner.tenant, chain("pair", "a", "b")), fail=frozenset({"b"}))
    work_locally(submit(owner.tenant, chain("pair", "a", "b")), fail=frozenset({"a"}))

    page = squash(text(staff.get("/dashboard/failures/")))

    counts = re.findall(
        r'<tr data-fingerprint="([0-9a-f]{12})"> <td class="num"><b>(\d+)</b>', page
    )
    assert sorted(int(n) for _, n in counts) == [1, 3]
    fingerprint = next(fp for fp, n in counts if n == "3")
    listed = text(staff.get(f"/dashboard/runs/?status=failed&fingerprint={fingerprint}"))
    assert listed.count("<tr data-run=") == 3
