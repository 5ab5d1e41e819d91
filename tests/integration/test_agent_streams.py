"""An agent's progress live on a run's streams: `agent.turn`, `agent.tool_call` and
`agent.tool_result` among the stored events, and its turns' token deltas, on SSE and on the
WebSocket, through a real web process, scheduler and workers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.live import open_sse, sse_frames, stored_log

from .test_streams import read_ws_messages, submit

pytestmark = pytest.mark.cluster

AGENT = {
    "name": "streamed-agent",
    "steps": [
        {
            "id": "helper",
            "kind": "agent",
            "provider": "simulated",
            "prompt": "Look it up, then answer.",
            "tools": ["echo"],
            "max_turns": 3,
            "simulated": {
                "latency_ms": 600,
                "script": [
                    {"text": "Looking it up.", "tool_calls": [{"tool": "echo", "args": {"q": 1}}]},
                    {"text": "Here is the answer."},
                ],
            },
        }
    ],
    "output": "{{ steps.helper.output.text }}",
}

AGENT_EVENTS = [
    ("agent.turn", 1, None),
    ("agent.tool_call", 1, "echo"),
    ("agent.tool_result", 1, "echo"),
    ("agent.turn", 2, None),
]


def agent_events(events: list[dict]) -> list[tuple]:
    return [
        (e["type"], e["data"]["turn"], e["data"].get("tool"))
        for e in events
        if e["type"].startswith("agent.")
    ]


def test_agent_events_and_turn_deltas_arrive_on_sse_and_websocket(owner, stepping, web):
    run_id = submit(web, owner.raw_key, AGENT)
    with ThreadPoolExecutor(1) as pool:
        socket_messages = pool.submit(read_ws_messages, web, owner.raw_key, run_id)
        with open_sse(web, owner.raw_key, run_id) as response:
            frames = list(sse_frames(response))
        socket_messages = socket_messages.result(timeout=60)

    log = stored_log(web, owner.raw_key, run_id)
    assert log[-1]["type"] == "run.succeeded"
    assert agent_events(log) == AGENT_EVENTS
    stored = [frame.data for frame in frames if frame.id]
    assert stored == log
    assert agent_events([m for m in socket_messages if "seq" in m]) == AGENT_EVENTS
    turn = next(e for e in log if e["type"] == "agent.turn")
    assert turn["step"] == "helper" and turn["data"]["text"] == "Looking it up."
    assert turn["data"]["usage"]["total_tokens"] > 0
    deltas = [frame.data for frame in frames if frame.event == "step.delta"]
    assert [(d["step"], d["text"]) for d in deltas] == [
        ("helper", "Looking it up."),
        ("helper", "Here is the answer."),
    ]
    socket_deltas = [m["text"] for m in socket_messages if m["type"] == "step.delta"]
    assert socket_deltas == ["Looking it up.", "Here is the answer."]
