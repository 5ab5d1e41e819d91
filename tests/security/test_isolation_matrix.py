"""The tenant-isolation matrix (docs/security.md), generated from the routing.

Every HTTP route of the URL configuration and every WebSocket route of `orchestrator.asgi` is
found by walking the routing tables; each must have an entry in the expectation tables below
(data, one row per route), or its test fails with "new route X has no isolation expectation".
Each route's parameters are filled with real objects of tenant A, and each role of
`conftest.ROLES` calls each of the route's methods and must get exactly the status written
down. Besides the status:

- a role that does not act for A (the outsider's key, another tenant's reviewer, anonymous,
  a revoked key) leaves A exactly as it was (runs, steps, approvals, keys, secret, workflows,
  documents), whatever the method, and no identifier of A's objects appears in what it is
  shown, except those it sent itself;
- a rightful mutating call does change A (so a refusal hidden behind a redirect is caught);
- every request runs in a savepoint that is rolled back, so each role meets the same world.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.contrib.contenttypes.models import ContentType
from django.db import transaction
from django.test import AsyncClient, Client
from django.utils import timezone

from approvals.models import Approval
from jobs.events import inbox_group
from jobs.models import Document, Run, StepRun, WorkflowVersion
from schedules.models import Schedule, ScheduleFire, TriggerEvent
from schedules.services import schedule_pause
from tenants.models import ApiKey, Tenant
from tenants.services import tenant_pause
from tests.security.routes import Route, http_routes, websocket_routes
from tests.support.security import A_ROLES, KEY_ROLES, REFUND_INPUT, ROLES, SESSION_ROLES

# --- expectations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class To:
    """A redirect (302) whose Location starts with `prefix`."""

    prefix: str

    def __repr__(self) -> str:
        return f"302 → {self.prefix}"


Expected = int | To
LOGIN = To("/accounts/login/?next=")
ADMIN_LOGIN = To("/admin/login/?next=")


def api(admin_key: Expected, plain_key: Expected | None = None, outsider_key: Expected = 404):
    """An API route: only API keys authenticate (sessions do not), revoked keys get 401."""
    return {
        "anonymous": 401,
        "admin_key": admin_key,
        "plain_key": admin_key if plain_key is None else plain_key,
        "outsider_key": outsider_key,
        "revoked_key": 401,
        **{role: 401 for role in SESSION_ROLES},
    }


def staff(operator: Expected) -> dict[str, Expected]:
    """An operators' page: sign in first; signed-in non-staff get 403."""
    return {
        "anonymous": LOGIN,
        **{role: LOGIN for role in KEY_ROLES},
        "viewer": 403,
        "reviewer": 403,
        "foreign_reviewer": 403,
        "operator": operator,
    }


def members(viewer: Expected, reviewer: Expected, foreign_reviewer: Expected, operator: Expected):
    """An inbox page: sign in first (API keys are no session)."""
    return {
        "anonymous": LOGIN,
        **{role: LOGIN for role in KEY_ROLES},
        "viewer": viewer,
        "reviewer": reviewer,
        "foreign_reviewer": foreign_reviewer,
        "operator": operator,
    }


def everyone(status: Expected, **exceptions: Expected) -> dict[str, Expected]:
    return {role: exceptions.get(role, status) for role in ROLES}


@dataclass(frozen=True)
class Spec:
    methods: dict[str, dict[str, Expected]]
    # Which world object fills a parameter, where the default (PARAMETERS) is not the one.
    objects: dict[str, str] = field(default_factory=dict)
    # Per method: the JSON body (API), form data (pages) or query (GET).
    data: dict[str, Any] = field(default_factory=dict)
    # Whether a rightful call of a mutating method changes tenant A (login/logout do not).
    changes_a: bool = True
    # Run inside each request's savepoint, before it: puts A in the state the route acts on.
    before: Callable[[Any], None] | None = None


# Which object of tenant A fills each path parameter, by name.
PARAMETERS = {
    "run_id": "waiting_run",
    "approval_id": "approval",
    "key_id": "plain_key",
    "name": "workflow",
    "slug": "tenant_a",
    "schedule_id": "schedule",
}

