"""The `openai` LLM provider against a real local OpenAI-compatible server streaming SSE."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.utils import timezone

from jobs.steps import llm
from jobs.steps.registry import StepContext, StepFailure

CONTENT = ["Hel", "lo, ", "wor", "ld!"]
USAGE = {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}


def chunk(delta: dict, finish_reason: str | None = None, **extra) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "gpt-test-2025",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        **extra,
    }


def completion_chunks(*, with_usage: bool) -> list[dict]:
    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": text}) for text in CONTENT]
    chunks.append(chunk({}, "stop"))
    if with_usage:
        chunks.append({"id": "chatcmpl-1", "model": "gpt-test-2025", "choices": [], "usage": USAGE})
    return chunks


class FakeOpenAI(BaseHTTPRequestHandler):
    """Behaves as `server.scenario` says: stream, no_usage, json, 429, 400, 500, slow,
    trickle, cut, error_event."""

    def log_message(self, format, *args):  # keep test output quiet
        pass

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        self.server.requests.append(
            {
                "path": self.path,
                "headers": dict(self.headers),
                "body": json.loads(self.rfile.read(length)),
            }
        )
        scenario = self.server.scenario
        if scenario == "stream":
            self.stream(completion_chunks(with_usage=True))
        elif scenario == "no_usage":
            self.stream(completion_chunks(with_usage=False))
        elif scenario == "cut":
            self.stream(completion_chunks(with_usage=False)[:3], done=False)
        elif scenario == "error_event":
            self.stream([chunk({"content": "Hel"}), {"error": {"message": "overloaded"}}])
        elif scenario == "trickle":
            self.stream(completion_chunks(with_usage=True) * 10, pause_s=0.2)
        elif scenario == "json":
            body = {
                "model": "gpt-test-2025",
                "choices": [
                    {"index": 0, "message": {"content": "Hello!"}, "finish_reason": "stop"}
                ],
                "usage": USAGE,
            }
            self.reply(200, json.dumps(body), "application/json")
        elif scenario == "slow":
            self.server.release.wait(3)
            self.reply(200, "{}", "application/json")
        else:
            status = int(scenario)
            self.reply(status, json.dumps({"error": {"message": f"status {status}"}}), retry="2")

    def reply(self, status: int, body: str, content_type="application/json", retry=None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body.encode())))
        if retry:
            self.send_header("Retry-After", retry)
        self.end_headers()
        self.wfile.write(body.encode())

    def stream(self, chunks: list[dict], *, done: bool = True, pause_s: float = 0.01) -> None:
        # HTTP/1.0 without Content-Length: the body ends when the connection closes.
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for data in chunks:
            self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
            self.wfile.flush()
            if self.server.release.wait(pause_s):
                return
        if done:
            self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def server(settings) -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    httpd.requests = []
    httpd.scenario = "stream"
    httpd.release = threading.Event()
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    settings.SWITCHYARD_OPENAI_BASE_URL = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    settings.SWITCHYARD_OPENAI_API_KEY = "sk-test"
    settings.SWITCHYARD_OPENAI_MODEL = "gpt-test"
    settings.SWITCHYARD_OPENAI_TIMEOUT_S = 5
    yield httpd
    httpd.release.set()
    httpd.shutdown()
    httpd.server_close()


def make_ctx(step_input: dict, *, seconds: float = 5, deltas: list[str] | None = None):
    return StepContext(
        run_id="run-1",
        tenant_id=1,
        step_id="draft",
        map_index=None,
        kind="llm",
        attempt=2,
        input={"provider": "openai", **step_input},
        idempotency_key="run-1:draft",
        deadline=timezone.now() + timedelta(seconds=seconds),
        emit_delta=(deltas.append if deltas is not None else (lambda text: None)),
    )


def test_streamed_text_is_assembled_and_each_delta_emitted(server):
    deltas: list[str] = []

    result = llm.handle(make_ctx({"prompt": "Say hello"}, deltas=deltas))

    assert result == {
        "text": "Hello, world!",
        "provider": "openai",
        "model": "gpt-test-2025",
        "usage": USAGE,
        "finish_reason": "stop",
    }
    assert deltas == CONTENT


def test_the_request_follows_the_chat_completions_contract(server):
    step = {"prompt": "Say hello", "system": "Be terse.", "temperature": 0.2, "max_tokens": 9}

    llm.handle(make_ctx(step))

    [request] = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer sk-test"
    assert request["headers"]["Idempotency-Key"] == "run-1:draft"
    assert request["body"] == {
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Say hello"},
        ],
        "temperature": 0.2,
        "max_tokens": 9,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_the_step_model_overrides_the_setting(server):
    llm.handle(make_ctx({"prompt": "Say hello", "model": "gpt-other"}))

    assert server.requests[0]["body"]["model"] == "gpt-other"
    assert [m["role"] for m in server.requests[0]["body"]["messages"]] == ["user"]


def test_usage_is_estimated_and_marked_when_the_server_does_not_report_it(server):
    server.scenario = "no_usage"

    result = llm.handle(make_ctx({"prompt": "Say hello please"}))

    assert result["text"] == "Hello, world!"
    assert result["usage_estimated"] is True
    assert result["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}


def test_a_server_that_does_not_stream_is_understood(server):
    server.scenario = "json"
    deltas: list[str] = []

    result = llm.handle(make_ctx({"prompt": "Say hello"}, deltas=deltas))

    assert result["text"] == "Hello!"
    assert result["usage"] == USAGE
    assert deltas == ["Hello!"]


@pytest.mark.parametrize("status", ["429", "500", "503"])
def test_rate_limits_and_server_errors_are_retryable(server, status):
    server.scenario = status

    with pytest.raises(StepFailure) as failure:
        llm.handle(make_ctx({"prompt": "Say hello"}))

    assert failure.value.code == "provider_error"
    assert failure.value.retryable is True
    assert f"HTTP {status}" in failure.value.message
    assert f"status {status}" in failure.value.message  # a bit of the body


@pytest.mark.parametrize("status", ["400", "401", "404"])
def test_other_client_errors_are_not_retried(server, status):
    server.scenario = status

    with pytest.raises(StepFailure) as failure:
        llm.handle(make_ctx({"prompt": "Say hello"}))

    assert failure.value.code == "provider_rejected"
    assert failure.value.retryable is False
    assert f"HTTP {status}" in failure.value.message


def test_a_slow_provider_times_out_retryably(server, settings):
    server.scenario = "slow"
    settings.SWITCHYARD_OPENAI_TIMEOUT_S = 0.3

    started = time.monotonic()
    with pytest.raises(StepFailure) as failure:
        llm.handle(make_ctx({"prompt": "Say hello"}))

    assert failure.value.code == "timeout"
    assert failure.value.retryable is True
    assert time.monotonic() - started < 1.5


def test_a_stream_that_outlasts_the_deadline_times_out(server):
    # Every chunk arrives well within the read timeout; the whole stream does not fit.
    server.scenario = "trickle"

    started = time.monotonic()
    with pytest.raises(StepFailure) as failure:
        llm.handle(make_ctx({"prompt": "Say hello"}, seconds=1))

    assert failure.value.code == "timeout"
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("scenario", ["cut", "error_event"])
def test_a_broken_stream_is_a_retryable_provider_error(server, scenario):
    server.scenario = scenario

    with pytest.raises(StepFailure) as failure:
        llm.handle(make_ctx({"prompt": "Say hello"}))

    assert failure.value.code == "provider_error"
    assert failure.value.retryable is True


def test_an_unreachable_provider_is_a_retryable_provider_error(server, settings):
    # A port nobody listens on: bind one, note it, close it.
    probe = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    settings.SWITCHYARD_OPENAI_BASE_URL = f"http://127.0.0.1:{probe.server_address[1]}/v1"
    probe.server_close()

    with pytest.raises(StepFailure) as failure:
        llm.handle(make_ctx({"prompt": "Say hello"}))

    assert failure.value.code == "provider_error"
    assert failure.value.retryable is True


def test_a_missing_api_key_is_a_configuration_error_naming_the_setting(server, settings):
    settings.SWITCHYARD_OPENAI_API_KEY = ""

    with pytest.raises(StepFailure) as failure:
        llm.handle(make_ctx({"prompt": "Say hello"}))

    assert failure.value.code == "config"
    assert failure.value.retryable is False
    assert "SWITCHYARD_OPENAI_API_KEY" in failure.value.message
    assert server.requests == []
