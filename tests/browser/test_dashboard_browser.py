"""An operator in a real browser (headless Debian Chromium): signs in, lands on the overview,
watches a chart and a run page update without reloading, and opens every dashboard page with
seeded data, checking the figures shown against the database. A screenshot of each page is
kept in tests/browser/artifacts/ (dashboard-*.png)."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.utils import timezone

from dashboard.models import MetricSample, ProcessHeartbeat
from jobs.models import Run, RunStatus, StepRun
from tenants.models import Tenant
from tenants.services import tenant_create
from tests.support.approvals import refund_workflow, run_ready_steps
from tests.support.dashboard import PASSWORD, make_operator
from tests.support.workflows import submit

pytestmark = pytest.mark.cluster

VIEWPORT = {"width": 1366, "height": 900}  # a laptop screen


def triage(name: str = "triage") -> dict:
    """fetch → (classify, lookup) → reply: a small graph with a fork and a join."""
    return {
        "name": name,
        "input_schema": {"type": "object", "properties": {"nap": {"type": "integer"}}},
        "steps": [
            {"id": "fetch", "kind": "tool", "tool": "echo", "args": {"ticket": "T-1"}},
            {"id": "classify", "kind": "tool", "tool": "test.count", "after": ["fetch"],
             "args": {"key": "classify", "sleep_ms": "{{ input.nap }}"}},
            {"id": "lookup", "kind": "tool", "tool": "echo", "after": ["fetch"],
             "args": {"email": "ann@example.com", "delay_ms": 50}},
            {"id": "reply", "kind": "tool", "tool": "echo", "after": ["classify", "lookup"],
             "args": {"text": "done"}},
        ],
    }  # fmt: skip


@pytest.fixture
def site(owner, outsider, cluster):
    """A scheduler sampling every second, a tool worker, and a web process that pushes every
    second; returns the web's base URL."""
    cluster.env.update(SWITCHYARD_METRICS_SAMPLE_S="1", SWITCHYARD_WORKER_HEARTBEAT_S="1")
    cluster.start_scheduler()
    cluster.start_worker("steps.tool", pool="threads", concurrency=4, name="tools")
    return cluster.start_web(SWITCHYARD_DASHBOARD_REFRESH_S="1")


def seed(owner, outsider, cluster) -> dict[str, Run]:
    done = [submit(owner.tenant, triage(), {"nap": 10}) for _ in range(3)]
    failed = submit(
        outsider.tenant,
        {"name": "sync", "steps": [
            {"id": "pull", "kind": "tool", "tool": "echo", "args": {"n": 1}},
            {"id": "push", "kind": "tool", "tool": "test.fail", "after": ["pull"],
             "args": {"key": "push", "retryable": False, "code": "upstream_503"}},
        ]},
        lane="batch",
    )  # fmt: skip
    for run in [*done, failed]:
        cluster.wait_run(run)
    review = submit(owner.tenant, refund_workflow(timeout_s=1800), {"customer": "Ann", "amount": 9})
    run_ready_steps(review)  # an approval waits for a reviewer (no control worker needed)
    return {"done": done[0], "failed": failed}


def sign_in(page, site: str) -> None:
    page.goto(f"{site}/dashboard/")
    assert page.url.startswith(f"{site}/accounts/login/")
    page.fill("#id_username", "olga")
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{site}/dashboard/")


def figure(page, name: str) -> int:
    return int(page.locator(f'[data-figure="{name}"]').first.inner_text())


