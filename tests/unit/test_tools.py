"""The `tool` step kind and the built-in tools `echo` and `http`.

The `http` tests talk to a real HTTP server on 127.0.0.1, which the guard refuses unless
`SWITCHYARD_ALLOW_PRIVATE_URLS` is on.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.utils import timezone

from jobs.steps import registry, tools
from jobs.steps.registry import StepContext, StepFailure


def make_ctx(step_input: dict, *, seconds: float = 5) -> StepContext:
    return StepContext(
        run_id="run-1",
        tenant_id=1,
        step_id="call",
        map_index=None,
        kind="tool",
        attempt=1,
        input=step_input,
        idempotency_key="run-1:call",
        deadline=timezone.now() + timedelta(seconds=seconds),
    )


def run_tool(name: str, seconds: float = 5, **args):
    return tools.handle(make_ctx({"tool": name, "args": args}, seconds=seconds))


# --- dispatch -------------------------------------------------------------------------------


def test_an_unknown_tool_fails_without_retrying():
    with pytest.raises(StepFailure) as failure:
        run_tool("crm.lookup", email="a@example.com")

    assert failure.value.code == "unknown_tool"
    assert failure.value.retryable is False
    assert "crm.lookup" in failure.value.message


@pytest.fixture
def scratch_tools(monkeypatch):
    """Tools registered in a test disappear after it."""
    monkeypatch.setattr(registry, "_tools", dict(registry.tools()))


def test_a_registered_tool_gets_the_context_and_its_arguments(scratch_tools):
    @registry.register_tool("crm.lookup")
    def lookup(ctx: StepContext, *, email: str) -> dict:
        return {"email": email, "key": ctx.idempotency_key}

    assert run_tool("crm.lookup", email="a@example.com") == {
        "email": "a@example.com",
        "key": "run-1:call",
    }


def test_wrong_arguments_fail_without_retrying(scratch_tools):
    @registry.register_tool("crm.lookup")
    def lookup(ctx: StepContext, *, email: str) -> dict:
        return {}

    with pytest.raises(StepFailure) as failure:
        run_tool("crm.lookup", mail="a@example.com")

    assert failure.value.code == "bad_args"
    assert failure.value.retryable is False
    assert "mail" in failure.value.message


@pytest.mark.parametrize(
    ("value", "named"), [({"when": timezone.now()}, "datetime"), ({"x": float("nan")}, "NaN")]
)
def test_a_result_that_is_not_json_fails_naming_the_culprit(scratch_tools, value, named):
    registry.register_tool("bad")(lambda ctx: value)

    with pytest.raises(StepFailure) as failure:
        run_tool("bad")

    assert failure.value.code == "bad_result"
    assert failure.value.retryable is False
    assert named in failure.value.message


# --- echo -----------------------------------------------------------------------------------


def test_echo_returns_its_arguments():
    assert run_tool("echo", text="hi", n=[1, 2]) == {"args": {"text": "hi", "n": [1, 2]}}


def test_echo_waits_delay_ms():
    started = time.monotonic()
    result = run_tool("echo", delay_ms=120, text="hi")

    assert time.monotonic() - started >= 0.12
    assert result == {"args": {"delay_ms": 120, "text": "hi"}}


def test_echo_does_not_sleep_past_the_deadline():
    started = time.monotonic()
    with pytest.raises(StepFailure) as failure:
        run_tool("echo", seconds=1, delay_ms=5000)

    assert failure.value.code == "timeout"
    assert failure.value.retryable is True
    assert time.monotonic() - started < 0.5


def test_echo_refuses_a_negative_delay():
    with pytest.raises(StepFailure) as failure:
        run_tool("echo", delay_ms=-1)

    assert failure.value.code == "bad_args"


# --- http -----------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    """Answers by path: /json, /text, /big, /missing, /broken, /redirect, /slow."""

    def log_message(self, format, *args):  # keep test output quiet
        pass

    def do_GET(self):
        self.server.requests.append(
            {"method": "GET", "path": self.path, "headers": dict(self.headers), "body": None}
        )
        self.answer()

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length)) if length else None
        self.server.requests.append(
            {"method": "POST", "path": self.path, "headers": dict(self.headers), "body": body}
        )
        self.answer()

    def send(self, status: int, body: bytes, content_type: str, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def answer(self):
        path = self.path.split("?", 1)[0]
        if path == "/json":
            self.send(200, json.dumps({"ok": True, "path": self.path}).encode(), "application/json")
        elif path == "/text":
            self.send(200, "héllo".encode(), "text/plain; charset=utf-8")
        elif path == "/big":
            self.send(200, b"x" * 5000, "text/plain")
        elif path == "/missing":
            self.send(404, b'{"error": "no such customer"}', "application/json")
        elif path == "/broken":
            self.send(503, b"upstream is down", "text/plain", Retry_After="3")
        elif path == "/redirect":
            self.send(302, b"", "text/plain", Location="http://169.254.169.254/latest/meta-data/")
        elif path == "/slow":
            self.server.release.wait(3)
            self.send(200, b"late", "text/plain")


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.requests = []
    httpd.release = threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.release.set()
    httpd.shutdown()
    httpd.server_close()


def url(server: ThreadingHTTPServer, path: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


@pytest.fixture
def private_urls_allowed(settings):
    settings.SWITCHYARD_ALLOW_PRIVATE_URLS = True


def test_http_refuses_a_local_server_by_default(server, settings):
    settings.SWITCHYARD_ALLOW_PRIVATE_URLS = False

    with pytest.raises(StepFailure) as failure:
        run_tool("http", url=url(server, "/json"))

    assert failure.value.code == "forbidden_address"
    assert failure.value.retryable is False
    assert "127.0.0.1 is a loopback address" in failure.value.message
    assert server.requests == []


@pytest.mark.parametrize(
    "target",
    [
        "http://localhost/",
        "http://[::1]/",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "http://[::ffff:127.0.0.1]/",
    ],
)
def test_http_refuses_private_and_loopback_addresses(settings, target):
    settings.SWITCHYARD_ALLOW_PRIVATE_URLS = False

    with pytest.raises(StepFailure) as failure:
        run_tool("http", url=target)

    assert failure.value.code == "forbidden_address"
    assert failure.value.message.startswith(f"refusing {target}: ")


def test_http_returns_status_headers_and_parsed_json(server, private_urls_allowed):
    result = run_tool("http", url=url(server, "/json"), params={"q": "refund"})

    assert result["status"] == 200
    assert result["headers"]["content-type"] == "application/json"
    assert result["body"] == {"ok": True, "path": "/json?q=refund"}
    assert result["truncated"] is False


def test_http_sends_method_json_headers_and_the_idempotency_key(server, private_urls_allowed):
    run_tool(
        "http",
        method="post",
        url=url(server, "/json"),
        json={"ticket": 42},
        headers={"X-Trace": 7},
    )

    [request] = server.requests
    assert request["method"] == "POST"
    assert request["body"] == {"ticket": 42}
    assert request["headers"]["X-Trace"] == "7"
    assert request["headers"]["Idempotency-Key"] == "run-1:call"


def test_http_returns_text_bodies_as_text(server, private_urls_allowed):
    assert run_tool("http", url=url(server, "/text"))["body"] == "héllo"


def test_http_truncates_large_bodies(server, private_urls_allowed, settings):
    settings.SWITCHYARD_HTTP_TOOL_MAX_BYTES = 100

    result = run_tool("http", url=url(server, "/big"))

    assert result["body"] == "x" * 100
    assert result["truncated"] is True


def test_http_returns_a_4xx_as_a_result_for_the_workflow_to_judge(server, private_urls_allowed):
    result = run_tool("http", url=url(server, "/missing"))

    assert result["status"] == 404
    assert result["body"] == {"error": "no such customer"}


def test_http_fails_a_5xx_retryably(server, private_urls_allowed):
    with pytest.raises(StepFailure) as failure:
        run_tool("http", url=url(server, "/broken"))

    assert failure.value.code == "http_5xx"
    assert failure.value.retryable is True
    assert "503" in failure.value.message
    assert "upstream is down" in failure.value.message


def test_http_returns_redirects_without_following_them(server, private_urls_allowed):
    result = run_tool("http", url=url(server, "/redirect"))

    assert result["status"] == 302
    assert result["headers"]["location"] == "http://169.254.169.254/latest/meta-data/"
    assert [request["path"] for request in server.requests] == ["/redirect"]


def test_http_times_out_retryably(server, private_urls_allowed):
    started = time.monotonic()
    with pytest.raises(StepFailure) as failure:
        run_tool("http", url=url(server, "/slow"), timeout_s=0.3)

    assert failure.value.code == "timeout"
    assert failure.value.retryable is True
    assert time.monotonic() - started < 1.5


def test_http_timeout_is_bounded_by_the_deadline(server, private_urls_allowed):
    started = time.monotonic()
    with pytest.raises(StepFailure) as failure:
        run_tool("http", seconds=0.4, url=url(server, "/slow"), timeout_s=30)

    assert failure.value.code == "timeout"
    assert time.monotonic() - started < 1.5


def test_http_connection_errors_are_retryable(private_urls_allowed):
    # A port nobody listens on: bind one, note it, close it.
    probe = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = probe.server_address[1]
    probe.server_close()

    with pytest.raises(StepFailure) as failure:
        run_tool("http", url=f"http://127.0.0.1:{port}/")

    assert failure.value.code == "http_error"
    assert failure.value.retryable is True


def test_http_connects_only_to_the_address_it_checked(server, settings, monkeypatch):
    """DNS rebinding: the name resolves to a public address for the check, then to the local
    server for the connection. The connection is refused; the server sees nothing."""
    settings.SWITCHYARD_ALLOW_PRIVATE_URLS = False
    port = server.server_address[1]
    answers = iter(["93.184.215.14", "127.0.0.1", "127.0.0.1", "127.0.0.1"])

    def rebinding_getaddrinfo(host, port_, *args, **kwargs):
        address = next(answers)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port_))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_getaddrinfo)

    with pytest.raises(StepFailure) as failure:
        run_tool("http", url=f"http://rebind.example:{port}/json")

    assert failure.value.code == "forbidden_address" and failure.value.retryable is False
    assert "127.0.0.1 is a loopback address" in failure.value.message
    assert server.requests == []


def test_http_refuses_an_unknown_method():
    with pytest.raises(StepFailure) as failure:
        run_tool("http", method="BREW", url="https://example.com/")

    assert failure.value.code == "bad_args"