NEW_WORKFLOW = {"name": "fresh", "steps": [{"id": "a", "kind": "tool", "tool": "echo"}]}
REFUND_DECISION = {
    "action": "approve",
    "amount": "120",
    "reply": "Dear Ann, we refund 120 EUR.",
    "comment": "ok",
}

HTTP: dict[str, Spec] = {
    "": Spec(
        {
            "GET": everyone(
                200,
                viewer=To("/inbox/"),
                reviewer=To("/inbox/"),
                foreign_reviewer=To("/inbox/"),
                operator=To("/dashboard/"),
            )
        }
    ),
    # --- the client API (docs/api.md) ---
    "api/v1/workflows/": Spec(
        {"GET": api(200, outsider_key=200), "POST": api(201, outsider_key=201)},
        data={"POST": NEW_WORKFLOW},
    ),
    "api/v1/workflows/<str:name>/": Spec({"GET": api(200)}),
    "api/v1/runs/": Spec(
        # The outsider names A's workflow: unknown in its own tenant.
        {"GET": api(200, outsider_key=200), "POST": api(202)},
        data={"POST": {"workflow": "refund", "input": REFUND_INPUT}},
    ),
    "api/v1/runs/<str:run_id>/": Spec({"GET": api(200)}),
    "api/v1/runs/<str:run_id>/events/": Spec({"GET": api(200)}),
    # Minting a stream token reads the run and records nothing.
    "api/v1/runs/<str:run_id>/stream-token/": Spec({"POST": api(200)}, changes_a=False),
    "api/v1/runs/<str:run_id>/cancel/": Spec({"POST": api(200)}),
    "api/v1/runs/<str:run_id>/retry/": Spec({"POST": api(202)}, objects={"run_id": "failed_run"}),
    "api/v1/documents/": Spec(
        {"POST": api(201, outsider_key=201)},
        data={"POST": {"documents": [{"title": "note", "text": "planted text"}]}},
    ),
    "api/v1/approvals/": Spec({"GET": api(200, outsider_key=200)}),
    "api/v1/approvals/<str:approval_id>/": Spec({"GET": api(200)}),
    "api/v1/approvals/<str:approval_id>/decision/": Spec(
        {"POST": api(200)}, data={"POST": {"decision": "approve", "comment": "ok"}}
    ),
    # Managing keys and the webhook secret needs the `admin` scope.
    "api/v1/keys/": Spec(
        {"GET": api(200, 403, outsider_key=200), "POST": api(201, 403, outsider_key=201)},
        data={"POST": {"name": "planted"}},
    ),
    "api/v1/keys/<str:key_id>/": Spec({"DELETE": api(200, 403)}),
    "api/v1/webhook-secret/": Spec({"GET": api(200, 403, outsider_key=200)}),
    "api/v1/webhook-secret/rotate/": Spec({"POST": api(200, 403, outsider_key=200)}),
    # --- schedules and events (docs/schedules.md) ---
    "api/v1/schedules/": Spec(
        # The outsider names A's workflow: unknown in its own tenant.
        {"GET": api(200, outsider_key=200), "POST": api(201, outsider_key=404)},
        data={"POST": {"name": "planted", "workflow": "flaky", "cron": "0 4 * * *"}},
    ),
    "api/v1/schedules/<str:schedule_id>/": Spec(
        {"GET": api(200), "PATCH": api(200), "DELETE": api(204)},
        data={"PATCH": {"cron": "0 5 * * *"}},
    ),
    "api/v1/schedules/<str:schedule_id>/pause/": Spec({"POST": api(200)}),
    "api/v1/schedules/<str:schedule_id>/resume/": Spec(
        {"POST": api(200)},
        before=lambda world: schedule_pause(schedule=world.schedule, now=timezone.now()),
    ),
    "api/v1/schedules/<str:schedule_id>/trigger/": Spec({"POST": api(202)}),
    "api/v1/schedules/<str:schedule_id>/backfill/": Spec(
        {"POST": api(202)},
        data={"POST": {"start": "2026-01-01T00:00:00Z", "end": "2026-01-03T00:00:00Z"}},
    ),
    "api/v1/schedules/<str:schedule_id>/fires/": Spec({"GET": api(200)}),
    # An event starts only the sender's own workflows; A's `flaky` has no trigger.
    "api/v1/events/": Spec(
        {"GET": api(200, outsider_key=200), "POST": api(202, outsider_key=202)},
        data={"POST": {"name": "order.created", "data": {"total": 1}, "id": "evt-1"}},
    ),
    # Public: the API's description. A key that is presented is still checked.
    "api/schema/": Spec({"GET": everyone(200, revoked_key=401)}),
    "api/docs/": Spec({"GET": everyone(200, revoked_key=401)}),
    "healthz": Spec({"GET": everyone(200)}),
    # Prometheus' own bearer token (set by the test), which no role holds.
    "metrics": Spec({"GET": everyone(401)}),
    # --- sign-in ---
    "accounts/login/": Spec(
        # PUT is LoginView's alias of POST.
        {"GET": everyone(200), "POST": everyone(200), "PUT": everyone(200)},
        data={"POST": {"username": "olga", "password": "wrong"}, "PUT": {"username": "olga"}},
        changes_a=False,
    ),
    "accounts/logout/": Spec(
        {"GET": everyone(405), "POST": everyone(To("/accounts/login/"))}, changes_a=False
    ),
    # --- the reviewers' inbox (docs/approvals.md) ---
    "inbox/": Spec({"GET": members(200, 200, 200, 200)}),
    "inbox/history/": Spec({"GET": members(200, 200, 200, 200)}),
    "inbox/<str:approval_id>/": Spec(
        {
            "GET": members(200, 200, 404, 200),
            # Viewers and operators read but never decide; another tenant's reviewer: 404.
            "POST": members(403, To("/inbox/"), 404, 403),
        },
        data={"POST": REFUND_DECISION},
    ),
    # --- the operators' dashboard (docs/dashboard.md) ---
    "dashboard/": Spec({"GET": staff(200)}),
    "dashboard/workers/": Spec({"GET": staff(200)}),
    "dashboard/tenants/": Spec({"GET": staff(200)}),
    "dashboard/tenants/<slug:slug>/pause/": Spec(
        {"GET": staff(405), "POST": staff(To("/dashboard/tenants/"))}
    ),
    "dashboard/tenants/<slug:slug>/resume/": Spec(
        {"GET": staff(405), "POST": staff(To("/dashboard/tenants/"))},
        before=lambda world: tenant_pause(tenant=world.tenant_a),
    ),
    "dashboard/runs/": Spec({"GET": staff(200)}),
    "dashboard/runs/bulk/": Spec(
        {"GET": staff(200), "POST": staff(To("/dashboard/runs/"))},
        data={"GET": {"action": "cancel"}, "POST": {"action": "cancel"}},
    ),
    "dashboard/runs/<str:run_id>/": Spec({"GET": staff(200)}),
    "dashboard/runs/<str:run_id>/cancel/": Spec(
        {"GET": staff(405), "POST": staff(To("/dashboard/runs/"))}
    ),
    "dashboard/runs/<str:run_id>/retry/": Spec(
        {"GET": staff(405), "POST": staff(To("/dashboard/runs/"))},
        objects={"run_id": "failed_run"},
    ),
    "dashboard/runs/<str:run_id>/rerun/": Spec(
        {"GET": staff(405), "POST": staff(To("/dashboard/runs/"))},
        objects={"run_id": "failed_run"},
        data={"POST": {"step": "second"}},
    ),
    "dashboard/failures/": Spec({"GET": staff(200)}),
    "dashboard/schedules/": Spec({"GET": staff(200)}),
    "dashboard/schedules/<str:schedule_id>/pause/": Spec(
        {"GET": staff(405), "POST": staff(To("/dashboard/schedules/"))}
    ),
    "dashboard/schedules/<str:schedule_id>/resume/": Spec(
        {"GET": staff(405), "POST": staff(To("/dashboard/schedules/"))},
        before=lambda world: schedule_pause(schedule=world.schedule, now=timezone.now()),
    ),
    "dashboard/schedules/<str:schedule_id>/trigger/": Spec(
        {"GET": staff(405), "POST": staff(To("/dashboard/schedules/"))}
    ),
    "dashboard/events/": Spec({"GET": staff(200)}),
}

