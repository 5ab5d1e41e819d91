"""The dashboard's live sockets against a real web process (daphne), scheduler and worker:
an update reaches an open overview within 2 s of a step finishing, the run socket streams a
run's events to operators, and nobody else gets either."""

from __future__ import annotations

import time

import pytest
from websockets.exceptions import ConnectionClosed

from jobs.models import StepAttempt
from tests.support.dashboard import (
    dashboard_socket,
    ledger_chain,
    make_operator,
    make_user,
    next_frame,
    session_cookie,
)
from tests.support.workflows import submit


@pytest.fixture
def live(cluster):
    """Web (its periodic refresh pushed out of the way, so that only the push on a change can
    meet the 2 s bound), the scheduler and a tool worker."""
    base_url = cluster.start_web(SWITCHYARD_DASHBOARD_REFRESH_S="60")
    cluster.start_scheduler()
    cluster.start_worker("steps.tool", pool="threads", concurrency=2)
    return base_url


def frames_until(ws, predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        frame = next_frame(ws, timeout=max(0.1, deadline - time.monotonic()))
        if predicate(frame):
            return frame, time.time()
    raise AssertionError("no such frame in time")


def test_the_overview_is_pushed_within_2_seconds_of_a_step_finishing(owner, live):
    cookie = session_cookie(make_operator())
    with dashboard_socket(live, cookie) as ws:
        first = next_frame(ws)
        assert first["type"] == "refresh" and first["view"] == "overview"
        assert 'data-figure="running-steps"' in first["html"]
        before = first["figures"]["finished_5m"]

        run = submit(
            owner.tenant,
            {
                "name": "nap",
                "steps": [{"id": "nap", "kind": "tool", "tool": "test.count",
                           "args": {"key": "live-nap", "sleep_ms": 1500}}],
            },
        )  # fmt: skip
        frames_until(ws, lambda f: f["figures"]["backlog"]["running"] == 1, 20)
        frame, received_at = frames_until(
            ws, lambda f: f["figures"]["finished_5m"] == before + 1, 20
        )

    finished_at = StepAttempt.objects.get(step_run__run=run).finished_at
    delay = received_at - finished_at.timestamp()
    print(f"\noverview update {delay * 1000:.0f} ms after the step finished")
    assert delay < 2.0
    assert frame["figures"]["backlog"]["running"] == 0
    assert frame["figures"]["active_runs"]["running"] == 0


def test_the_run_socket_streams_a_runs_events_to_operators(owner, live):
    cookie = session_cookie(make_operator())
    run = submit(owner.tenant, ledger_chain("pair", "ws", "a", "b"))
    with dashboard_socket(live, cookie, f"/ws/dashboard/runs/{run.public_id}/?after=1") as ws:
        seen = []
        try:
            while True:
                seen.append(next_frame(ws, timeout=20))
        except ConnectionClosed:
            pass
    seqs = [event["seq"] for event in seen]
    assert seqs == list(range(2, len(seqs) + 2))
    assert seen[-1]["type"] == "run.succeeded"
    assert ws.protocol.close_rcvd.code == 1000


def test_the_sockets_refuse_anonymous_visitors_and_non_staff(owner, web):
    run = submit(owner.tenant, ledger_chain("pair", "no", "a"))
    reviewer = session_cookie(make_user("rita"))
    for path in ("/ws/dashboard/?view=workers", f"/ws/dashboard/runs/{run.public_id}/"):
        for cookie, code in ((None, 4401), (reviewer, 4403)):
            with dashboard_socket(web, cookie, path) as ws, pytest.raises(ConnectionClosed):
                next_frame(ws, timeout=10)
            assert ws.protocol.close_rcvd.code == code, (path, cookie)
    unknown = "/ws/dashboard/runs/6f1c0c9e-0000-4000-8000-000000000000/"
    operator = session_cookie(make_operator())
    with dashboard_socket(web, operator, unknown) as ws, pytest.raises(ConnectionClosed):
        next_frame(ws, timeout=10)
    assert ws.protocol.close_rcvd.code == 4404
