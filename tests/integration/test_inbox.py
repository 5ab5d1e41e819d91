"""The reviewers' inbox pages (Django session auth): what each reviewer sees and may decide.

The live part (the socket, a page that updates without reload) is proven against a real web
process in test_approvals_cluster.py and in tests/browser/.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

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

INPUT = {"customer": "Ann", "amount": 120}


def start(tenant, name="refund", input=INPUT, **review) -> Approval:
    run = submit(tenant, refund_workflow(name, **review), input)
    [approval] = run_ready_steps(run)
    return approval


def signed_in(user) -> Client:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


@pytest.fixture
def ann(owner):
    return make_reviewer("ann", owner.tenant)


@pytest.fixture
def pending(owner):
    return start(owner.tenant, timeout_s=7200)


def page(response) -> str:
    return response.content.decode()


# --- access ----------------------------------------------------------------------------------


def test_the_inbox_asks_for_a_login(client, pending):
    for url in ("/inbox/", f"/inbox/{pending.public_id}/", "/inbox/history/"):
        response = client.get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/accounts/login/?next=")


def test_the_login_page_signs_a_reviewer_in_to_the_inbox(client, ann):
    assert client.get("/accounts/login/").status_code == 200
    response = client.post("/accounts/login/", {"username": "ann", "password": PASSWORD})
    assert response.status_code == 302 and response["Location"] == "/inbox/"
    wrong = client.post("/accounts/login/", {"username": "ann", "password": "nope"})
    assert "did not match" in page(wrong)


def test_a_reviewer_sees_only_their_tenants_requests(owner, outsider, ann, pending):
    theirs = start(outsider.tenant, name="theirs", input={"customer": "Zed", "amount": 7})

    response = signed_in(ann).get("/inbox/")

    assert response.status_code == 200
    html = page(response)
    assert "Refund 120 EUR to Ann?" in html and str(pending.public_id) in html
    assert "Refund 7 EUR to Zed?" not in html and str(theirs.public_id) not in html
    assert response.context["counts"].pending == 1


def test_another_tenants_reviewer_gets_a_404_on_the_page_and_the_decision(outsider, pending):
    stranger = make_reviewer("zed", outsider.tenant)
    client = signed_in(stranger)

    assert client.get(f"/inbox/{pending.public_id}/").status_code == 404
    post = client.post(f"/inbox/{pending.public_id}/", {"action": "approve"})

    assert post.status_code == 404
    pending.refresh_from_db()
    assert pending.status == ApprovalStatus.PENDING


def test_a_viewer_reads_but_cannot_decide(owner, pending):
    viewer = make_reviewer("vic", owner.tenant, role=Role.VIEWER)
    client = signed_in(viewer)

    response = client.get(f"/inbox/{pending.public_id}/")

    assert response.status_code == 200
    html = page(response)
    assert "Refund 120 EUR to Ann?" in html
    assert 'value="approve"' not in html and 'value="reject"' not in html
    assert "viewers can read requests but not approve or reject them" in html
    post = client.post(f"/inbox/{pending.public_id}/", {"action": "approve"})
    assert post.status_code == 403
    assert "You cannot decide this request" in page(post)
    assert "viewers can read requests but not approve or reject them" in page(post)
    pending.refresh_from_db()
    assert pending.status == ApprovalStatus.PENDING


def test_a_reviewer_outside_the_named_group_cannot_decide(owner):
    approval = start(owner.tenant, reviewers="finance")
    outsider_in_tenant = make_reviewer("ops", owner.tenant, groups=["ops"])
    client = signed_in(outsider_in_tenant)
    assert "only the &#x27;finance&#x27; group decide" in page(
        client.get(f"/inbox/{approval.public_id}/")
    )
    assert client.post(f"/inbox/{approval.public_id}/", {"action": "approve"}).status_code == 403
    member = make_reviewer("fin", owner.tenant, groups=["finance"])
    decided = signed_in(member).post(f"/inbox/{approval.public_id}/", {"action": "approve"})
    assert decided.status_code == 302


def test_staff_see_every_tenant_but_decide_only_as_members(outsider, pending):
    staff = get_user_model().objects.create_user("op", password=PASSWORD, is_staff=True)
    start(outsider.tenant, name="theirs", input={"customer": "Zed", "amount": 7})
    client = signed_in(staff)

    assert signed_in(staff).get("/inbox/").context["counts"].pending == 2
    assert client.post(f"/inbox/{pending.public_id}/", {"action": "approve"}).status_code == 403


def test_the_admin_link_is_shown_only_to_those_who_may_use_the_admin(ann, pending):
    staff = get_user_model().objects.create_user("op", password=PASSWORD, is_staff=True)
    for path in ("/inbox/", f"/inbox/{pending.public_id}/", "/inbox/history/"):
        assert 'href="/admin/"' not in page(signed_in(ann).get(path)), path
        assert 'href="/admin/"' in page(signed_in(staff).get(path)), path
    # The admin indeed refuses the reviewer and lets the staff user in.
    assert signed_in(ann).get("/admin/").status_code == 302
    assert signed_in(staff).get("/admin/").status_code == 200


def test_decisions_need_the_csrf_token(ann, pending):
    client = Client(enforce_csrf_checks=True)
    client.login(username="ann", password=PASSWORD)
    response = client.post(f"/inbox/{pending.public_id}/", {"action": "approve"})
    assert response.status_code == 403
    pending.refresh_from_db()
    assert pending.status == ApprovalStatus.PENDING


# --- the pages -------------------------------------------------------------------------------


def test_the_detail_page_shows_what_a_decision_needs(ann, pending):
    response = signed_in(ann).get(f"/inbox/{pending.public_id}/")

    html = page(response)
    assert "Refund 120 EUR to Ann?" in html
    assert '<details class="json" open><summary>1 field</summary>' in html  # the quote
    assert "&quot;amount&quot;: 120" in html  # pretty-printed JSON
    assert 'name="field__reply"' in html and "Dear Ann, we refund 120 EUR." in html
    assert 'name="field__amount" value="120"' in html
    assert "<code>quote</code>" in html  # the earlier step with its output
    assert "Sent to the customer." in html  # the field's description
    assert "then <strong>reject</strong>" in html  # what happens at the deadline
    assert 'data-relative="until"' in html and 'data-relative="since"' in html


def test_long_context_text_is_in_a_scrollable_box(owner, ann):
    workflow = refund_workflow()
    workflow["steps"][1]["context"]["letter"] = "{{ input.letter }}"
    workflow["input_schema"]["properties"]["letter"] = {"type": "string"}
    run = submit(owner.tenant, workflow, {**INPUT, "letter": "line one\nline two " * 40})
    [approval] = run_ready_steps(run)

    html = page(signed_in(ann).get(f"/inbox/{approval.public_id}/"))

    assert '<div class="longtext" tabindex="0">line one' in html


def test_approving_with_an_edited_form_decides_and_leaves_the_list(ann, pending):
    client = signed_in(ann)
    response = client.post(
        f"/inbox/{pending.public_id}/",
        {
            "action": "approve",
            "field__amount": "99.5",
            "field__reply": "Dear Ann, refunded.",
            "comment": "partial refund",
        },
    )

    assert response.status_code == 302 and response["Location"] == "/inbox/"
    pending.refresh_from_db()
    assert pending.status == ApprovalStatus.APPROVED and pending.decided_by == "ann"
    assert pending.data == {"amount": 99.5, "reply": "Dear Ann, refunded."}
    assert pending.comment == "partial refund"
    listing = client.get("/inbox/")
    assert str(pending.public_id) not in page(listing)
    assert "Approved: Refund 120 EUR to Ann?" in page(listing)


def test_a_field_that_does_not_fit_is_shown_next_to_it(ann, pending):
    response = signed_in(ann).post(
        f"/inbox/{pending.public_id}/",
        {"action": "approve", "field__amount": "900", "field__reply": "Dear Ann"},
    )
    assert response.status_code == 400
    html = page(response)
    assert "Amount 900 is greater than the maximum of 500" in html
    assert 'name="field__amount" value="900"' in html  # what the reviewer typed stays
    not_a_number = signed_in(ann).post(
        f"/inbox/{pending.public_id}/",
        {"action": "approve", "field__amount": "lots", "field__reply": "Dear Ann"},
    )
    assert "Amount must be a number" in page(not_a_number)
    pending.refresh_from_db()
    assert pending.status == ApprovalStatus.PENDING


def test_deciding_a_request_decided_meanwhile_says_so(owner, ann, pending):
    bob = make_reviewer("bob", owner.tenant)
    approval_decide(approval=pending, reviewer=as_reviewer(bob), decision="reject", comment="no")

    response = signed_in(ann).post(f"/inbox/{pending.public_id}/", {"action": "approve"})

    assert response.status_code == 409
    assert "Your decision was not recorded: this request was already rejected by bob" in page(
        response
    )
    pending.refresh_from_db()
    assert pending.status == ApprovalStatus.REJECTED and pending.votes.count() == 1


def test_a_four_eyes_approval_says_how_many_more_are_needed(owner, ann):
    approval = start(owner.tenant, required_approvals=2)
    client = signed_in(ann)
    response = client.post(f"/inbox/{approval.public_id}/", {"action": "approve"}, follow=True)
    assert "1 more reviewer must approve" in page(response)
    again = client.post(f"/inbox/{approval.public_id}/", {"action": "approve"})
    assert again.status_code == 409
    assert "ann has already approved this request" in page(again)


def test_the_history_shows_who_decided_what_and_when(owner, ann, pending):
    approval_decide(
        approval=pending, reviewer=as_reviewer(ann), decision="reject", comment="too much"
    )
    response = signed_in(ann).get("/inbox/history/")
    html = page(response)
    assert "Refund 120 EUR to Ann?" in html
    assert "<strong>ann</strong>" in html and "too much" in html
    assert "status-rejected" in html
    assert "<strong>ann</strong> rejected <span" in html and "rejectd" not in html


def test_the_detail_page_says_in_words_how_each_reviewer_voted(owner, ann):
    approval = start(owner.tenant, required_approvals=2)
    bob = make_reviewer("bob", owner.tenant)
    approval_decide(approval=approval, reviewer=as_reviewer(ann), decision="approve", comment="")
    approval_decide(approval=approval, reviewer=as_reviewer(bob), decision="reject", comment="")
    html = page(signed_in(ann).get(f"/inbox/{approval.public_id}/"))
    assert "<strong>ann</strong> approved <span" in html
    assert "<strong>bob</strong> rejected <span" in html
    assert "rejectd" not in html


def test_most_urgent_first_sorts_by_deadline(owner, ann):
    later = start(owner.tenant, name="later", timeout_s=7200)
    sooner = start(owner.tenant, name="sooner", timeout_s=600)
    none = start(owner.tenant, name="open")
    client = signed_in(ann)

    newest = [row.approval.pk for row in client.get("/inbox/").context["rows"]]
    urgent = [row.approval.pk for row in client.get("/inbox/?sort=urgent").context["rows"]]

    assert newest == [none.pk, sooner.pk, later.pk]
    assert urgent == [sooner.pk, later.pk, none.pk]


def test_badges_count_what_is_for_you_and_what_is_due(owner, ann):
    start(owner.tenant, name="mine", timeout_s=600)
    other = start(owner.tenant, name="finance", reviewers="finance")
    Approval.objects.filter(pk=other.pk).update(due_at=timezone.now() - timedelta(minutes=1))
    response = signed_in(ann).get("/inbox/")
    counts = response.context["counts"]
    assert (counts.pending, counts.mine, counts.due_soon, counts.overdue) == (2, 1, 1, 1)
    html = page(response)
    assert "1 overdue" in html and "1 due within 1 h" in html
    mine = signed_in(ann).get("/inbox/?show=mine").context["rows"]
    assert [row.approval.reviewers for row in mine] == ["reviewer"]


def test_the_live_fragment_is_the_list_alone(ann, pending):
    response = signed_in(ann).get("/inbox/?fragment=1")
    html = page(response)
    assert html.lstrip().startswith("{#") is False and "<html" not in html
    assert str(pending.public_id) in html and 'data-pending="1"' in html
