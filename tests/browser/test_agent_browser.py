"""Agents' tool calls in the reviewers' inbox, in a real browser: one call approved as the
model asked, one with its arguments edited, one rejected with a comment the model reads; then
the run page shows the agent's transcript as a conversation. Screenshots are kept."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model

from tests.support.agents import children, model_was_told, refund_agent
from tests.support.approvals import PASSWORD, make_reviewer
from tests.support.workflows import submit

from .test_inbox_browser import signed_in_at, wait_for_approval

pytestmark = pytest.mark.cluster


@pytest.fixture
def site(owner, cluster):
    cluster.start_scheduler()
    cluster.start_pools(
        [
            ("steps.llm", "threads", 2),
            ("steps.tool", "threads", 2),
            ("steps.control", "threads", 2),
        ]
    )
    return cluster.start_web()


def test_a_reviewer_approves_edits_and_rejects_an_agents_tool_calls_in_the_inbox(
    owner, cluster, site, browser, screenshot
):
    make_reviewer("ann", owner.tenant)
    runs = [submit(owner.tenant, refund_agent()) for _ in range(3)]
    approved, edited, rejected = (wait_for_approval(cluster, run) for run in runs)

    page = signed_in_at(browser, site, "ann", "/inbox/")
    assert page.locator(".request").count() == 3
    screenshot(page, "agent-inbox")

    page.goto(f"{site}/inbox/{approved.public_id}/")
    text = page.inner_text("body")
    assert "wants to call test.refund" in text
    assert "The order arrived broken; I will refund it." in text  # the model's reasoning
    assert page.input_value("#id_field__amount") == "120"
    screenshot(page, "agent-request")
    page.click("button[value=approve]")
    page.wait_for_url(f"{site}/inbox/")

    page.goto(f"{site}/inbox/{edited.public_id}/")
    page.fill("#id_field__amount", "900")  # above the tool's schema's maximum
    page.click("button[value=approve]")
    assert "500" in page.inner_text("#decision")
    page.fill("#id_field__amount", "60")
    page.click("button[value=approve]")
    page.wait_for_url(f"{site}/inbox/")

    page.goto(f"{site}/inbox/{rejected.public_id}/")
    page.fill("#id_comment", "Ask the customer for a photo first.")
    page.click("button[value=reject]")
    page.wait_for_url(f"{site}/inbox/")

    done = [cluster.wait_run(run, timeout=60) for run in runs]
    assert [run.status for run in done] == ["succeeded"] * 3, [run.error for run in done]
    assert model_was_told(done[0])["refunded"] == {"order": 7, "amount": 120}
    assert model_was_told(done[1])["refunded"] == {"order": 7, "amount": 60}
    assert model_was_told(done[2]) == {
        "rejected": True,
        "comment": "Ask the customer for a photo first.",
        "by": ["ann"],
    }
    assert [s.kind for s in children(done[2])] == ["llm", "tool", "approval", "llm"]

    get_user_model().objects.create_user(username="olga", password=PASSWORD, is_staff=True)
    page = signed_in_at(browser, site, "olga", f"/dashboard/runs/{done[1].public_id}/")
    agent = page.locator('[data-agent="helper"]')
    assert "2 turns" in agent.inner_text()
    call = agent.locator('[data-turn="1"] details.tool-call[data-tool="test.refund"]')
    call.locator("summary").click()
    assert "Approved by ann, arguments edited" in call.inner_text()
    assert '"amount": 60' in call.locator("pre").nth(1).inner_text()  # as approved
    screenshot(page, "agent-run-transcript")