# WebSocket routes: "frame" = accepted and streaming (the first frame arrives), or the close
# code the socket ends with. API keys go in the subprotocol; sessions in the cookie.
FRAME = "frame"
WS_API = {
    "anonymous": 4401,
    "admin_key": FRAME,
    "plain_key": FRAME,
    "outsider_key": 4404,
    "revoked_key": 4401,
    **{role: 4401 for role in SESSION_ROLES},
}
WS_STAFF = {
    "anonymous": 4401,
    **{role: 4401 for role in KEY_ROLES},
    "viewer": 4403,
    "reviewer": 4403,
    "foreign_reviewer": 4403,
    "operator": FRAME,
}
WS_MEMBERS = {
    "anonymous": 4401,
    **{role: 4401 for role in KEY_ROLES},
    **{role: FRAME for role in SESSION_ROLES},
}
WEBSOCKET: dict[str, dict[str, Any]] = {
    "ws/runs/<str:run_id>/": WS_API,
    "ws/inbox/": WS_MEMBERS,
    "ws/dashboard/": WS_STAFF,
    "ws/dashboard/runs/<str:run_id>/": WS_STAFF,
}

NO_EXPECTATION = "new route {} has no isolation expectation (add it to {} in {})"


def expectation_for(route: Route, table: dict[str, Any]) -> Any:
    """The route's row of `table`; a route without one fails the test that asked."""
    if route.pattern not in table:
        name = "HTTP" if table is HTTP else "WEBSOCKET"
        pytest.fail(NO_EXPECTATION.format(route.pattern, name, __name__))
    return table[route.pattern]


