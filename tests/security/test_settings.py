"""CSRF on every form, and the production settings (DEBUG=false) that `check --deploy` wants.

The pages with forms are not listed by hand: every page of the isolation matrix that some role
may read is rendered as that role, and each `<form method="post">` on it must carry a CSRF
token; every page route that accepts a POST must refuse one without the token (403) when the
client enforces CSRF checks, as browsers' requests are checked.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.test import Client

from tests.security.test_isolation_matrix import APP_ROUTES, HTTP, To, _values

ROOT = Path(__file__).resolve().parents[2]


class _Forms(HTMLParser):
    """The POST forms of a page, each with the names of its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict] = []
        self.csrf_meta: str | None = None
        self._open: dict | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "form" and (attrs.get("method") or "get").lower() == "post":
            self._open = {"action": attrs.get("action"), "inputs": {}}
            self.forms.append(self._open)
        elif tag == "input" and self._open is not None:
            self._open["inputs"][attrs.get("name")] = attrs.get("value")
        elif tag == "meta" and attrs.get("name") == "csrf-token":
            self.csrf_meta = attrs.get("content")

    def handle_endtag(self, tag):
        if tag == "form":
            self._open = None


def _forms(html: str) -> _Forms:
    parser = _Forms()
    parser.feed(html)
    return parser


def _readable_pages(world):
    """(route, role, path) for every non-API page some role reads with a 200."""
    for route in APP_ROUTES:
        if route.pattern.startswith("api/"):
            continue
        spec = HTTP[route.pattern]
        readers = [role for role, want in spec.methods.get("GET", {}).items() if want == 200]
        for role in readers[:1] + [r for r in ("reviewer", "operator") if r in readers[1:]]:
            yield route, role, route.path(_values(world, spec, route))


def test_every_form_on_every_page_carries_a_csrf_token(world):
    pages_with_forms = set()
    for route, role, path in _readable_pages(world):
        response = world.client(role).get(path, HTTP[route.pattern].data.get("GET") or {})
        assert response.status_code == 200, (path, role)
        page = _forms(response.content.decode())
        for form in page.forms:
            token = form["inputs"].get("csrfmiddlewaretoken")
            assert token, f"{path} as {role}: a POST form to {form['action']} has no CSRF token"
            pages_with_forms.add(route.pattern)
        if page.csrf_meta is not None:
            assert len(page.csrf_meta) >= 32, f"{path}: empty csrf-token meta"
    admin_login = _forms(Client().get("/admin/login/").content.decode())
    assert admin_login.forms and admin_login.forms[0]["inputs"].get("csrfmiddlewaretoken")
    # The forms the product has: sign-in, decisions, operators' actions, signing out.
    assert {
        "accounts/login/",
        "inbox/<str:approval_id>/",
        "dashboard/tenants/",
        "dashboard/runs/<str:run_id>/",
        "dashboard/runs/bulk/",
    } <= pages_with_forms


def _post_routes():
    for route in APP_ROUTES:
        spec = HTTP[route.pattern]
        if route.pattern.startswith("api/") or "POST" not in spec.methods:
            continue
        allowed = [
            role
            for role, want in spec.methods["POST"].items()
            if want not in (403, 404, 405) and not (isinstance(want, To) and "login" in want.prefix)
        ]
        yield route, spec, allowed


def test_a_post_without_the_csrf_token_is_refused_on_every_page(world):
    refused = []
    for route, spec, allowed in _post_routes():
        path = route.path(_values(world, spec, route))
        for role in allowed or ["anonymous"]:
            client = world.client(role, enforce_csrf_checks=True)
            response = client.post(path, spec.data.get("POST") or {})
            if response.status_code != 403:
                refused.append(f"POST {path} as {role} without a token: {response.status_code}")
    admin = Client(enforce_csrf_checks=True).post("/admin/login/", {"username": "x"})
    if admin.status_code != 403:
        refused.append(f"POST /admin/login/ without a token: {admin.status_code}")
    assert not refused, "\n".join(refused)


def test_the_same_post_with_the_token_gets_through(world):
    """The refusal above is CSRF's, not the page's: with the token from the form, it passes."""
    client = world.client("reviewer", enforce_csrf_checks=True)
    path = f"/inbox/{world.approval.public_id}/"
    token = _forms(client.get(path).content.decode()).forms[0]["inputs"]["csrfmiddlewaretoken"]
    form = dict(HTTP["inbox/<str:approval_id>/"].data["POST"], csrfmiddlewaretoken=token)
    response = client.post(path, form)
    assert response.status_code == 302 and response["Location"] == "/inbox/"
    world.approval.refresh_from_db()
    assert world.approval.status == "approved"


