"""The outbound URL guard: only public http(s) addresses, unless a setting allows private ones.

No network: every host here is a literal address or `localhost`, or name resolution is faked.
"""

from __future__ import annotations

import socket

import pytest

from jobs.steps import netguard
from jobs.steps.registry import StepFailure

REFUSED = [
    ("http://127.0.0.1:8000/", "127.0.0.1 is a loopback address"),
    ("http://localhost/admin/", "localhost resolves to 127.0.0.1, a loopback address"),
    ("http://[::1]/", "::1 is a loopback address"),
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
    ("http://10.0.0.1/", "10.0.0.1 is a private address"),
    ("http://192.168.1.10/", "192.168.1.10 is a private address"),
    ("http://[::ffff:127.0.0.1]/", "::ffff:127.0.0.1 is a loopback address"),
    ("http://[::ffff:a9fe:a9fe]/", "::ffff:169.254.169.254 is a link-local address"),
    ("http://0.0.0.0/", "0.0.0.0 is an unspecified address"),
    ("http://[fe80::1]/", "fe80::1 is a link-local address"),
    ("http://[fd00::1]/", "fd00::1 is a private address"),
    ("http://[2002:7f00:1::]/", "2002:7f00:1:: is a 6to4 address of a loopback address"),
    ("http://224.0.0.1/", "224.0.0.1 is a multicast address"),
    ("http://240.0.0.1/", "240.0.0.1 is a reserved address"),
    ("http://100.64.0.1/", "100.64.0.1 is not a public address"),
    # The C resolver reads a bare integer as an IPv4 address: 2130706433 is 127.0.0.1.
    ("http://2130706433/", "2130706433 resolves to 127.0.0.1, a loopback address"),
]


@pytest.fixture
def private_urls_refused(settings):
    # Explicit, so that a developer's environment allowing private URLs cannot hide a failure.
    settings.SWITCHYARD_ALLOW_PRIVATE_URLS = False


@pytest.mark.parametrize(("url", "reason"), REFUSED)
def test_non_public_addresses_are_refused(private_urls_refused, url, reason):
    with pytest.raises(StepFailure) as failure:
        netguard.check_public_url(url)

    assert failure.value.code == "forbidden_address"
    assert failure.value.retryable is False
    assert reason in failure.value.message
    assert netguard.is_public_url(url)[0] is False


@pytest.mark.parametrize("url", ["http://8.8.8.8/", "https://[2001:4860:4860::8888]:8443/x"])
def test_public_addresses_pass(private_urls_refused, url):
    netguard.check_public_url(url)

    assert netguard.is_public_url(url) == (True, "")


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://8.8.8.8/",
        "gopher://8.8.8.8/",
        "8.8.8.8",
        "http:///x",
        "http://8.8.8.8:99999/",
    ],
)
def test_other_schemes_and_hostless_urls_are_refused_even_when_private_urls_are_allowed(
    settings, url
):
    settings.SWITCHYARD_ALLOW_PRIVATE_URLS = True

    with pytest.raises(StepFailure) as failure:
        netguard.check_public_url(url)

    assert failure.value.code == "forbidden_address"


def test_a_host_name_that_cannot_be_encoded_is_refused(private_urls_refused):
    with pytest.raises(StepFailure) as failure:
        netguard.check_public_url(f"http://{'a' * 64}.example/")  # labels stop at 63

    assert failure.value.code == "forbidden_address"
    assert "invalid host name" in failure.value.message


def test_the_setting_allows_private_addresses(settings):
    settings.SWITCHYARD_ALLOW_PRIVATE_URLS = True

    netguard.check_public_url("http://127.0.0.1:8000/")
    netguard.check_public_url("http://169.254.169.254/")


def test_is_public_url_ignores_the_setting(settings):
    settings.SWITCHYARD_ALLOW_PRIVATE_URLS = True

    assert netguard.is_public_url("http://10.0.0.1/") == (False, "10.0.0.1 is a private address")


