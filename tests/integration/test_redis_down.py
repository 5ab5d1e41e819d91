"""With Redis (the channel layer) unreachable, clients that follow a run still get every
stored event: SSE and `?wait=` fall back to polling the log instead of answering 500."""

from __future__ import annotations

import httpx
import pytest

from tests.support.live import auth, open_sse, sse_frames, stored_log

pytestmark = pytest.mark.cluster

POLLED = {
    "name": "polled",
    "steps": [
        {"id": "a", "kind": "tool", "tool": "echo", "args": {"delay_ms": 200}},
        {"id": "b", "kind": "tool", "tool": "echo", "after": ["a"], "args": {"delay_ms": 200}},
    ],
}


@pytest.fixture
def web(cluster, owner):
    """A web process whose channel layer points at a port where nothing listens (the
    scheduler and the worker keep the real Redis: their live publishes are not heard), with
    the workflow installed."""
    cluster.start_scheduler()
    cluster.start_worker("steps.tool", pool="threads", concurrency=2)
    base_url = cluster.start_web(REDIS_URL="redis://127.0.0.1:1/0", SWITCHYARD_SSE_HEARTBEAT_S="1")
    created = httpx.post(f"{base_url}/api/v1/workflows/", json=POLLED, headers=auth(owner.raw_key))
    assert created.status_code == 201, created.text
    return base_url


def _post_run(web: str, key: str, query: str = "") -> httpx.Response:
    return httpx.post(
        f"{web}/api/v1/runs/{query}",
        json={"workflow": "polled", "input": {}},
        headers=auth(key),
        timeout=40,
    )


def test_a_stream_polls_the_log_when_the_channel_layer_is_down(owner, web):
    run_id = _post_run(web, owner.raw_key).json()["id"]

    with open_sse(web, owner.raw_key, run_id) as response:
        assert response.status_code == 200
        events = [frame.data for frame in sse_frames(response) if frame.id]

    assert events[-1]["type"] == "run.succeeded"
    assert events == stored_log(web, owner.raw_key, run_id)


def test_waiting_for_a_run_polls_the_log_when_the_channel_layer_is_down(owner, web):
    response = _post_run(web, owner.raw_key, "?wait=30")

    assert response.status_code == 200, response.text
    assert response.json()["status"] == "succeeded"