def test_an_operator_watches_the_platform_live_and_opens_every_page(
    owner, outsider, cluster, site, browser, screenshot
):
    make_operator("olga")
    runs = seed(owner, outsider, cluster)
    page = browser.new_page(viewport=VIEWPORT)
    sign_in(page, site)

    # Overview: live, figures as in the database, charts filling without a reload.
    page.wait_for_selector("#live-status[data-state=live]")
    page.evaluate("window.notReloaded = true")
    assert figure(page, "waiting-runs") == Run.objects.filter(status=RunStatus.WAITING).count()
    page.wait_for_function(
        "document.querySelector('[data-chart=throughput]').dataset.points >= 2", timeout=20_000
    )
    points = int(page.locator("[data-chart=throughput]").get_attribute("data-points"))
    slow = submit(owner.tenant, triage(), {"nap": 6000})
    page.wait_for_function(
        f"document.querySelector('[data-chart=throughput]').dataset.points > {points}",
        timeout=20_000,
    )
    page.wait_for_function(
        "document.querySelector('[data-figure=running-steps]').innerText === '1'", timeout=20_000
    )
    assert page.evaluate("window.notReloaded") is True
    # Every chart draws its samples, or says that its window had nothing for it (on this idle
    # system steps are admitted as they become ready: no tenant may have had a backlog).
    charts = page.locator("[data-chart]")
    for index in range(charts.count()):
        chart = charts.nth(index)
        drawn = chart.locator(".uplot").count() == 1
        assert drawn or chart.locator('[data-empty="window"]').count() == 1, chart.inner_html()
    assert page.locator('[data-chart="throughput"] .uplot').count() == 1
    approvals = page.locator('tr[data-tenant="owner"][data-reviewers="reviewer"]')
    assert approvals.locator('[data-figure="pending"]').inner_text() == "1"
    page.wait_for_timeout(1500)  # a few more points in the charts for the screenshot
    screenshot(page, "dashboard-overview")
    page.emulate_media(color_scheme="dark")
    page.wait_for_timeout(300)
    screenshot(page, "dashboard-overview-dark")
    page.emulate_media(color_scheme="light")

    # A run page while the run is in progress: the graph and the log follow it live.
    page.goto(f"{site}/dashboard/runs/{slow.public_id}/")
    assert page.locator('g.node[data-step="reply"]').get_attribute("data-status") == "pending"
    page.wait_for_selector("#live-status:not([hidden])")
    page.evaluate("window.notReloaded = true")
    classify = page.locator('g.node[data-step="classify"]')
    page.wait_for_function(
        "document.querySelector('g.node[data-step=reply]').dataset.status === 'succeeded'",
        timeout=30_000,
    )
    assert classify.get_attribute("data-status") == "succeeded"
    assert page.evaluate("window.notReloaded") is True
    shown = page.locator("#events tr[data-seq]").count()
    assert shown == Run.objects.get(pk=slow.pk).events.count()
    assert page.locator("#run-status").inner_text() == "succeeded"
    assert page.locator(".gantt-row").count() == StepRun.objects.filter(run=slow).count()
    screenshot(page, "dashboard-run")

    # A failed run: its error, the failed step opened, retry offered.
    page.goto(f"{site}/dashboard/runs/{runs['failed'].public_id}/")
    assert "failed on purpose (upstream_503)" in page.locator(".run-error").inner_text()
    assert page.locator('details.step[data-step="push"]').get_attribute("open") is not None
    assert page.locator("#retry").is_visible()
    screenshot(page, "dashboard-run-failed")

    # Workers: the worker that is running, from its heartbeat.
    before = ProcessHeartbeat.objects.get(role="worker")
    page.goto(f"{site}/dashboard/workers/")
    after = ProcessHeartbeat.objects.get(role="worker")
    row = page.locator(f'tr[data-worker="{before.name}"]')
    assert row.get_attribute("data-state") == "up"
    done = int(row.locator('[data-figure="succeeded"]').inner_text())
    assert before.steps_succeeded <= done <= after.steps_succeeded and done > 0
    assert "threads" in row.inner_text() and "steps.tool" in row.inner_text()
    screenshot(page, "dashboard-workers")

    # Tenants: usage bars against quotas; pause and resume from the page.
    page.goto(f"{site}/dashboard/tenants/")
    outsider_card = page.locator('section[data-tenant="outsider"]')
    assert outsider_card.locator('[data-figure="state"]').inner_text() == "active"
    page.once("dialog", lambda dialog: dialog.accept())
    outsider_card.locator("button", has_text="Pause").click()
    page.wait_for_selector('section[data-tenant="outsider"].paused')
    assert Tenant.objects.get(slug="outsider").is_active is False
    screenshot(page, "dashboard-tenants")
    page.locator('section[data-tenant="outsider"] button', has_text="Resume").click()
    page.wait_for_selector('section[data-tenant="outsider"]:not(.paused)')
    assert Tenant.objects.get(slug="outsider").is_active is True

    # Runs: the list as in the database, then filtered to the failed run.
    page.goto(f"{site}/dashboard/runs/")
    assert page.locator("#runs tr[data-run]").count() == Run.objects.count()
    page.select_option("select[name=status]", "failed")
    page.click(".filters button[type=submit]")
    page.wait_for_url(re.compile(r".*status=failed.*"))
    assert page.locator("#runs tr[data-run]").count() == 1
    screenshot(page, "dashboard-runs")

    # Failures, grouped; then the bulk retry confirmation of that group.
    page.goto(f"{site}/dashboard/failures/")
    group = page.locator("#failure-groups tr[data-fingerprint]")
    assert group.count() == 1 and "upstream_503" in group.inner_text()
    screenshot(page, "dashboard-failures")
    group.locator("a", has_text="Retry all").click()
    assert "This will retry 1 run" in page.locator("#bulk-count").inner_text()
    screenshot(page, "dashboard-bulk-confirm")


