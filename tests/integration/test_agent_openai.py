"""An agent on the `openai` provider against a real OpenAI-compatible server on 127.0.0.1: a
small fake that speaks the chat-completions wire format (streamed SSE, tool calls in pieces)
and answers turn 1 with two tool calls and turn 2 with the final text."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from jobs.models import Event
from tests.support.agents import children, drive
from tests.support.workflows import submit

USAGE = {"prompt_tokens": 40, "completion_tokens": 12, "total_tokens": 52}


def chunk(delta: dict, finish_reason: str | None = None) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "gpt-fake",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def tool_call_piece(index: int, *, id: str = "", name: str = "", arguments: str = "") -> dict:
    piece: dict = {"index": index, "function": {}}
    if id:
        piece.update(id=id, type="function")
    if name:
        piece["function"]["name"] = name
    if arguments:
        piece["function"]["arguments"] = arguments
    return piece


# Turn 1: some text, then two calls whose pieces interleave, as real servers stream them.
TURN_1 = [
    chunk({"role": "assistant", "content": "Checking "}),
    chunk({"content": "two things."}),
    chunk({"tool_calls": [tool_call_piece(0, id="call_a", name="echo")]}),
    chunk({"tool_calls": [tool_call_piece(1, id="call_b", name="test_count")]}),
    chunk({"tool_calls": [tool_call_piece(0, arguments='{"ord')]}),
    chunk({"tool_calls": [tool_call_piece(1, arguments='{"key": "openai-b"}')]}),
    chunk({"tool_calls": [tool_call_piece(0, arguments='er": 7}')]}),
    chunk({}, "tool_calls"),
    {"id": "chatcmpl-1", "model": "gpt-fake", "choices": [], "usage": USAGE},
]
TURN_2 = [
    chunk({"role": "assistant", "content": "Order 7 "}),
    chunk({"content": "is on its way."}),
    chunk({}, "stop"),
    {"id": "chatcmpl-2", "model": "gpt-fake", "choices": [], "usage": USAGE},
]


class FakeOpenAI(BaseHTTPRequestHandler):
    def log_message(self, format, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        self.server.requests.append(body)
        chunks = TURN_2 if body["messages"][-1]["role"] == "tool" else TURN_1
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for data in chunks:
            self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def server(settings) -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    httpd.requests = []
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    settings.SWITCHYARD_OPENAI_BASE_URL = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    settings.SWITCHYARD_OPENAI_API_KEY = "sk-test"
    settings.SWITCHYARD_OPENAI_MODEL = "gpt-fake"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_the_openai_provider_drives_two_turns_with_streamed_tool_calls(owner, server, ledger):
    definition = {
        "name": "openai-agent",
        "steps": [
            {
                "id": "helper",
                "kind": "agent",
                "provider": "openai",
                "system": "You help.",
                "prompt": "Where is order {{ input.order }}?",
                "tools": ["echo", "test.count"],
                "max_turns": 3,
            }
        ],
        "output": "{{ steps.helper.output.text }}",
    }
    run = drive(submit(owner.tenant, definition, {"order": 7}))

    assert run.status == "succeeded", run.error
    assert run.output == "Order 7 is on its way."
    first, second = server.requests
    assert [tool["function"]["name"] for tool in first["tools"]] == ["echo", "test_count"]
    assert first["tools"][0]["function"]["parameters"]["properties"]["delay_ms"]["minimum"] == 0
    assert first["stream"] is True
    assert second["messages"][2] == {
        "role": "assistant",
        "content": "Checking two things.",
        "tool_calls": [
            {
                "id": "call_a",
                "type": "function",
                "function": {"name": "echo", "arguments": '{"order": 7}'},
            },
            {
                "id": "call_b",
                "type": "function",
                "function": {"name": "test_count", "arguments": '{"key": "openai-b"}'},
            },
        ],
    }
    results = {m["tool_call_id"]: json.loads(m["content"]) for m in second["messages"][3:]}
    assert results["call_a"] == {"args": {"order": 7}}
    assert results["call_b"]["key"] == "openai-b"
    rows = children(run)
    assert [(s.kind, s.input.get("tool")) for s in rows] == [
        ("llm", None),
        ("tool", "echo"),
        ("tool", "test.count"),
        ("llm", None),
    ]
    assert rows[0].output["usage"] == USAGE
    assert run.steps.get(step_id="helper", map_index=None).output["usage"]["total_tokens"] == 104
    deltas = Event.objects.filter(run=run, type="agent.turn").values_list("data", flat=True)
    assert [d["text"] for d in deltas] == ["Checking two things.", "Order 7 is on its way."]
