"""Approvals moved from `jobs` into their own app without losing a row.

The database is taken back to the last migration before the move (`jobs` 0009, when
`jobs.Approval` and `jobs.ApprovalVote` were the models), approvals and votes are written
there, through the models of that state too, and the database is migrated forward again: every
request, vote and decision is read back through the `approvals` app's models, unchanged, and
the admin's content types (and so the permissions granted on them) followed the models.
"""

from __future__ import annotations

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

from approvals.services import approval_decide
from tests.support.approvals import as_reviewer, make_reviewer, refund_workflow, run_ready_steps
from tests.support.workflows import submit

BEFORE_THE_MOVE = [("jobs", "0009_hot_tables_fewer_indexes")]
FIELDS = ("public_id", "run_id", "step_run_id", "tenant_id", "status", "prompt", "form_values")


def migrate(targets):
    executor = MigrationExecutor(connection)
    executor.migrate(targets)
    executor.loader.build_graph()
    return executor.loader.project_state(targets).apps


def leaf_nodes():
    return MigrationExecutor(connection).loader.graph.leaf_nodes()


@pytest.mark.django_db(transaction=True)
def test_approvals_and_votes_survive_the_move_into_their_own_app(owner):
    ann = make_reviewer("ann", owner.tenant)
    decided_run = submit(owner.tenant, refund_workflow("decided"), {"customer": "Ann", "amount": 9})
    [decided] = run_ready_steps(decided_run)
    approval_decide(approval=decided, reviewer=as_reviewer(ann), decision="reject", comment="no")
    pending_run = submit(owner.tenant, refund_workflow("pending"), {"customer": "Bo", "amount": 5})
    [pending] = run_ready_steps(pending_run)
    latest = leaf_nodes()

    try:
        old = migrate(BEFORE_THE_MOVE)
        with pytest.raises(LookupError):
            old.get_model("approvals", "Approval")
        old_approval = old.get_model("jobs", "Approval")
        old_vote = old.get_model("jobs", "ApprovalVote")
        # Written by the code of that time: a vote on the pending request, through the old model.
        old_vote.objects.create(
            approval=old_approval.objects.get(public_id=pending.public_id),
            user_id=ann.pk,
            reviewer="ann",
            decision="approve",
            comment="fine by me",
            at=timezone.now(),
        )
        before = {a.public_id: a for a in old_approval.objects.all()}
        votes_before = sorted(
            old_vote.objects.values_list("approval__public_id", "reviewer", "decision", "comment")
        )
        content_type = old.get_model("contenttypes", "ContentType")
        assert content_type.objects.filter(app_label="jobs", model="approval").exists()
    finally:
        new = migrate(latest)

    approval_model = new.get_model("approvals", "Approval")
    vote_model = new.get_model("approvals", "ApprovalVote")
    with pytest.raises(LookupError):
        new.get_model("jobs", "Approval")
    after = {a.public_id: a for a in approval_model.objects.all()}
    assert set(after) == set(before) == {decided.public_id, pending.public_id}
    for public_id, approval in after.items():
        for field in FIELDS:
            assert getattr(approval, field) == getattr(before[public_id], field), field
    assert after[decided.public_id].status == "rejected"
    assert after[decided.public_id].decided_by == "ann"
    assert after[pending.public_id].status == "pending"
    assert (
        sorted(
            vote_model.objects.values_list("approval__public_id", "reviewer", "decision", "comment")
        )
        == votes_before
        == sorted(
            [
                (decided.public_id, "ann", "reject", "no"),
                (pending.public_id, "ann", "approve", "fine by me"),
            ]
        )
    )
    content_type = new.get_model("contenttypes", "ContentType")
    assert content_type.objects.filter(app_label="approvals", model="approval").exists()
    assert not content_type.objects.filter(app_label="jobs", model="approval").exists()
    # The current code reads them too: the run's approval and its vote, through the relations.
    assert pending_run.approvals.get().votes.get().comment == "fine by me"
