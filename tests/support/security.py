"""The world the security tests (tests/security/) attack: tenant A with its objects and
people, and the roles that try to reach them (docs/security.md).

Roles:
- `anonymous`: no credentials at all;
- `admin_key`: an API key of A with the `admin` scope (A's own tools, managing keys);
- `plain_key`: an API key of A without scopes;
- `outsider_key`: an API key of tenant B (with the `admin` scope, so only the tenant differs);
- `revoked_key`: a revoked API key of A;
- `viewer`, `reviewer`: signed-in members of A with those roles;
- `foreign_reviewer`: a signed-in reviewer of B;
- `operator`: a signed-in staff user (platform operator) with no membership.

A stream token (`jobs.stream_tokens`) is no role: it opens one run's streams and nothing else,
so the matrix presents `World.stream_token(run)` everywhere else and expects what anonymous gets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from approvals.models import Approval
from jobs.models import Run
from jobs.stream_tokens import stream_token_mint
from schedules.models import Schedule
from schedules.services import schedule_create
from tenants.models import ApiKey, Membership, Role, Scope, Tenant
from tenants.services import api_key_issue, api_key_revoke, tenant_create
from tests.support.approvals import refund_workflow, run_ready_steps
from tests.support.dashboard import chain, work_locally
from tests.support.workflows import submit

KEY_ROLES = ("admin_key", "plain_key", "outsider_key", "revoked_key")
SESSION_ROLES = ("viewer", "reviewer", "foreign_reviewer", "operator")
ROLES = ("anonymous", *KEY_ROLES, *SESSION_ROLES)
# The roles that act for tenant A (or for the platform): everyone else must leave A unchanged.
A_ROLES = frozenset({"admin_key", "plain_key", "viewer", "reviewer", "operator"})

REFUND_INPUT = {"customer": "Ann", "amount": 120}


@dataclass
class World:
    tenant_a: Tenant
    tenant_b: Tenant
    raw_keys: dict[str, str]
    users: dict[str, Any]
    plain_key: ApiKey
    waiting_run: Run
    failed_run: Run
    approval: Approval
    schedule: Schedule
    foreign_run: Run  # tenant B's
    # Strings that identify A's objects: none may appear in what another tenant is shown.
    secrets_of_a: list[str] = field(default_factory=list)

    def client(self, role: str, **defaults: Any) -> Client:
        """A test client acting as `role` (Bearer key or signed-in session)."""
        if role in self.raw_keys:
            defaults["HTTP_AUTHORIZATION"] = f"Bearer {self.raw_keys[role]}"
        client = Client(**defaults)
        if role in self.users:
            client.force_login(self.users[role])
        return client

    def stream_token(self, run: Run) -> str:
        """A stream token for `run`, as its tenant's backend would mint it."""
        token, _ = stream_token_mint(run=run, now=timezone.now())
        return token


def _user(username: str, tenant: Tenant | None = None, role: str = "", **fields: Any):
    user = get_user_model().objects.create_user(username=username, password=None, **fields)
    if tenant is not None:
        Membership.objects.create(user=user, tenant=tenant, role=role)
    return user


def build_world() -> World:
    tenant_a, admin_a = tenant_create(slug="alpha", name="Alpha")
    tenant_b, admin_b = tenant_create(slug="bravo", name="Bravo")
    plain = api_key_issue(tenant=tenant_a, name="plain")
    revoked = api_key_issue(tenant=tenant_a, name="old", scopes=[Scope.ADMIN])
    api_key_revoke(api_key=revoked.api_key)

    waiting = submit(tenant_a, refund_workflow("refund"), REFUND_INPUT)
    [approval] = run_ready_steps(waiting)
    failed = submit(tenant_a, chain("flaky", "first", "second"))
    work_locally(failed, fail=frozenset({"second"}))
    waiting.refresh_from_db()
    failed.refresh_from_db()
    foreign = submit(tenant_b, chain("other", "only"))
    schedule = schedule_create(
        tenant=tenant_a, name="nightly", workflow="flaky", now=timezone.now(), cron="0 3 * * *"
    )
    assert waiting.status == "waiting" and failed.status == "failed"

    users = {
        "viewer": _user("vera", tenant_a, Role.VIEWER),
        "reviewer": _user("rita", tenant_a, Role.REVIEWER),
        "foreign_reviewer": _user("boris", tenant_b, Role.REVIEWER),
        "operator": _user("olga", is_staff=True),
    }
    return World(
        tenant_a=tenant_a,
        tenant_b=tenant_b,
        raw_keys={
            "admin_key": admin_a.raw_key,
            "plain_key": plain.raw_key,
            "outsider_key": admin_b.raw_key,
            "revoked_key": revoked.raw_key,
        },
        users=users,
        plain_key=plain.api_key,
        waiting_run=waiting,
        failed_run=failed,
        approval=approval,
        schedule=schedule,
        foreign_run=foreign,
        secrets_of_a=[
            str(schedule.public_id),
            str(waiting.public_id),
            str(failed.public_id),
            str(approval.public_id),
            str(plain.api_key.public_id),
            str(tenant_a.public_id),
            plain.api_key.prefix,
            admin_a.api_key.prefix,
        ],
    )
