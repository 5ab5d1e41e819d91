"""A tenant's allowed origins (tenants/origins.py): only origins exactly as browsers send them
are accepted, in the admin as anywhere else, since the CORS answers and the WebSocket origin
check compare the list with the `Origin` header character for character."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError

from tenants.models import Tenant
from tenants.origins import validate_allowed_origins
from tenants.services import tenant_create

GOOD = [
    "https://app.example.com",
    "http://localhost:3000",
    "https://[::1]:8443",
    "http://127.0.0.1:8000",
]
BAD = {
    "https://app.example.com/": "no path",
    "https://app.example.com/app": "no path",
    "https://*.example.com": "wildcards",
    "*": "wildcards",
    "app.example.com": "http:// or https://",
    "ftp://files.example.com": "http:// or https://",
    "https://App.Example.com": "https://app.example.com",
    "https://app.example.com:443": "https://app.example.com",
    "https://user@app.example.com": "no user",
    "https://app.example.com?x=1": "no path, query",
    "https://app.example.com:99999": "not an origin",
}


def test_origins_as_browsers_send_them_are_valid():
    validate_allowed_origins(GOOD)
    validate_allowed_origins([])


@pytest.mark.parametrize("origin", sorted(BAD))
def test_anything_else_is_refused_saying_why(origin):
    with pytest.raises(ValidationError) as refused:
        validate_allowed_origins([origin])
    assert BAD[origin] in " ".join(refused.value.messages)


def test_a_list_is_required_and_each_origin_once():
    with pytest.raises(ValidationError):
        validate_allowed_origins("https://app.example.com")
    with pytest.raises(ValidationError, match="more than once"):
        validate_allowed_origins(["https://app.example.com", "https://app.example.com"])


class _Form(HTMLParser):
    """The fields of the admin's change form, as a browser would submit them."""

    def __init__(self) -> None:
        super().__init__()
        self.data: dict[str, str] = {}
        self._textarea: str | None = None
        self._select: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        name = attrs.get("name")
        if tag == "input" and name and attrs.get("type") not in ("submit", "button"):
            if attrs.get("type") == "checkbox":
                if "checked" in attrs:
                    self.data[name] = "on"
            else:
                self.data[name] = attrs.get("value") or ""
        elif tag == "textarea" and name:
            self._textarea = name
            self.data[name] = ""
        elif tag == "select" and name:
            self._select = name
        elif tag == "option" and self._select and "selected" in attrs:
            self.data[self._select] = attrs.get("value") or ""

    def handle_endtag(self, tag):
        if tag == "textarea":
            self._textarea = None
        elif tag == "select":
            self._select = None

    def handle_data(self, data):
        if self._textarea:
            self.data[self._textarea] += data.lstrip("\n")


def _change(client, tenant: Tenant, origins_text: str):
    url = f"/admin/tenants/tenant/{tenant.pk}/change/"
    page = client.get(url)
    assert page.status_code == 200
    form = _Form()
    form.feed(page.content.decode())
    form.data["allowed_origins"] = origins_text
    return client.post(url, form.data)


def test_the_admin_takes_one_origin_per_line_and_refuses_a_bad_one(client, db):
    tenant, _ = tenant_create(slug="acme", name="Acme")
    operator = get_user_model().objects.create_superuser("root", password=None)
    client.force_login(operator)

    saved = _change(client, tenant, "https://app.example.com\r\n\r\nhttp://localhost:3000\r\n")
    assert saved.status_code == 302, saved.content.decode()[:2000]
    tenant.refresh_from_db()
    assert tenant.allowed_origins == ["https://app.example.com", "http://localhost:3000"]
    page = client.get(f"/admin/tenants/tenant/{tenant.pk}/change/").content.decode()
    assert "https://app.example.com\nhttp://localhost:3000</textarea>" in page

    refused = _change(client, tenant, "https://app.example.com/dashboard\nhttps://*.example.com")
    assert refused.status_code == 200
    shown = refused.content.decode()
    assert "https://app.example.com/dashboard: an origin has no path" in shown
    assert "https://*.example.com: wildcards are not allowed" in shown
    tenant.refresh_from_db()
    assert tenant.allowed_origins == ["https://app.example.com", "http://localhost:3000"]