# --- the world as the routes see it -------------------------------------------------------------


def _values(world, spec: Spec, route: Route) -> dict[str, str]:
    objects = {
        "waiting_run": str(world.waiting_run.public_id),
        "failed_run": str(world.failed_run.public_id),
        "approval": str(world.approval.public_id),
        "plain_key": str(world.plain_key.public_id),
        "workflow": "refund",
        "tenant_a": world.tenant_a.slug,
        "schedule": str(world.schedule.public_id),
    }
    values = {}
    for name in route.parameters:
        source = spec.objects.get(name) or PARAMETERS.get(name)
        assert source, f"route {route.pattern}: no object of tenant A for parameter '{name}'"
        values[name] = objects[source]
    return values


def fingerprint(tenant: Tenant) -> dict[str, Any]:
    """Everything about tenant A that another tenant must never be able to change."""
    tenant.refresh_from_db()
    return {
        "tenant": (tenant.is_active, tenant.webhook_secret_encrypted, tenant.name),
        "runs": sorted(Run.objects.filter(tenant=tenant).values_list("public_id", "status")),
        "steps": sorted(
            StepRun.objects.filter(tenant=tenant).values_list("id", "status", "attempt")
        ),
        "approvals": sorted(
            Approval.objects.filter(tenant=tenant).values_list("public_id", "status")
        ),
        "votes": Approval.objects.filter(tenant=tenant, votes__isnull=False).count(),
        "keys": sorted(ApiKey.objects.filter(tenant=tenant).values_list("prefix", "revoked_at")),
        "versions": WorkflowVersion.objects.filter(workflow__tenant=tenant).count(),
        "documents": Document.objects.filter(tenant=tenant).count(),
        "schedules": sorted(
            Schedule.objects.filter(tenant=tenant).values_list(
                "public_id", "name", "cron", "paused"
            )
        ),
        "fires": ScheduleFire.objects.filter(tenant=tenant).count(),
        "events": TriggerEvent.objects.filter(tenant=tenant).count(),
    }


def _request(world, role: str, method: str, route: Route, spec: Spec, path: str):
    client = world.client(role)
    data = spec.data.get(method)
    if method == "GET":
        return client.get(path, data or {})
    if route.pattern.startswith("api/"):
        body = json.dumps(data) if data is not None else ""
        return client.generic(method, path, body, content_type="application/json")
    return client.generic(
        method,
        path,
        _form(data or {}),
        content_type="application/x-www-form-urlencoded",
    )


