"""Clients of the live API for tests against a real web process: SSE frames and WebSockets."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis
from django.conf import settings
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

FINAL_EVENTS = {"run.succeeded", "run.failed", "run.cancelled"}


def subscribers(cluster, run_id: str) -> int:
    """Subscriptions to the run's live channels (events and deltas): one per web process that
    has an open stream or wait of the run (jobs.live), none once they all closed."""
    prefix = cluster.env["CHANNEL_LAYER_PREFIX"]
    channels = [f"{prefix}:live:run.{run_id}", f"{prefix}:live:run.{run_id}.deltas"]
    with redis.Redis.from_url(settings.REDIS_URL) as client:
        return sum(count for _, count in client.pubsub_numsub(*channels))


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class SseFrame:
    """One SSE frame as a client sees it; a comment-only frame (heartbeat) has `comment`."""

    id: str | None = None
    event: str | None = None
    data_lines: list[str] = field(default_factory=list)
    comment: str | None = None

    @property
    def data(self) -> dict[str, Any]:
        return json.loads("\n".join(self.data_lines))


def sse_frames(response: httpx.Response) -> Iterator[SseFrame]:
    """Parse a text/event-stream response frame by frame, as EventSource would."""
    frame = SseFrame()
    started = False
    for line in response.iter_lines():
        if line == "":
            if started:
                yield frame
            frame, started = SseFrame(), False
            continue
        started = True
        if line.startswith(":"):
            frame.comment = line[1:].strip()
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "id":
            frame.id = value
        elif name == "event":
            frame.event = value
        elif name == "data":
            frame.data_lines.append(value)


def open_sse(
    base_url: str,
    key: str,
    run_id: str,
    *,
    last_event_id: int | None = None,
    after: int | None = None,
    timeout: float = 30,
):
    """A streaming GET of the run's events as SSE (use as a context manager)."""
    headers = {**auth(key), "Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    params = {"after": after} if after is not None else None
    return httpx.stream(
        "GET",
        f"{base_url}/api/v1/runs/{run_id}/events/",
        headers=headers,
        params=params,
        timeout=timeout,
    )


def stored_events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """The stored events of an SSE response (frames with an id), checking each frame's form."""
    for frame in sse_frames(response):
        if frame.id is None:
            continue
        payload = frame.data
        assert frame.id == str(payload["seq"]) and frame.event == payload["type"], frame
        yield payload


def stored_log(base_url: str, key: str, run_id: str) -> list[dict[str, Any]]:
    """The run's whole log through the JSON API."""
    response = httpx.get(f"{base_url}/api/v1/runs/{run_id}/events/", headers=auth(key))
    assert response.status_code == 200, response.text
    return response.json()["events"]


# --- WebSockets -------------------------------------------------------------------------------


def ws_url(base_url: str, run_id: str, query: str = "") -> str:
    return base_url.replace("http://", "ws://") + f"/ws/runs/{run_id}/" + query


def ws_connect(
    base_url: str, run_id: str, key: str | None = None, *, query: str = "", **kwargs: Any
) -> ClientConnection:
    """Open the run's socket; with `key`, authenticated by the Sec-WebSocket-Protocol header."""
    subprotocols = ["switchyard.v1", f"switchyard.bearer.{key}"] if key else ["switchyard.v1"]
    return connect(
        ws_url(base_url, run_id, query), subprotocols=subprotocols, open_timeout=10, **kwargs
    )


def ws_messages(ws: ClientConnection, timeout: float = 30) -> Iterator[dict[str, Any]]:
    """Messages until the server closes; then `ws_close_code(ws)` says how."""
    while True:
        try:
            yield json.loads(ws.recv(timeout=timeout))
        except ConnectionClosed:
            return


def ws_closed_with(
    base_url: str, run_id: str, key: str | None = None, *, first_message: Any = None
) -> int | None:
    """Connect, send `first_message` if given, and return the code the server closes with."""
    with ws_connect(base_url, run_id, key) as ws:
        if first_message is not None:
            ws.send(json.dumps(first_message))
        for _ in ws_messages(ws, timeout=15):
            pass
        return ws.protocol.close_rcvd.code if ws.protocol.close_rcvd else None
