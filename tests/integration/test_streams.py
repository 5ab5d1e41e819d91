"""Live streams of a run's events (docs/api.md, "4. Stream its events"): SSE and WebSocket
against a real daphne process, with the real scheduler and workers where a run has to progress.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import httpx
import pytest
from websockets.exceptions import InvalidStatus

from tests.support.live import (
    FINAL_EVENTS,
    auth,
    open_sse,
    sse_frames,
    stored_events,
    stored_log,
    subscribers,
    ws_closed_with,
    ws_connect,
    ws_messages,
)

pytestmark = pytest.mark.cluster

STEADY = {
    "name": "steady",
    "steps": [
        {
            "id": f"s{n}",
            "kind": "tool",
            "tool": "echo",
            "args": {"n": n, "delay_ms": 250},
            **({"after": [f"s{n - 1}"]} if n > 1 else {}),
        }
        for n in range(1, 6)
    ],
    "output": "{{ steps.s5.output.args.n }}",
}

CHATTY = {
    "name": "chatty",
    "steps": [
        {"id": "warmup", "kind": "tool", "tool": "echo", "args": {"delay_ms": 500}},
        {
            "id": "draft",
            "kind": "llm",
            "after": ["warmup"],
            "prompt": "Explain to a customer why their streamed answer arrives word by word",
            "simulated": {"latency_ms": 0, "tokens_per_second": 50},
        },
    ],
    "output": "{{ steps.draft.output.text }}",
}


def submit(base_url: str, key: str, definition: dict, **body) -> str:
    created = httpx.post(f"{base_url}/api/v1/workflows/", json=definition, headers=auth(key))
    assert created.status_code == 201, created.text
    response = httpx.post(
        f"{base_url}/api/v1/runs/",
        json={"workflow": definition["name"], "input": {}, **body},
        headers=auth(key),
    )
    assert response.status_code == 202, response.text
    return response.json()["id"]


def read_sse_to_end(base_url: str, key: str, run_id: str) -> list[dict]:
    with open_sse(base_url, key, run_id) as response:
        assert response.status_code == 200
        return list(stored_events(response))


def read_ws_messages(base_url: str, key: str, run_id: str) -> list[dict]:
    with ws_connect(base_url, run_id, key) as ws:
        return list(ws_messages(ws))


def read_ws_to_end(base_url: str, key: str, run_id: str) -> tuple[list[dict], int | None]:
    with ws_connect(base_url, run_id, key) as ws:
        assert ws.subprotocol == "switchyard.v1"  # the key is never echoed back
        events = [m for m in ws_messages(ws) if "seq" in m]
        return events, ws.protocol.close_rcvd.code


# --- SSE --------------------------------------------------------------------------------------


def test_sse_clients_read_the_stored_log_exactly_even_across_a_reconnection(owner, stepping, web):
    run_id = submit(web, owner.raw_key, STEADY)
    with ThreadPoolExecutor(1) as pool:
        # One client reads the whole run live, from before its first step to its end.
        whole = pool.submit(read_sse_to_end, web, owner.raw_key, run_id)

        # Another drops the connection mid-run and comes back with Last-Event-ID, as
        # EventSource does (the URL's stale ?after=1 must not win over the header).
        first_part = []
        with open_sse(web, owner.raw_key, run_id) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["cache-control"] == "no-cache"
            assert response.headers["x-accel-buffering"] == "no"
            for event in stored_events(response):
                first_part.append(event)
                if len(first_part) == 6:
                    break
        time.sleep(0.7)  # events are committed while this client is away
        with open_sse(
            web, owner.raw_key, run_id, last_event_id=first_part[-1]["seq"], after=1
        ) as response:
            second_part = list(stored_events(response))
        whole = whole.result(timeout=60)

    log = stored_log(web, owner.raw_key, run_id)
    assert log[-1]["type"] == "run.succeeded"
    assert whole == log
    assert first_part[-1]["type"] not in FINAL_EVENTS and second_part
    assert first_part + second_part == log
    assert [e["seq"] for e in log] == list(range(1, len(log) + 1))
    # Every stream left the run's groups, the one that was cut off included.
    stepping.wait_until(lambda: subscribers(stepping, run_id) == 0, 10, "a stream stayed")


def test_an_idle_stream_sends_heartbeats_and_ends_with_the_runs_final_event(owner, web):
    # No scheduler: the run stays accepted until it is cancelled.
    run_id = submit(web, owner.raw_key, STEADY)
    frames = []
    with open_sse(web, owner.raw_key, run_id) as response:
        for frame in sse_frames(response):
            frames.append(frame)
            if frame.comment == "heartbeat":
                cancelled = httpx.post(
                    f"{web}/api/v1/runs/{run_id}/cancel/", headers=auth(owner.raw_key)
                )
                assert cancelled.status_code == 200, cancelled.text
        # The loop ended because the server ended the stream.
    events = [frame.data for frame in frames if frame.id]
    assert events[0]["type"] == "run.accepted" and events[-1]["type"] == "run.cancelled"
    assert any(frame.comment == "heartbeat" for frame in frames)
    assert stored_log(web, owner.raw_key, run_id) == events


def test_a_client_that_has_a_final_runs_last_event_gets_204_and_one_that_has_not_gets_the_rest(
    owner, web
):
    # No scheduler: the run stays accepted until it is cancelled.
    run_id = submit(web, owner.raw_key, STEADY)
    cancelled = httpx.post(f"{web}/api/v1/runs/{run_id}/cancel/", headers=auth(owner.raw_key))
    assert cancelled.status_code == 200, cancelled.text
    log = stored_log(web, owner.raw_key, run_id)
    last = log[-1]["seq"]
    assert log[-1]["type"] == "run.cancelled" and last > 1

    # A client that never saw the run gets all of it, then the end of the stream.
    assert read_sse_to_end(web, owner.raw_key, run_id) == log
    # One that missed the last event gets it.
    with open_sse(web, owner.raw_key, run_id, last_event_id=last - 1) as response:
        assert response.status_code == 200
        assert list(stored_events(response)) == log[-1:]
    # One that has everything, by EventSource's header or by the URL, is told to stop:
    # EventSource does not reconnect after a 204.
    for seen in ({"last_event_id": last}, {"after": last}, {"last_event_id": last + 5}):
        with open_sse(web, owner.raw_key, run_id, **seen) as response:
            response.read()
            assert response.status_code == 204, seen
            assert response.content == b""


def test_a_stream_of_a_run_that_has_not_ended_is_not_ended_early(owner, web):
    # No scheduler: the run stays accepted, and its last event so far is not its last.
    run_id = submit(web, owner.raw_key, STEADY)
    last = stored_log(web, owner.raw_key, run_id)[-1]["seq"]
    with open_sse(web, owner.raw_key, run_id, last_event_id=last) as response:
        assert response.status_code == 200
        frames = sse_frames(response)
        assert next(frames).comment == f"run {run_id} after {last}"


def test_llm_deltas_stream_coalesced_and_without_ids(owner, stepping, web):
    run_id = submit(web, owner.raw_key, CHATTY)
    with ThreadPoolExecutor(1) as pool:
        socket_messages = pool.submit(read_ws_messages, web, owner.raw_key, run_id)
        with open_sse(web, owner.raw_key, run_id) as response:
            frames = list(sse_frames(response))
        socket_messages = socket_messages.result(timeout=60)

    detail = httpx.get(f"{web}/api/v1/runs/{run_id}/", headers=auth(owner.raw_key)).json()
    draft = next(step for step in detail["steps"] if step["id"] == "draft")
    deltas = [frame for frame in frames if frame.event == "step.delta"]
    assert deltas, "no step.delta frame arrived"
    assert all(frame.id is None for frame in deltas)
    payloads = [frame.data for frame in deltas]
    assert {(p["type"], p["run"], p["step"], p["attempt"]) for p in payloads} == {
        ("step.delta", run_id, "draft", 1)
    }
    # Every piece arrived, in order: together they are the step's output.
    assert "".join(p["text"] for p in payloads) == draft["output"]["text"]
    # At most ~20 a second over the time the step streamed (plus the flush at its end).
    streamed_s = (
        datetime.fromisoformat(draft["finished_at"]) - datetime.fromisoformat(draft["started_at"])
    ).total_seconds()
    assert len(deltas) <= 20 * streamed_s + 2, (len(deltas), streamed_s)
    assert len(deltas) >= 5, "the text should have streamed in several pieces"
    # Stored events still carry their ids; the stream ended with the run.
    assert [frame.data for frame in frames if frame.id] == stored_log(web, owner.raw_key, run_id)
    # The WebSocket had the same deltas, as messages of type step.delta.
    socket_deltas = [m for m in socket_messages if m["type"] == "step.delta"]
    assert "".join(m["text"] for m in socket_deltas) == draft["output"]["text"]
    assert all("seq" not in m for m in socket_deltas)


# --- WebSocket --------------------------------------------------------------------------------


def test_websocket_clients_read_the_stored_log_exactly_even_across_a_reconnection(
    owner, stepping, web
):
    run_id = submit(web, owner.raw_key, STEADY)
    with ThreadPoolExecutor(1) as pool:
        whole = pool.submit(read_ws_to_end, web, owner.raw_key, run_id)

        # Authenticated by a first message; leaves mid-run, comes back with its last seq.
        first_part = []
        with ws_connect(web, run_id) as ws:
            ws.send(json.dumps({"type": "auth", "key": owner.raw_key}))
            for message in ws_messages(ws):
                first_part.append(message)
                if len(first_part) == 6:
                    break
        time.sleep(0.7)
        with ws_connect(web, run_id) as ws:
            ws.send(
                json.dumps({"type": "auth", "key": owner.raw_key, "after": first_part[-1]["seq"]})
            )
            second_part = [m for m in ws_messages(ws) if "seq" in m]
            assert ws.protocol.close_rcvd.code == 1000
        whole, close_code = whole.result(timeout=60)

    log = stored_log(web, owner.raw_key, run_id)
    assert log[-1]["type"] == "run.succeeded"
    assert whole == log and close_code == 1000
    assert first_part[-1]["type"] not in FINAL_EVENTS and second_part
    assert first_part + second_part == log
    stepping.wait_until(lambda: subscribers(stepping, run_id) == 0, 10, "a socket stayed")


def test_a_websocket_client_starts_after_the_urls_seq_and_can_rewind(owner, web):
    run_id = submit(web, owner.raw_key, STEADY)  # stays accepted: no scheduler
    accepted_log = stored_log(web, owner.raw_key, run_id)
    last_seq = accepted_log[-1]["seq"]
    with ws_connect(web, run_id, owner.raw_key, query=f"?after={last_seq}") as ws:
        ws.send(json.dumps({"after": "x"}))
        # Nothing is replayed (the client has it all): the first message answers the bad one.
        assert json.loads(ws.recv(timeout=10))["type"] == "error"
        ws.send(json.dumps({"after": 0}))
        replayed = [json.loads(ws.recv(timeout=10)) for _ in accepted_log]
        assert replayed == accepted_log
        httpx.post(f"{web}/api/v1/runs/{run_id}/cancel/", headers=auth(owner.raw_key))
        rest = list(ws_messages(ws))
        assert ws.protocol.close_rcvd.code == 1000
    assert replayed + rest == stored_log(web, owner.raw_key, run_id)
    assert rest[-1]["type"] == "run.cancelled"


# --- who may stream ---------------------------------------------------------------------------


def test_streams_answer_only_the_runs_tenant(owner, outsider, web):
    run_id = submit(web, owner.raw_key, STEADY)
    not_found = {"error": {"code": "not_found", "message": "run not found"}}

    for key, target in ((outsider.raw_key, run_id), (owner.raw_key, "not-a-uuid")):
        with open_sse(web, key, target) as response:
            response.read()
            assert response.status_code == 404
            assert response.json() == not_found
    for headers in ({"Authorization": "Bearer sy_nope_nope"}, {}):
        response = httpx.get(
            f"{web}/api/v1/runs/{run_id}/events/",
            headers={**headers, "Accept": "text/event-stream"},
        )
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthenticated"
    with open_sse(web, owner.raw_key, run_id, after=-1) as response:
        response.read()
        assert response.status_code == 400
        assert response.json()["error"]["details"][0]["path"] == "after"

    # WebSocket: the key in the subprotocol header or in a first message.
    assert ws_closed_with(web, run_id, outsider.raw_key) == 4404
    assert ws_closed_with(web, "not-a-uuid", owner.raw_key) == 4404
    assert ws_closed_with(web, run_id, "sy_nope_nope") == 4401
    for first_message, code in (
        ({"type": "auth", "key": outsider.raw_key}, 4404),
        ({"type": "auth", "key": "sy_nope_nope"}, 4401),
        ({"after": 0}, 4401),
    ):
        assert ws_closed_with(web, run_id, first_message=first_message) == code, first_message

    # A browser page on another site is refused at the handshake; one on this site is not.
    with pytest.raises(InvalidStatus):
        ws_connect(web, run_id, owner.raw_key, origin="http://evil.example")
    with ws_connect(web, run_id, owner.raw_key, origin=web) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "run.accepted"