def _form(data: dict[str, str]) -> str:
    return urlencode(data)


def _matches(response, expected: Expected) -> bool:
    if isinstance(expected, To):
        location = response.get("Location", "")
        return response.status_code == 302 and location.startswith(expected.prefix)
    return response.status_code == expected


def _shown(response) -> str:
    if getattr(response, "streaming", False):
        return ""
    return response.content.decode(errors="replace")


def _succeeds(expected: Expected) -> bool:
    if isinstance(expected, To):
        return expected not in (LOGIN, ADMIN_LOGIN)
    return 200 <= expected < 300


# --- HTTP ---------------------------------------------------------------------------------------

ROUTES = http_routes()
APP_ROUTES = [route for route in ROUTES if not route.is_admin]
ADMIN_ROUTES = [route for route in ROUTES if route.is_admin]


def test_the_routing_tables_are_found():
    patterns = {route.pattern for route in ROUTES}
    assert "api/v1/runs/<str:run_id>/cancel/" in patterns
    assert "inbox/<str:approval_id>/" in patterns
    assert "dashboard/runs/<str:run_id>/rerun/" in patterns
    assert len(ADMIN_ROUTES) > 50
    assert {route.pattern for route in websocket_routes()} >= {"ws/runs/<str:run_id>/"}


def test_a_route_without_an_expectation_fails_with_its_name():
    new = Route("api/v1/runs/<str:run_id>/pause/", "api:run-pause", lambda request: None)
    with pytest.raises(pytest.fail.Exception, match=r"new route api/v1/runs/<str:run_id>/pause/"):
        expectation_for(new, HTTP)
    with pytest.raises(pytest.fail.Exception, match="has no isolation expectation"):
        expectation_for(Route("ws/tenants/", "", lambda scope: None), WEBSOCKET)


def test_every_expectation_names_a_route_that_exists():
    stale = set(HTTP) - {route.pattern for route in APP_ROUTES}
    stale |= set(WEBSOCKET) - {route.pattern for route in websocket_routes()}
    assert not stale, f"expectations for routes that no longer exist: {sorted(stale)}"


@pytest.mark.parametrize("route", APP_ROUTES, ids=lambda route: route.pattern or "/")
def test_each_role_gets_exactly_its_status_on_every_route(route, world, settings):
    settings.SWITCHYARD_METRICS_TOKEN = "metrics-token-no-role-holds"
    spec = expectation_for(route, HTTP)
    implemented = route.implemented_methods()
    if implemented is not None:
        missing = implemented - set(spec.methods)
        assert not missing, f"{route.pattern}: methods without expectations: {missing}"
    values = _values(world, spec, route)
    path = route.path(values)
    wrong = []
    for method, expectations in spec.methods.items():
        assert set(expectations) == set(ROLES), f"{route.pattern} {method}: roles missing"
        for role in ROLES:
            expected = expectations[role]
            with transaction.atomic():
                if spec.before is not None:
                    spec.before(world)
                before = fingerprint(world.tenant_a)
                response = _request(world, role, method, route, spec, path)
                after = fingerprint(world.tenant_a)
                transaction.set_rollback(True)
            where = f"{method} /{route.pattern} as {role}"
            if not _matches(response, expected):
                wrong.append(
                    f"{where}: got {response.status_code} {response.get('Location', '')} "
                    f"expected {expected!r}: {_shown(response)[:200]}"
                )
                continue
            if role not in A_ROLES:
                if after != before:
                    wrong.append(f"{where}: changed tenant A: {_diff(before, after)}")
                shown = _shown(response)
                leaked = [s for s in world.secrets_of_a if s in shown and s not in path]
                if leaked:
                    wrong.append(f"{where}: shows tenant A's {leaked}")
            elif method == "GET" and after != before:
                wrong.append(f"{where}: a read changed tenant A: {_diff(before, after)}")
            elif method != "GET" and spec.changes_a and _succeeds(expected) and after == before:
                wrong.append(f"{where}: answered {expected!r} but changed nothing")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("route", APP_ROUTES, ids=lambda route: route.pattern or "/")
