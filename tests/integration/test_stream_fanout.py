"""Many subscribers of one run, and many runs, on one web process (one live subscription per
run per process, `jobs.live`): every subscriber gets every event of its run exactly once and
in order, across a restart of Redis in the middle of the runs and across reconnections with
Last-Event-ID (SSE) or `?after=` (WebSocket).

The Redis here is one this test starts on a port of its own (the web, the scheduler and the
worker all use it) and restarts: the shared one is not touched.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import redis
from websockets.asyncio.client import connect as ws_open
from websockets.exceptions import ConnectionClosed

from tests.support.cluster import free_port
from tests.support.live import FINAL_EVENTS, auth, stored_log, ws_url

pytestmark = pytest.mark.cluster

STEPS = 8
CHAINED = {
    "name": "fanned",
    "steps": [
        {
            "id": f"s{n}",
            "kind": "tool",
            "tool": "echo",
            "args": {"delay_ms": 500},
            **({"after": [f"s{n - 1}"]} if n else {}),
        }
        for n in range(STEPS)
    ],
}
# Subscribers per run: the first run has many (a popular run), the others a few each.
SSE_PER_RUN = (24, 4, 4, 4)
WS_PER_RUN = (4, 2, 2, 2)


class PrivateRedis:
    """A redis-server of this test's own, on a free port, without persistence."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with redis.Redis.from_url(self.url) as client:
                    client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def wait_subscribed(self, channel: str, timeout: float = 10) -> int:
        """The subscriptions to `channel` once there is one (0 if none came in time)."""
        deadline = time.monotonic() + timeout
        with redis.Redis.from_url(self.url) as client:
            while True:
                [(_, count)] = client.pubsub_numsub(channel)
                if count or time.monotonic() > deadline:
                    return count
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None


@pytest.fixture
def private_redis(tmp_path):
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fanout(cluster, owner, private_redis):
    """Scheduler, tool worker and one web process, all on the private Redis."""
    cluster.env["REDIS_URL"] = private_redis.url
    cluster.start_scheduler()
    cluster.start_worker("steps.tool", pool="threads", concurrency=4)
    base_url = cluster.start_web(SWITCHYARD_SSE_HEARTBEAT_S="1")
    created = httpx.post(f"{base_url}/api/v1/workflows/", json=CHAINED, headers=auth(owner.raw_key))
    assert created.status_code == 201, created.text
    return base_url


async def _follow_sse(http: httpx.AsyncClient, run_id: str, reconnect_after: int | None):
    """Every stored event's payload, in the order received; with `reconnect_after`, the stream
    is dropped after that many events and opened again with Last-Event-ID."""
    got: list[dict] = []
    while True:
        headers = {"Accept": "text/event-stream"}
        if got:
            headers["Last-Event-ID"] = str(got[-1]["seq"])
        async with http.stream("GET", f"/api/v1/runs/{run_id}/events/", headers=headers) as resp:
            if resp.status_code == 204:
                return got
            assert resp.status_code == 200
            frame: dict[str, str] = {}
            async for line in resp.aiter_lines():
                if line:
                    name, _, value = line.partition(":")
                    frame[name] = value.removeprefix(" ")
                    continue
                if "id" in frame:
                    got.append(json.loads(frame["data"]))
                    if got[-1]["type"] in FINAL_EVENTS:
                        return got
                    if reconnect_after is not None and len(got) == reconnect_after:
                        reconnect_after = None
                        break
                frame = {}


async def _follow_ws(base_url: str, key: str, run_id: str, reconnect_after: int | None):
    """As `_follow_sse` over the run's socket; the reconnection sends `?after=`."""
    got: list[dict] = []
    protocols = ["switchyard.v1", f"switchyard.bearer.{key}"]
    while True:
        query = f"?after={got[-1]['seq']}" if got else ""
        async with ws_open(ws_url(base_url, run_id, query), subprotocols=protocols) as socket:
            try:
                async for text in socket:
                    message = json.loads(text)
                    if message["type"] == "step.delta":
                        continue
                    got.append(message)
                    if message["type"] in FINAL_EVENTS:
                        return got
                    if reconnect_after is not None and len(got) == reconnect_after:
                        reconnect_after = None
                        break
            except ConnectionClosed:
                return got


def test_every_subscriber_gets_every_event_once_in_order_across_a_redis_restart(
    owner, cluster, fanout, private_redis
):
    key = owner.raw_key
    run_ids = []
    for _ in SSE_PER_RUN:
        submitted = httpx.post(
            f"{fanout}/api/v1/runs/", json={"workflow": "fanned", "input": {}}, headers=auth(key)
        )
        assert submitted.status_code == 202, submitted.text
        run_ids.append(submitted.json()["id"])

    async def follow_all():
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(
            base_url=fanout, headers=auth(key), timeout=60, limits=limits
        ) as http:
            followers = []
            for run_id, sse, ws in zip(run_ids, SSE_PER_RUN, WS_PER_RUN, strict=True):
                # Half of each run's subscribers drop their stream after 3 events and resume.
                for n in range(sse):
                    resume = 3 if n % 2 else None
                    followers.append((run_id, _follow_sse(http, run_id, resume)))
                for n in range(ws):
                    resume = 3 if n % 2 else None
                    followers.append((run_id, _follow_ws(fanout, key, run_id, resume)))
            tasks = [asyncio.ensure_future(follower) for _, follower in followers]
            # Redis goes away while the runs execute, and comes back empty.
            await asyncio.sleep(1.5)
            restarted_at = time.time()
            await asyncio.to_thread(private_redis.stop)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(private_redis.start)
            # The web subscribes again (once for the run, whatever its number of subscribers)
            # while the run still executes: live delivery resumes, not only polling.
            channel = f"{cluster.env['CHANNEL_LAYER_PREFIX']}:live:run.{run_ids[0]}"
            resubscribed = await asyncio.to_thread(private_redis.wait_subscribed, channel)
            async with asyncio.timeout(90):
                results = await asyncio.gather(*tasks)
            return [run_id for run_id, _ in followers], results, restarted_at, resubscribed

    followed, results, restarted_at, resubscribed = asyncio.run(follow_all())

    assert resubscribed == 1  # one subscription of the web process for its 28 subscribers

    logs = {run_id: stored_log(fanout, key, run_id) for run_id in run_ids}
    for run_id, log in logs.items():
        assert log[-1]["type"] == "run.succeeded"
        assert [event["seq"] for event in log] == list(range(1, len(log) + 1))
        # The restart happened in the middle of the run: part of its log came after it.
        assert any(_unix(event["at"]) > restarted_at for event in log), run_id
    for run_id, got in zip(followed, results, strict=True):
        assert got == logs[run_id]
    assert len(results) == sum(SSE_PER_RUN) + sum(WS_PER_RUN)


def _unix(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()
