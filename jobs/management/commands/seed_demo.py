"""`python manage.py seed_demo`: idempotent demo data.

Two tenants (acme, weight 3; globex, weight 1), an operator (staff) and a reviewer account
(in each tenant's `finance` group), the `support-triage` and `refund-review` workflows and a
small knowledge base for each tenant, and a few runs (refund reviews wait in the inbox). The
demo API key of each tenant is rotated on every call (keys are stored hashed, so the only way
to print one is to issue it) and printed.
"""

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from jobs.definitions import parse_definition
from jobs.demo import (
    AGENT_REQUESTS,
    DEMO_DOCUMENTS,
    REFUND_REQUESTS,
    REFUND_REVIEW,
    SUPPORT_AGENT,
    SUPPORT_TRIAGE,
)
from jobs.models import Document, Run
from jobs.selectors import workflow_version_for
from jobs.services.documents import documents_add
from jobs.services.workflows import workflow_version_create
from jobs.transitions.runs import run_create
from tenants.models import ApiKey, Membership, Role, Scope, Tenant
from tenants.services import api_key_issue, api_key_revoke

DEMO_TENANTS = [("acme", "Acme Support", 3), ("globex", "Globex Batch", 1)]
OPERATOR = ("operator", "switchyard-operator")
REVIEWER = ("reviewer", "switchyard-reviewer")


class Command(BaseCommand):
    help = "Seed demo tenants, accounts, workflows, documents and runs (idempotent)."

    def add_arguments(self, parser):
        parser.add_argument("--runs", type=int, default=3, help="Runs to submit if none exist.")

    @transaction.atomic
    def handle(self, *args, runs: int = 3, **options):
        users = get_user_model()
        operator, _ = users.objects.get_or_create(username=OPERATOR[0])
        operator.is_staff = operator.is_superuser = True
        operator.set_password(OPERATOR[1])
        operator.save()
        reviewer, _ = users.objects.get_or_create(username=REVIEWER[0])
        reviewer.set_password(REVIEWER[1])
        reviewer.save()

        keys = {}
        for slug, name, weight in DEMO_TENANTS:
            tenant, _ = Tenant.objects.get_or_create(
                slug=slug, defaults={"name": name, "weight": weight}
            )
            membership, _ = Membership.objects.get_or_create(
                user=reviewer, tenant=tenant, defaults={"role": Role.REVIEWER}
            )
            if "finance" not in membership.groups:  # decides the refund-review approvals
                membership.groups = sorted({*membership.groups, "finance"})
                membership.save(update_fields=["groups"])
            for old in ApiKey.objects.filter(tenant=tenant, name="demo", revoked_at=None):
                api_key_revoke(api_key=old)
            # `admin`: the demo key can follow docs/api.md to the end (keys, webhook secret).
            issued = api_key_issue(tenant=tenant, name="demo", scopes=[Scope.ADMIN])
            keys[slug] = issued.raw_key
            if not Document.objects.filter(tenant=tenant).exists():
                documents_add(tenant=tenant, documents=DEMO_DOCUMENTS)
            version = workflow_version_for(tenant=tenant, name=SUPPORT_TRIAGE["name"])
            if version is None or version.definition != _normalised(tenant):
                version = workflow_version_create(tenant=tenant, document=SUPPORT_TRIAGE)
            if not Run.objects.filter(tenant=tenant).exists():
                for index in range(runs):
                    run_create(
                        tenant=tenant,
                        version=version,
                        input={
                            "ticket": [
                                "I want a refund for my last invoice",
                                "How do I export my data?",
                                "My password reset email never came",
                            ][index % 3],
                            "email": f"customer{index}@example.com",
                        },
                    )

            _seed_workflow(tenant, REFUND_REVIEW, REFUND_REQUESTS)
            _seed_workflow(tenant, SUPPORT_AGENT, AGENT_REQUESTS)

        self.stdout.write(f"Operator login: {OPERATOR[0]} / {OPERATOR[1]} (staff)")
        self.stdout.write(f"Reviewer login: {REVIEWER[0]} / {REVIEWER[1]}")
        for slug, raw_key in keys.items():
            self.stdout.write(f"API key for {slug}: {raw_key}")


def _seed_workflow(tenant, document: dict, inputs: list[dict]) -> None:
    """A workflow of the demo and, once, a run per input: the refund reviews and the support
    agent's run wait in the reviewer's inbox."""
    version = workflow_version_for(tenant=tenant, name=document["name"])
    if version is None or version.definition != parse_definition(document).document:
        version = workflow_version_create(tenant=tenant, document=document)
    if not Run.objects.filter(tenant=tenant, workflow_version__workflow=version.workflow).exists():
        for run_input in inputs:
            run_create(tenant=tenant, version=version, input=run_input)


def _normalised(tenant) -> dict:
    return parse_definition(SUPPORT_TRIAGE).document
