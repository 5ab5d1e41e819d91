"""A reviewer in a real browser: signs in, sees a request appear without reloading, opens it,
edits the proposed reply, approves, and the run completes with the edit. Screenshots of the
login page, the inbox, the request and the history are kept as artifacts."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth import get_user_model

from approvals.models import Approval, ApprovalStatus
from approvals.services import approval_decide
from tenants.models import Role
from tests.support.approvals import (
    PASSWORD,
    as_reviewer,
    make_reviewer,
    refund_workflow,
    run_ready_steps,
)
from tests.support.workflows import submit

pytestmark = pytest.mark.cluster


@pytest.fixture
def site(owner, outsider, cluster):
    """Scheduler, control and tool workers, and a web process; returns its base URL."""
    cluster.start_scheduler()
    cluster.start_worker("steps.control", pool="threads", concurrency=1)
    cluster.start_worker("steps.tool", pool="threads", concurrency=2)
    return cluster.start_web()


def wait_for_approval(cluster, run) -> Approval:
    return cluster.wait_until(
        lambda: Approval.objects.filter(run=run, status=ApprovalStatus.PENDING).first(),
        30,
        f"run {run.public_id} never asked for an approval",
    )


def signed_in_at(browser, site: str, username: str, path: str):
    """A new page of `username`, signed in through the login page, showing `path`."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{site}/accounts/login/?next={path}")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{site}{path}")
    return page


def test_a_reviewer_decides_a_request_that_appeared_live(
    owner, outsider, cluster, site, browser, screenshot
):
    make_reviewer("ann", owner.tenant, groups=["finance"])
    # Requests already waiting: a four-eyes one due soon, and one for another group.
    older = submit(
        owner.tenant,
        refund_workflow("large-refund", required_approvals=2, timeout_s=1800),
        {"customer": "Dana Whitfield", "amount": 480},
    )
    other = submit(
        owner.tenant,
        refund_workflow("legal-review", reviewers="legal", timeout_s=86400),
        {"customer": "Eve Park", "amount": 60},
    )
    submit(outsider.tenant, refund_workflow(), {"customer": "Not yours", "amount": 1})
    for run in (older, other):
        wait_for_approval(cluster, run)

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{site}/inbox/")
    assert page.url.startswith(f"{site}/accounts/login/")
    screenshot(page, "login")
    page.fill("#id_username", "ann")
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{site}/inbox/")
    page.wait_for_selector("#live-status[data-state=live]")
    assert page.locator(".request").count() == 2  # not the other tenant's
    page.evaluate("window.notReloaded = true")

    run = submit(
        owner.tenant,
        refund_workflow(timeout_s=7200),
        {"customer": "Ann Lee", "amount": 120},
    )
    approval = wait_for_approval(cluster, run)
    row = page.locator(f'.request[data-approval="{approval.public_id}"]')
    row.wait_for(timeout=20_000)
    assert page.evaluate("window.notReloaded") is True  # it arrived without a reload
    assert page.locator(".request").count() == 3
    assert page.locator('[data-count="pending"]').inner_text() == "3"
    assert "Refund 120 EUR to Ann Lee?" in row.inner_text()
    assert re.match(r"\(3\) Inbox", page.title())
    page.wait_for_timeout(2600)  # let the arrival highlight fade for the screenshot
    screenshot(page, "inbox")

    row.locator("a").click()
    page.wait_for_url(f"{site}/inbox/{approval.public_id}/")
    assert page.locator(".prompt").inner_text() == "Refund 120 EUR to Ann Lee?"
    assert page.input_value("#id_field__amount") == "120"
    screenshot(page, "detail")

    page.fill("#id_field__amount", "100")
    page.fill("#id_field__reply", "Dear Ann, we refund 100 EUR today.")
    page.fill("#id_comment", "Goodwill refund, shipping fee kept")
    page.click("button[value=approve]")
    page.wait_for_url(f"{site}/inbox/")
    assert "Approved: Refund 120 EUR to Ann Lee?" in page.locator(".flash").inner_text()
    assert page.locator(f'.request[data-approval="{approval.public_id}"]').count() == 0
    screenshot(page, "inbox-after-approval")

    run = cluster.wait_run(run)
    assert run.status == "succeeded", run.error
    assert run.output["sent"] == {"reply": "Dear Ann, we refund 100 EUR today.", "amount": 100}

    page.click("text=History")
    page.wait_for_url(f"{site}/inbox/history/")
    history = page.locator(f'tr[data-approval="{approval.public_id}"]').inner_text()
    assert "ann" in history and "Goodwill refund" in history
    assert "approved" in history.lower()
    screenshot(page, "history")

    page.goto(f"{site}/inbox/{approval.public_id}/")
    assert "by ann" in page.locator(".decided").inner_text()
    screenshot(page, "detail-decided")


def test_a_viewer_sees_the_request_without_decision_buttons(
    owner, cluster, site, browser, screenshot
):
    viewer = make_reviewer("vic", owner.tenant, role=Role.VIEWER)
    assert get_user_model().objects.filter(pk=viewer.pk).exists()
    run = submit(owner.tenant, refund_workflow(timeout_s=600), {"customer": "Ann", "amount": 1})
    approval = wait_for_approval(cluster, run)

    page = signed_in_at(browser, site, "vic", f"/inbox/{approval.public_id}/")

    assert page.locator("button[value=approve]").count() == 0
    assert "viewers can read requests but not approve or reject them" in page.inner_text(
        "#decision"
    )
    screenshot(page, "detail-viewer")


def test_a_reviewer_reads_votes_in_words_and_is_offered_no_admin_link(
    owner, cluster, browser, screenshot
):
    ann = make_reviewer("ann", owner.tenant)
    bob = make_reviewer("bob", owner.tenant)
    run = submit(
        owner.tenant,
        refund_workflow("four-eyes", required_approvals=2, timeout_s=600),
        {"customer": "Ann", "amount": 5},
    )
    [approval] = run_ready_steps(run)
    approval_decide(approval=approval, reviewer=as_reviewer(ann), decision="approve", comment="")
    approval_decide(approval=approval, reviewer=as_reviewer(bob), decision="reject", comment="")
    site = cluster.start_web()

    page = signed_in_at(browser, site, "ann", f"/inbox/{approval.public_id}/")

    votes = page.locator(".votes li").all_inner_texts()
    assert any(re.match(r"✓\s*ann approved at \d\d:\d\d", v) for v in votes), votes
    assert any(re.match(r"✕\s*bob rejected at \d\d:\d\d", v) for v in votes), votes
    nav = page.locator("header nav")
    assert nav.get_by_role("link", name="Inbox").count() == 1
    assert nav.get_by_role("link", name="Admin").count() == 0
    screenshot(page, "detail-votes")

    page.goto(f"{site}/inbox/history/")
    history = page.locator(f'tr[data-approval="{approval.public_id}"]').inner_text()
    assert "bob rejected" in history and "rejectd" not in history