def test_a_stream_token_is_no_credential_on_any_route(route, world, settings):
    """A stream token of A's run gets what a dead credential gets on every route: in the URL
    what anonymous gets, as a Bearer key what a revoked key gets; and it changes nothing. (Its
    one use, the run's SSE stream, is tested below.)"""
    settings.SWITCHYARD_METRICS_TOKEN = "metrics-token-no-role-holds"
    spec = expectation_for(route, HTTP)
    path = route.path(_values(world, spec, route))
    token = world.stream_token(world.waiting_run)
    wrong = []
    for method, expectations in spec.methods.items():
        for client, url, expected in (
            (Client(HTTP_AUTHORIZATION=f"Bearer {token}"), path, expectations["revoked_key"]),
            (Client(), f"{path}?{urlencode({'token': token})}", expectations["anonymous"]),
        ):
            with transaction.atomic():
                if spec.before is not None:
                    spec.before(world)
                before = fingerprint(world.tenant_a)
                if method == "GET":
                    response = client.get(url)
                else:
                    body = json.dumps(spec.data.get(method) or {})
                    response = client.generic(method, url, body, content_type="application/json")
                after = fingerprint(world.tenant_a)
                transaction.set_rollback(True)
            where = f"{method} {url[:60]} with a stream token"
            if not _matches(response, expected):
                wrong.append(f"{where}: got {response.status_code}, expected {expected!r}")
            if after != before:
                wrong.append(f"{where}: changed tenant A: {_diff(before, after)}")
    assert not wrong, "\n".join(wrong)


def _diff(before: dict, after: dict) -> list[str]:
    return [name for name in before if before[name] != after[name]]


# --- the Django admin: staff only -----------------------------------------------------------------


def _admin_path(route: Route) -> str:
    model_admin = getattr(route.callback, "model_admin", None)
    model = model_admin.model if model_admin is not None else Tenant
    instance = model.objects.order_by("pk").first()
    values = {
        "object_id": str(instance.pk) if instance is not None else "1",
        "id": str(get_user_model().objects.order_by("pk").first().pk),
        "content_type_id": str(ContentType.objects.get_for_model(Tenant).pk),
        "app_label": "tenants",
        "url": "nowhere/",
    }
    # Regular-expression routes (the app index, the catch-all) as `<name>` placeholders.
    pattern = re.sub(r"\(\?P<(\w+)>[^)]*\)", lambda match: f"<{match[1]}>", route.pattern)
    pattern = pattern.replace("^", "").replace("$", "")
    return Route(pattern, route.name, route.callback).path(values)


def test_every_admin_page_is_for_staff_only(world):
    """Every admin route (found by the walk), read by each role: anyone but staff is sent to
    the admin's sign-in (its own page excepted); staff are never sent there and never meet a
    server error; staff without permissions (our operator) read no model's rows; a superuser
    reads every page."""
    superuser = get_user_model().objects.create_superuser("root", password=None)
    clients = {role: world.client(role) for role in ROLES}
    root = world.client("anonymous")
    root.force_login(superuser)
    wrong = []
    for route in ADMIN_ROUTES:
        path = _admin_path(route)
        for role in ROLES:
            response = clients[role].get(path)
            if role != "operator":
                # The sign-in page itself; signing out (POST only) sends non-staff home.
                expected: Expected = {"admin:login": 200, "admin:logout": To("/admin/")}.get(
                    route.name, ADMIN_LOGIN
                )
                if not _matches(response, expected):
                    wrong.append(f"GET {path} as {role}: {response.status_code}, want {expected}")
            elif response.status_code >= 500 or _matches(response, ADMIN_LOGIN):
                wrong.append(f"GET {path} as operator: {response.status_code}")
            elif getattr(route.callback, "model_admin", None) and response.status_code == 200:
                wrong.append(f"GET {path} as operator (no permissions): 200")
        answer = root.get(path)
        if answer.status_code >= 500 or _matches(answer, ADMIN_LOGIN):
            wrong.append(f"GET {path} as superuser: {answer.status_code}")
    assert not wrong, "\n".join(wrong)