# --- production settings ------------------------------------------------------------------------

PRODUCTION = {
    "DEBUG": False,
    "SECURE_SSL_REDIRECT": True,
    "SECURE_PROXY_SSL_HEADER": ["HTTP_X_FORWARDED_PROTO", "https"],
    "SECURE_HSTS_SECONDS": 31_536_000,
    "SECURE_HSTS_INCLUDE_SUBDOMAINS": True,
    "SECURE_HSTS_PRELOAD": True,
    "SECURE_CONTENT_TYPE_NOSNIFF": True,
    "SESSION_COOKIE_SECURE": True,
    "SESSION_COOKIE_HTTPONLY": True,
    "CSRF_COOKIE_SECURE": True,
    "X_FRAME_OPTIONS": "DENY",
}
_OVERRIDABLE = [name for name in PRODUCTION if name != "DEBUG"] + [
    "SECRET_KEY",
    "ALLOWED_HOSTS",
    "SWITCHYARD_LLM_DEFAULT_PROVIDER",
    "SWITCHYARD_OPENAI_API_KEY",
]
# What a deployment sets besides DEBUG=false (docs/security.md, "Production settings").
_DEPLOYMENT = {"SWITCHYARD_LLM_DEFAULT_PROVIDER": "openai", "SWITCHYARD_OPENAI_API_KEY": "sk-x"}


def _environment(**values: str) -> dict[str, str]:
    """This process's environment without any of the settings under test, plus `values`."""
    env = {k: v for k, v in os.environ.items() if k not in _OVERRIDABLE and k != "DEBUG"}
    return {**env, "DJANGO_SETTINGS_MODULE": "orchestrator.settings", **values}