def fake_resolver(*addresses: str):
    def getaddrinfo(host, port, *args, **kwargs):
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in addresses
        ]

    return getaddrinfo


def test_a_host_with_any_private_address_is_refused(private_urls_refused, monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", fake_resolver("93.184.216.34", "10.1.2.3"))

    with pytest.raises(StepFailure) as failure:
        netguard.check_public_url("https://api.example.com/v1")

    assert failure.value.message == (
        "refusing https://api.example.com/v1: api.example.com resolves to 10.1.2.3, a private"
        " address"
    )


def test_a_scoped_link_local_answer_is_refused(private_urls_refused, monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", fake_resolver("fe80::1%eth0"))

    assert netguard.is_public_url("http://router.example/") == (
        False,
        "router.example resolves to fe80::1, a link-local address",
    )


def test_an_unresolvable_host_is_a_retryable_error_not_a_refusal(private_urls_refused, monkeypatch):
    def getaddrinfo(*args, **kwargs):
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)

    with pytest.raises(StepFailure) as failure:
        netguard.check_public_url("https://api.example.com/")

    assert failure.value.code == "http_error"
    assert failure.value.retryable is True
    assert netguard.is_public_url("https://api.example.com/")[0] is False


def test_check_outbound_url_raises_a_plain_value_error_for_other_callers(private_urls_refused):
    with pytest.raises(ValueError, match=r"169\.254\.169\.254 is a link-local address"):
        netguard.check_outbound_url("http://169.254.169.254/")
    assert issubclass(netguard.ForbiddenURL, ValueError)


def _local_server():
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.server.hits += 1
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.hits = 0
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    return httpd


def test_the_guarded_client_refuses_a_connection_to_a_rebound_address(settings, monkeypatch):
    """What webhooks and the http tool connect with: the address is checked when connecting,
    so a name that passed the earlier check and now resolves to loopback is refused."""
    settings.SWITCHYARD_ALLOW_PRIVATE_URLS = False
    httpd = _local_server()
    port = httpd.server_address[1]
    monkeypatch.setattr(
        socket,
        "getaddrinfo",
        lambda host, p, *a, **k: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", p))],
    )
    try:
        with (
            pytest.raises(netguard.ForbiddenURL, match=r"127\.0\.0\.1 is a loopback address"),
            netguard.guarded_client(timeout=2) as client,
        ):
            client.post(f"http://hooks.example:{port}/in")
        assert httpd.hits == 0

        settings.SWITCHYARD_ALLOW_PRIVATE_URLS = True  # local development: allowed
        with netguard.guarded_client(timeout=2) as client:
            assert client.post(f"http://hooks.example:{port}/in").status_code == 204
        assert httpd.hits == 1
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://hooks.example.com/in", "https://hooks.example.com/in"),
        ("https://hooks.example.com:8443/in?token=s3cret", "https://hooks.example.com:8443/in?***"),
        ("https://user:pa55@hooks.example.com/in", "https://***@hooks.example.com/in"),
        ("https://user@hooks.example.com/in?a=1&b=2#frag", "https://***@hooks.example.com/in?***"),
        ("https://a@b@hooks.example.com/", "https://***@hooks.example.com/"),
        ("https://hooks.example.com/in#access_token=s3cret", "https://hooks.example.com/in"),
        ("https://[::1/in?token=s3cret", "<unparsable URL>"),
    ],
)
def test_redact_url_hides_userinfo_query_and_fragment(url, shown):
    assert netguard.redact_url(url) == shown


def test_a_refusal_names_the_url_without_its_credentials(private_urls_refused):
    with pytest.raises(netguard.ForbiddenURL) as refused:
        netguard.check_outbound_url("http://admin:pa55@127.0.0.1:8080/hook?token=s3cret")
    assert str(refused.value).startswith("refusing http://***@127.0.0.1:8080/hook?***: ")
    assert "pa55" not in str(refused.value) and "s3cret" not in str(refused.value)