# --- streams and waits (async views, on threads of their own: a committed world) -----------------

STREAMS = [
    # (method, path template, query, headers): the long-lived forms of three API routes.
    ("GET", "/api/v1/runs/{run}/events/", {}, {"Accept": "text/event-stream"}),
    ("GET", "/api/v1/runs/{run}/", {"wait": "0"}, {}),
    ("POST", "/api/v1/runs/?wait=0", None, {}),
]


def test_streams_and_waits_answer_each_role_like_the_api(live_world):
    """SSE and `?wait=` take another path through the code (async views that authenticate
    for themselves): they must answer every role as the API routes do."""
    world = live_world
    run = world.failed_run  # a final run: its stream ends after the stored events
    expected = api(200)
    sessions = _sessions(world)
    wrong = []

    async def call(role: str, method: str, path: str, query, headers) -> tuple[int, bytes]:
        headers = dict(headers)
        if role in world.raw_keys:
            headers["Authorization"] = f"Bearer {world.raw_keys[role]}"
        # Per request: AsyncClient(headers=...) puts them in the scope, not its headers.
        client = AsyncClient()
        if role in sessions:
            client.cookies["sessionid"] = sessions[role]
        if method == "GET":
            response = await client.get(path, query, headers=headers)
        else:
            body = json.dumps({"workflow": "flaky", "input": {}})
            response = await client.post(
                path, body, content_type="application/json", headers=headers
            )
        first = b""
        if response.streaming:
            async for chunk in response.streaming_content:
                first += chunk
                if b"run.failed" in first:
                    break
        else:
            first = response.content
        return response.status_code, first

    for method, template, query, headers in STREAMS:
        path = template.format(run=run.public_id)
        for role in ROLES:
            want = expected[role]
            if method == "POST" and want == 200:
                want = 202
            if method == "POST" and role == "outsider_key":
                want = 404  # its tenant has no workflow 'flaky'
            status, body = async_to_sync(call)(role, method, path, query, headers)
            if status != want:
                wrong.append(f"{method} {path} {query or ''} as {role}: {status}, want {want}")
            if role == "admin_key" and "events" in path and status == 200:
                assert b"event: run.failed" in body, body[:300]
    assert not wrong, "\n".join(wrong)


def test_a_stream_token_opens_its_runs_stream_and_no_other(live_world):
    """Its run's SSE stream is the one HTTP place a stream token is accepted: another run of
    the same tenant is refused (403), and so is another tenant's run, either way round."""
    world = live_world
    token_a = world.stream_token(world.failed_run)
    token_b = world.stream_token(world.foreign_run)

    async def stream(run: Run, token: str) -> tuple[int, bytes]:
        response = await AsyncClient().get(
            f"/api/v1/runs/{run.public_id}/events/",
            {"token": token},
            headers={"Accept": "text/event-stream"},
        )
        if not response.streaming:
            return response.status_code, response.content
        first = b""
        async for chunk in response.streaming_content:
            first += chunk
            if b"run.failed" in first:
                break
        return response.status_code, first

    status, body = async_to_sync(stream)(world.failed_run, token_a)
    assert status == 200 and b"event: run.failed" in body, body[:300]
    for run, token in (
        (world.waiting_run, token_a),
        (world.foreign_run, token_a),
        (world.failed_run, token_b),
    ):
        status, body = async_to_sync(stream)(run, token)
        assert status == 403, (run, status, body)
        assert json.loads(body)["error"]["code"] == "forbidden"
        for secret in world.secrets_of_a:
            assert token is token_a or secret not in body.decode()


# --- WebSockets ----------------------------------------------------------------------------------


def _sessions(world) -> dict[str, str]:
    """The session cookie of each signed-in role."""
    return {role: world.client(role).cookies["sessionid"].value for role in world.users}


