"""Asynchronous HTTP clients for the scenarios (httpx.AsyncClient, 127.0.0.1 only).

Every client is bounded in count (the caller's concurrency) and in time (a deadline or a
timeout on each request), so a load generator can never outlive its scenario.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx

FINAL_EVENTS = frozenset({"run.succeeded", "run.failed", "run.cancelled"})


def client(base_url: str, *, key: str | None = None, connections: int = 100) -> httpx.AsyncClient:
    """An AsyncClient for one server, with room for `connections` requests at once."""
    if not base_url.startswith("http://127.0.0.1:"):
        raise ValueError(f"the bench only talks to 127.0.0.1, not {base_url}")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(
        base_url=base_url,
        headers=headers,
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        timeout=httpx.Timeout(60.0),
    )


@dataclass
class Submitted:
    status: int | None  # None: no answer (timeout or connection error)
    latency_ms: float
    run_id: str | None = None
    error: str = ""
    started: float = 0.0  # time.time() when the request was sent
    late_ms: float | None = 0.0  # how long after its scheduled time it left (open loop)


async def submit(
    http: httpx.AsyncClient,
    workflow: str,
    input: dict[str, Any],
    *,
    lane: str | None = None,
    timeout_s: float = 30.0,
    scheduled: float | None = None,
) -> Submitted:
    """POST /api/v1/runs/; the whole request bounded by `timeout_s` (a gateway's timeout).

    `scheduled` (a `time.perf_counter()` value): when an open-loop client meant to send it; the
    latency is counted from then, so that a request that left late (the load generator behind
    its schedule) or waited for a connection shows that wait (no coordinated omission)."""
    body: dict[str, Any] = {"workflow": workflow, "input": input}
    if lane:
        body["lane"] = lane
    started = time.time()
    sent = time.perf_counter()
    t0 = sent if scheduled is None else min(scheduled, sent)
    late_ms = (sent - t0) * 1000
    try:
        async with asyncio.timeout(timeout_s):
            response = await http.post("/api/v1/runs/", json=body)
    except TimeoutError:
        latency_ms = (time.perf_counter() - t0) * 1000
        return Submitted(None, latency_ms, error="timeout", started=started, late_ms=late_ms)
    except httpx.HTTPError as exc:
        latency_ms = (time.perf_counter() - t0) * 1000
        error = type(exc).__name__
        return Submitted(None, latency_ms, error=error, started=started, late_ms=late_ms)
    latency_ms = (time.perf_counter() - t0) * 1000
    run_id = response.json().get("id") if response.status_code in (200, 202) else None
    error = "" if run_id else f"HTTP {response.status_code}"
    return Submitted(response.status_code, latency_ms, run_id, error, started, late_ms)


@dataclass
class Followed:
    """What one SSE client saw of one run."""

    final: str | None = None  # the final event's type, if it arrived
    final_at: float | None = None  # time.time() when it arrived
    error: str = ""
    # (seq, type, event's `at` as unix time, time.time() on receipt) of each stored event
    events: list[tuple[int, str, float, float]] = field(default_factory=list)
    deltas: int = 0
    # Set when the first stored event arrives (the replay of the run's log has begun).
    replayed: asyncio.Event | None = None

    def record(self, kind: str, data: str, received: float) -> bool:
        """Note a frame (its event type, its JSON) received at `received`; whether it was the
        run's final event."""
        if kind == "step.delta":
            self.deltas += 1
            return False
        payload = json.loads(data)
        self.events.append((payload["seq"], kind, _unix(payload["at"]), received))
        if self.replayed is not None:
            self.replayed.set()
        if kind in FINAL_EVENTS:
            self.final, self.final_at = kind, received
            return True
        return False


def _unix(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


async def follow(
    http: httpx.AsyncClient,
    run_id: str,
    *,
    first_byte_s: float,
    idle_timeout_s: float,
    deadline_s: float,
    connected: asyncio.Event | None = None,
    seen: Followed | None = None,
) -> Followed:
    """Follow a run's SSE stream until its final event.

    A gateway in front: the response must start within `first_byte_s` (its request timeout),
    then the stream dies after `idle_timeout_s` without a byte (its read timeout).
    `deadline_s` bounds the whole stream. `connected` is set once the response has started.
    What arrives is recorded in `seen` (a new `Followed` if not given), as it arrives.
    """
    seen = seen if seen is not None else Followed()
    timeout = httpx.Timeout(connect=first_byte_s, read=idle_timeout_s, write=10, pool=None)
    frame: dict[str, str] = {}
    loop = asyncio.get_running_loop()
    started = False
    try:
        async with asyncio.timeout(first_byte_s) as limit:
            async with http.stream(
                "GET",
                f"/api/v1/runs/{run_id}/events/",
                headers={"Accept": "text/event-stream"},
                timeout=timeout,
            ) as response:
                limit.reschedule(loop.time() + deadline_s)
                started = True
                if connected is not None:
                    connected.set()
                if response.status_code != 200:
                    seen.error = f"HTTP {response.status_code}"
                    return _done(seen, connected)
                async for line in response.aiter_lines():
                    if line:
                        if not line.startswith(":"):
                            name, _, value = line.partition(":")
                            frame[name] = value.removeprefix(" ")
                        continue
                    if not frame:
                        continue
                    received = time.time()
                    event, data = frame.get("event", ""), frame.get("data", "{}")
                    frame = {}
                    if seen.record(event, data, received):
                        return seen
    except TimeoutError:
        seen.error = "deadline" if started else "gateway timeout"
    except httpx.ReadTimeout:
        seen.error = "idle timeout"
    except httpx.HTTPError as exc:
        seen.error = type(exc).__name__
    return _done(seen, connected)


def _done(seen: Followed, connected: asyncio.Event | None) -> Followed:
    """A follower's end: whoever waits for it to connect, or to replay, waits no more."""
    for event in (connected, seen.replayed):
        if event is not None and not event.is_set():
            event.set()
    return seen


async def closed_loop(
    concurrency: int, duration_s: float, action, *, ramp_s: float = 0.0
) -> list[Any]:
    """`concurrency` clients each calling `await action()` back to back for `duration_s`.

    Client i starts after `ramp_s * i / concurrency`. At `duration_s` the calls still running
    are cancelled and not counted: what is returned completed within the window (every
    result, in no order), so a slow server cannot stretch the measurement.
    """
    results: list[Any] = []

    async def one_client(index: int) -> None:
        if ramp_s:
            await asyncio.sleep(ramp_s * index / concurrency)
        while True:
            results.append(await action())

    tasks = [asyncio.create_task(one_client(i)) for i in range(concurrency)]
    try:
        await asyncio.wait(tasks, timeout=duration_s)
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
    return results


async def open_loop(
    clients: int, interval_s: float, duration_s: float, action
) -> tuple[list[Any], list[float]]:
    """`clients` clients, each calling `await action(scheduled)` once every `interval_s` for
    `duration_s`, client i first at `i * interval_s / clients` (so `clients / interval_s`
    calls per second are offered, evenly spread).

    `scheduled` is the `time.perf_counter()` at which the call was due; the action measures
    from it, so a call that left late, because its client was still waiting for the previous
    answer or the load generator was behind, shows that wait (no coordinated omission). A
    client has one call at a time (its own connection); the calls it could not send within
    `duration_s` are not sent and are returned as the scheduled times they missed: the caller
    counts them as failures, so a stalled server can neither stretch the run past
    `duration_s` plus the calls' own timeout nor hide its latency. Returns (results, missed).
    """
    results: list[Any] = []
    missed: list[float] = []
    origin = time.perf_counter() + 0.1
    stop_at = origin + duration_s
    sends = max(1, int(duration_s / interval_s))

    async def one_client(index: int) -> None:
        phase = origin + index * interval_s / clients
        for k in range(sends):
            due = phase + k * interval_s
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            if time.perf_counter() >= stop_at:
                missed.extend(phase + j * interval_s for j in range(k, sends))
                return
            results.append(await action(due))

    tasks = [asyncio.create_task(one_client(i)) for i in range(clients)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
    return results, missed


async def follow_ws(
    base_url: str,
    key: str,
    run_id: str,
    *,
    first_byte_s: float,
    idle_timeout_s: float,
    deadline_s: float,
    connected: asyncio.Event | None = None,
    seen: Followed | None = None,
    opening: asyncio.Semaphore | None = None,
) -> Followed:
    """`follow` over the run's WebSocket (`WS /ws/runs/{id}/`, the key in the subprotocol
    header): the same bounds, the same record of what arrived. `opening` bounds the
    handshakes in progress at once (a load generator's ramp)."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import WebSocketException

    if not base_url.startswith("http://127.0.0.1:"):
        raise ValueError(f"the bench only talks to 127.0.0.1, not {base_url}")
    url = base_url.replace("http://", "ws://", 1) + f"/ws/runs/{run_id}/"
    seen = seen if seen is not None else Followed()
    loop = asyncio.get_running_loop()
    started = False
    try:
        async with asyncio.timeout(first_byte_s) as limit:
            async with contextlib.AsyncExitStack() as stack:
                if opening is not None:
                    await stack.enter_async_context(opening)
                socket = await connect(
                    url,
                    subprotocols=["switchyard.v1", f"switchyard.bearer.{key}"],
                    open_timeout=first_byte_s,
                    ping_interval=None,
                    max_queue=None,
                )
                await stack.aclose()  # the handshake is done: the next one may start
                stack.push_async_callback(socket.close)
                limit.reschedule(loop.time() + deadline_s)
                started = True
                if connected is not None:
                    connected.set()
                while True:
                    async with asyncio.timeout(idle_timeout_s):
                        text = await socket.recv()
                    received = time.time()
                    if seen.record(json.loads(text).get("type", ""), text, received):
                        return seen
    except TimeoutError:
        seen.error = "deadline" if started else "gateway timeout"
    except (WebSocketException, OSError) as exc:
        seen.error = type(exc).__name__
    return _done(seen, connected)