def event_times(page) -> list[tuple[str, str]]:
    """The event log's time column: (what it shows, what its hover title says) per row."""
    cells = page.locator("#events tr[data-seq] time")
    return [
        (cells.nth(i).inner_text(), cells.nth(i).get_attribute("title"))
        for i in range(cells.count())
    ]


def test_a_run_pages_event_log_counts_time_from_the_runs_start(
    owner, outsider, cluster, site, browser, screenshot
):
    make_operator("olga")
    page = browser.new_page(viewport=VIEWPORT)
    sign_in(page, site)
    run = submit(owner.tenant, triage(), {"nap": 1500})
    page.goto(f"{site}/dashboard/runs/{run.public_id}/")
    rendered_at_load = page.locator("#events tr[data-seq]").count()
    page.wait_for_function(
        "document.querySelector('g.node[data-step=reply]').dataset.status === 'succeeded'",
        timeout=30_000,
    )
    page.wait_for_function(
        f"document.querySelectorAll('#events tr[data-seq]').length === "
        f"{Run.objects.get(pk=run.pk).events.count()}"
    )
    live = event_times(page)
    assert len(live) > rendered_at_load  # some rows were added by the page's script
    screenshot(page, "dashboard-run-event-log")

    run.refresh_from_db()
    start = run.created_at.replace(microsecond=run.created_at.microsecond // 1000 * 1000)
    expected = []
    for event in run.events.order_by("seq"):
        at = event.created_at.replace(microsecond=event.created_at.microsecond // 1000 * 1000)
        exact = at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"
        expected.append((f"+{(at - start).total_seconds():.3f}s", exact))
    assert live == expected
    assert live[-1][0] != live[0][0] and float(live[-1][0][1:-1]) >= 1.5  # the nap, at least
    page.reload()
    assert event_times(page) == expected  # rendered by the server as by the script


PHONE = {"width": 390, "height": 844}

# The elements that end past the right edge of the screen (what makes it scroll sideways).
OVERFLOWING = """() => [...document.querySelectorAll('body *')]
  .filter((el) => el.getBoundingClientRect().right > document.documentElement.clientWidth + 0.5)
  .filter((el) => !el.closest('.panel, .chart'))
  .map((el) => el.tagName + '.' + el.className + ' ' + Math.round(el.getBoundingClientRect().right))
"""


def test_the_overview_fits_a_phones_width(owner, outsider, cluster, site, browser, screenshot):
    make_operator("olga")
    slow = submit(owner.tenant, triage(), {"nap": 8000})  # active runs and a backlog to show
    review = submit(owner.tenant, refund_workflow(timeout_s=1800), {"customer": "Ann", "amount": 9})
    run_ready_steps(review)
    page = browser.new_page(viewport=PHONE, is_mobile=True, device_scale_factor=2)
    sign_in(page, site)
    page.wait_for_selector("#live-status[data-state=live]")
    page.wait_for_selector(f'#active-runs a[href="/dashboard/runs/{slow.public_id}/"]')
    page.wait_for_function(
        "document.querySelector('[data-chart=throughput]').dataset.points >= 2", timeout=20_000
    )
    assert page.locator("#approval-queues tr[data-tenant]").count() == 1
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, page.evaluate(OVERFLOWING)
    # Wide tables scroll inside their panel instead, and every chart is as wide as the screen.
    for chart in page.locator(".chart-card").all():
        box = chart.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390
    screenshot(page, "dashboard-overview-phone")


def test_chart_axes_label_large_values_compactly_and_wholly(owner, cluster, browser, screenshot):
    """Queue waits of tens of seconds (in ms) and depths in the tens of thousands: every y-axis
    label is short and the axis is wider than its widest label (a wait of 10,000 ms read
    "0,000", its first digit cut off)."""
    make_operator("olga")
    now = timezone.now()
    points = []
    for n, (p50, p95, depth) in enumerate(
        [(900, 12_000, 9_000), (1_500, 18_500, 15_000), (2_000, 25_000, 42_000), (800, 14_000, 7)]
    ):
        at = now - timedelta(minutes=5 - n)
        points += [
            MetricSample(at=at, metric="wait_p50", key="standard", value=p50),
            MetricSample(at=at, metric="wait_p95", key="standard", value=p95),
            MetricSample(at=at, metric="queue_depth", key="steps.tool", value=depth),
        ]
    MetricSample.objects.bulk_create(points)
    site = cluster.start_web()
    page = browser.new_page(viewport=VIEWPORT)
    sign_in(page, site)

    labels = {}
    for chart in ("wait", "queue_depth"):
        element = page.locator(f'[data-chart="{chart}"]')
        page.wait_for_function(f"document.querySelector('[data-chart={chart}]').dataset.yLabels")
        labels[chart] = element.get_attribute("data-y-labels").split("|")
        size = int(element.get_attribute("data-y-axis-size"))
        widths = page.evaluate(
            """(labels) => {
                const ctx = document.createElement("canvas").getContext("2d");
                ctx.font = "11px system-ui, sans-serif";
                return labels.map((label) => ctx.measureText(label).width);
            }""",
            labels[chart],
        )
        assert max(widths) + 15 < size, (chart, labels[chart], size)
    assert all(re.fullmatch(r"\d+(\.\d)?(ms|s|m)", label) for label in labels["wait"]), labels
    assert any(label.endswith("s") and not label.endswith("ms") for label in labels["wait"])
    assert all(re.fullmatch(r"\d+(\.\d)?K?", label) for label in labels["queue_depth"]), labels
    assert any(label.endswith("K") for label in labels["queue_depth"])
    screenshot(page, "dashboard-overview-large-values")


def test_an_operator_finds_a_tenant_by_search_and_sort_and_the_live_list_keeps_them(
    owner, outsider, cluster, browser, screenshot
):
    make_operator("olga")
    for slug, name in [("acme-eu", "Acme Europe"), ("acme-us", "Acme US"), ("globex", "Globex")]:
        tenant_create(slug=slug, name=name)
    site = cluster.start_web(SWITCHYARD_DASHBOARD_REFRESH_S="1")
    page = browser.new_page(viewport=VIEWPORT)
    sign_in(page, site)
    page.goto(f"{site}/dashboard/tenants/")
    cards = page.locator("section[data-tenant]")
    assert cards.count() == 5

    page.fill("#tenant-search input[name=q]", "acme")
    page.click("#tenant-search button[type=submit]")
    page.wait_for_url(re.compile(r".*\?q=acme$"))
    page.click("#tenant-sort a[data-sort=slug]")  # by slug, the other way round
    page.wait_for_url(re.compile(r".*\?q=acme&sort=-slug$"))
    page.wait_for_selector("#live-status[data-state=live]")
    refreshes = int(page.evaluate("document.body.dataset.liveRefreshes || '0'"))
    page.wait_for_function(f"Number(document.body.dataset.liveRefreshes) > {refreshes + 1}")
    # Live refreshes replaced the list with the same search and order.
    assert [cards.nth(i).get_attribute("data-tenant") for i in range(cards.count())] == [
        "acme-us",
        "acme-eu",
    ]
    assert page.locator("#tenant-count").inner_text() == "2 tenants matching “acme”"
    assert page.input_value("#tenant-search input[name=q]") == "acme"
    screenshot(page, "dashboard-tenants-search")