async def _socket(world, sessions, role: str, route: Route, path: str) -> Any:
    """FRAME if the socket streams to `role`, else the close code it ends with."""
    from orchestrator.asgi import application

    headers = []
    subprotocols = None
    if role in sessions:
        headers.append((b"cookie", f"sessionid={sessions[role]}".encode()))
    if role in world.raw_keys and route.pattern.startswith("ws/runs/"):
        subprotocols = ["switchyard.v1", f"switchyard.bearer.{world.raw_keys[role]}"]
    communicator = WebsocketCommunicator(
        application, path, headers=headers, subprotocols=subprotocols
    )
    connected, _ = await communicator.connect(timeout=10)
    assert connected
    if route.pattern.startswith("ws/runs/") and subprotocols is None:
        # No key to offer: what an unauthenticated client can send instead of one.
        await communicator.send_json_to({"after": 0})
    output = await communicator.receive_output(timeout=10)
    await communicator.disconnect()
    if output["type"] == "websocket.close":
        return output.get("code")
    assert output["type"] == "websocket.send", output
    return FRAME


def test_each_role_gets_exactly_its_answer_on_every_websocket_route(live_world):
    world = live_world
    sessions = _sessions(world)
    wrong = []
    for route in websocket_routes():
        expectations = expectation_for(route, WEBSOCKET)
        path = route.path(_values(world, Spec({}), route))
        for role in ROLES:
            got = async_to_sync(_socket)(world, sessions, role, route, path)
            if got != expectations[role]:
                wrong.append(f"WS /{route.pattern} as {role}: {got}, want {expectations[role]}")
    assert not wrong, "\n".join(wrong)


def test_a_stream_token_opens_its_runs_socket_and_no_other(live_world):
    """On WebSockets too, a stream token opens its own run's socket and nothing else."""
    world = live_world
    token = world.stream_token(world.failed_run)
    from orchestrator.asgi import application

    async def answer(path: str) -> Any:
        communicator = WebsocketCommunicator(application, f"{path}?token={token}")
        connected, _ = await communicator.connect(timeout=10)
        assert connected
        output = await communicator.receive_output(timeout=15)
        await communicator.disconnect()
        if output["type"] == "websocket.close":
            return output.get("code")
        return FRAME

    expectations = {
        f"/ws/runs/{world.failed_run.public_id}/": FRAME,
        f"/ws/runs/{world.waiting_run.public_id}/": 4403,
        f"/ws/runs/{world.foreign_run.public_id}/": 4403,
        # No session: the token is nothing to the operators' and reviewers' sockets.
        "/ws/inbox/": 4401,
        "/ws/dashboard/": 4401,
        f"/ws/dashboard/runs/{world.failed_run.public_id}/": 4401,
    }
    got = {path: async_to_sync(answer)(path) for path in expectations}
    assert got == expectations


def test_an_inbox_socket_hears_only_its_own_tenants_changes(live_world):
    """The inbox socket joins one group per tenant of the user: A's change reaches A's
    reviewer and never B's."""
    world = live_world
    sessions = _sessions(world)
    from orchestrator.asgi import application

    async def scenario() -> tuple[dict, bool]:
        sockets = {}
        for role in ("reviewer", "foreign_reviewer"):
            cookie = sessions[role]
            socket = WebsocketCommunicator(
                application, "/ws/inbox/", headers=[(b"cookie", f"sessionid={cookie}".encode())]
            )
            assert (await socket.connect(timeout=10))[0]
            assert (await socket.receive_json_from(timeout=10))["type"] == "hello"
            sockets[role] = socket
        change = {"type": "approval.decided", "approval": str(world.approval.public_id)}
        await get_channel_layer().group_send(
            inbox_group(world.tenant_a.public_id), {"type": "inbox.changed", "change": change}
        )
        heard = await sockets["reviewer"].receive_json_from(timeout=10)
        foreign_silent = await sockets["foreign_reviewer"].receive_nothing(timeout=1)
        for socket in sockets.values():
            await socket.disconnect()
        return heard, foreign_silent

    heard, foreign_silent = async_to_sync(scenario)()
    assert heard["approval"] == str(world.approval.public_id)
    assert foreign_silent, "another tenant's reviewer heard tenant A's inbox change"