def _clean_environment(**values: str) -> dict[str, str]:
    """Nothing but the path to programs and the settings module, plus `values`."""
    return {
        "PATH": os.environ["PATH"],
        "DJANGO_SETTINGS_MODULE": "orchestrator.settings",
        **values,
    }


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def _settings_in(env: dict[str, str], names=tuple(PRODUCTION)) -> dict:
    code = (
        "import json, django; django.setup(); from django.conf import settings as s; "
        f"print(json.dumps({{n: getattr(s, n) for n in {list(names)!r}}}))"
    )
    result = _run([sys.executable, "-c", code], env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_debug_is_off_when_the_variable_is_unset():
    found = _settings_in(_clean_environment(SECRET_KEY=secrets.token_urlsafe(50)), ["DEBUG"])
    assert found == {"DEBUG": False}


def test_without_debug_and_secret_key_a_process_refuses_to_start():
    setup = _run([sys.executable, "-c", "import django; django.setup()"], _clean_environment())
    assert setup.returncode != 0
    assert "SECRET_KEY is not set" in setup.stderr
    check = _run(
        [sys.executable, "manage.py", "check"], _clean_environment(DEBUG="", SECRET_KEY="")
    )
    assert check.returncode != 0
    assert check.stderr.startswith("error: SECRET_KEY is not set")
    assert "Traceback" not in check.stderr


def test_debug_true_without_secret_key_runs_on_the_public_development_key():
    found = _settings_in(_clean_environment(DEBUG="true"), ["SECRET_KEY", "DEVELOPMENT_SECRET_KEY"])
    assert found["SECRET_KEY"] == found["DEVELOPMENT_SECRET_KEY"]
    assert found["SECRET_KEY"].startswith("dev-only-insecure-")


def test_the_default_allowed_hosts_are_local_and_leave_out_the_test_client():
    found = _settings_in(_clean_environment(DEBUG="true"), ["ALLOWED_HOSTS"])
    assert found == {"ALLOWED_HOSTS": ["127.0.0.1", "localhost"]}


def test_debug_false_turns_every_production_setting_on():
    assert _settings_in(_environment(DEBUG="false", SECRET_KEY=secrets.token_urlsafe(50))) == (
        PRODUCTION
    )


def test_plain_http_with_debug_false_is_one_variable_away():
    """What the tests' and the benchmark's web processes run with (tests/support/cluster.py)."""
    found = _settings_in(
        _environment(
            DEBUG="false", SECURE_SSL_REDIRECT="false", SECRET_KEY=secrets.token_urlsafe(50)
        )
    )
    assert found == {**PRODUCTION, "SECURE_SSL_REDIRECT": False}


def test_debug_true_keeps_local_http_working():
    found = _settings_in(_environment(DEBUG="true"))
    assert found["SECURE_SSL_REDIRECT"] is False and found["SESSION_COOKIE_SECURE"] is False
    assert found["SECURE_HSTS_SECONDS"] == 0
    assert found["SESSION_COOKIE_HTTPONLY"] is True and found["X_FRAME_OPTIONS"] == "DENY"


def _check_deploy(env: dict[str, str]) -> subprocess.CompletedProcess:
    return _run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"], env)


def test_check_deploy_is_clean_for_the_production_settings():
    result = _check_deploy(
        _environment(DEBUG="false", SECRET_KEY=secrets.token_urlsafe(50), **_DEPLOYMENT)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_check_deploy_fails_while_llm_steps_have_no_provider():
    """With DEBUG off nothing is simulated unless asked for: llm steps that name no provider
    would fail, and the deploy check says so before they do."""
    result = _check_deploy(_environment(DEBUG="false", SECRET_KEY=secrets.token_urlsafe(50)))
    assert result.returncode != 0
    assert "switchyard.E002" in result.stderr
    assert "SWITCHYARD_LLM_DEFAULT_PROVIDER is not set" in result.stderr


@pytest.mark.parametrize(
    ("provider", "api_key", "found"),
    [
        ("", "", ["switchyard.E002"]),
        ("telepathy", "", ["switchyard.E002"]),
        ("openai", "", ["switchyard.E003"]),
        ("openai", "sk-x", []),
        ("simulated", "", []),  # asked for by name: the benchmark's deployment
    ],
)
def test_the_llm_provider_check_passes_once_a_provider_is_configured(
    settings, provider, api_key, found
):
    from orchestrator.checks import check_llm_steps_have_a_provider

    settings.DEBUG = False
    settings.SWITCHYARD_LLM_DEFAULT_PROVIDER = provider
    settings.SWITCHYARD_OPENAI_API_KEY = api_key
    assert [error.id for error in check_llm_steps_have_a_provider(None)] == found


def test_development_simulates_llm_steps_without_configuration():
    found = _settings_in(_clean_environment(DEBUG="true"), ["SWITCHYARD_LLM_DEFAULT_PROVIDER"])
    assert found == {"SWITCHYARD_LLM_DEFAULT_PROVIDER": "simulated"}


def test_check_deploy_refuses_the_public_development_secret_key():
    result = _check_deploy(
        _environment(
            DEBUG="false", SECRET_KEY=django_settings.DEVELOPMENT_SECRET_KEY, **_DEPLOYMENT
        )
    )
    assert result.returncode != 0
    assert "switchyard.W001" in result.stdout + result.stderr


# --- what the settings do to requests -----------------------------------------------------------


@pytest.fixture
def production(settings):
    for name, value in PRODUCTION.items():
        if name != "DEBUG":
            setattr(settings, name, tuple(value) if isinstance(value, list) else value)
    return settings


def test_plain_http_is_redirected_to_https_except_health_probes(production, db):
    client = Client()
    response = client.get("/inbox/")
    assert response.status_code == 301 and response["Location"] == "https://testserver/inbox/"
    assert client.get("/healthz").status_code == 200
    behind_proxy = client.get("/api/schema/", headers={"X-Forwarded-Proto": "https"})
    assert behind_proxy.status_code == 200
    assert behind_proxy["Strict-Transport-Security"] == (
        "max-age=31536000; includeSubDomains; preload"
    )
    assert behind_proxy["X-Frame-Options"] == "DENY"
    assert behind_proxy["X-Content-Type-Options"] == "nosniff"


def test_session_and_csrf_cookies_are_secure_and_the_session_is_http_only(production, world):
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.create_user("sam", password="a long enough password 1")
    client = Client()
    page = client.get("/accounts/login/", secure=True)
    token = _forms(page.content.decode()).forms[0]["inputs"]["csrfmiddlewaretoken"]
    assert page.cookies["csrftoken"]["secure"] is True
    signed_in = client.post(
        "/accounts/login/",
        {"username": user.username, "password": "a long enough password 1"},
        secure=True,
        headers={"X-Forwarded-Proto": "https"},
        HTTP_X_CSRFTOKEN=token,
    )
    assert signed_in.status_code == 302
    session = signed_in.cookies["sessionid"]
    assert session["secure"] is True and session["httponly"] is True
    assert session["samesite"] == "Lax"
    assert re.fullmatch(r"[a-z0-9]{32}", session.value)
    assert django_settings.SESSION_COOKIE_SECURE is True
