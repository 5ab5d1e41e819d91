"""Waiting for a run's end without a thread (docs/api.md, "5. Wait for the end"):
`POST /api/v1/runs/?wait=N` and `GET /api/v1/runs/{id}/?wait=N` against a real daphne process.
"""

from __future__ import annotations

import asyncio
import os
import resource
import time
from pathlib import Path

import httpx
import pytest
from django.conf import settings

from tests.support.live import auth, subscribers

pytestmark = [pytest.mark.cluster, pytest.mark.flaky(reruns=1)]

GREET = {
    "name": "greet",
    "steps": [
        {"id": "hello", "kind": "tool", "tool": "echo", "args": {"text": "hi {{ input.who }}"}},
        {
            "id": "bye",
            "kind": "tool",
            "tool": "echo",
            "after": ["hello"],
            "args": {"text": "bye {{ input.who }}"},
        },
    ],
    "output": "{{ steps.bye.output.args.text }}",
}
SLOW = {
    "name": "slow",
    "steps": [{"id": "nap", "kind": "tool", "tool": "echo", "args": {"delay_ms": 4000}}],
    "output": "{{ steps.nap.output.args.delay_ms }}",
}
WAITERS = 300


class Api:
    """A tenant's HTTP client of the web process."""

    def __init__(self, base_url: str, key: str):
        self.client = httpx.Client(base_url=base_url, headers=auth(key), timeout=30)

    def workflow(self, definition: dict) -> None:
        response = self.client.post("/api/v1/workflows/", json=definition)
        assert response.status_code == 201, response.text

    def submit(self, workflow: str, *, wait: str | None = None, **input) -> httpx.Response:
        params = {"wait": wait} if wait is not None else None
        body = {"workflow": workflow, "input": input}
        return self.client.post("/api/v1/runs/", json=body, params=params)

    def detail(self, run_id: str, *, wait: str | None = None) -> httpx.Response:
        params = {"wait": wait} if wait is not None else None
        return self.client.get(f"/api/v1/runs/{run_id}/", params=params)


def timed(call, *args, **kwargs) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call(*args, **kwargs)
    return response, time.monotonic() - started


def test_waiting_answers_with_the_finished_run_or_at_n_seconds(owner, stepping, web):
    api = Api(web, owner.raw_key)
    api.workflow(GREET)
    api.workflow(SLOW)

    # A short run: POST ?wait answers 200 with the finished run, as its own detail shows it.
    response, elapsed = timed(api.submit, "greet", wait="10", who="ann")
    assert response.status_code == 200, response.text
    run = response.json()
    assert run["status"] == "succeeded" and run["output"] == "bye ann"
    assert [step["status"] for step in run["steps"]] == ["succeeded", "succeeded"]
    assert response.headers["Location"] == run["links"]["self"]
    assert elapsed < 10
    assert api.detail(run["id"]).json() == run

    # A long run: POST ?wait=1 answers the submission's own 202 at 1 s...
    response, elapsed = timed(api.submit, "slow", wait="1")
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert set(accepted) == {"id", "status", "links"}
    assert 0.9 <= elapsed < 3, elapsed
    # ...GET ?wait=1 the unfinished run at 1 s...
    response, elapsed = timed(api.detail, accepted["id"], wait="1")
    assert response.status_code == 200
    assert response.json()["status"] in ("accepted", "running")
    assert 0.9 <= elapsed < 3, elapsed
    # ...and GET ?wait=15 the finished run as soon as it ends (the step naps 4 s).
    response, elapsed = timed(api.detail, accepted["id"], wait="15")
    assert response.status_code == 200
    run = response.json()
    assert run["status"] == "succeeded" and run["output"] == 4000
    assert elapsed < 10, elapsed
    # wait=0 answers at once.
    response, elapsed = timed(api.detail, accepted["id"], wait="0")
    assert response.json() == run and elapsed < 1


def test_a_bad_wait_is_a_400_that_names_wait(owner, web):
    api = Api(web, owner.raw_key)
    api.workflow(GREET)
    for wait in ("soon", "-1", str(settings.SWITCHYARD_API_MAX_WAIT_S + 1), "", "nan"):
        response = api.submit("greet", wait=wait, who="ann")
        assert response.status_code == 400, (wait, response.text)
        error = response.json()["error"]
        assert error["code"] == "invalid_request"
        assert error["message"] == "wait: must be a number of seconds from 0 to 60"
        assert error["details"] == [
            {"path": "wait", "message": "must be a number of seconds from 0 to 60"}
        ]
    assert api.client.get("/api/v1/runs/").json()["runs"] == []  # nothing was submitted
    run_id = api.submit("greet", who="ann").json()["id"]
    assert api.detail(run_id, wait="61").status_code == 400


def test_waiting_answers_only_the_runs_tenant(owner, outsider, web):
    api = Api(web, owner.raw_key)
    api.workflow(GREET)
    run_id = api.submit("greet", who="ann").json()["id"]  # no scheduler: it never ends

    stranger = Api(web, outsider.raw_key)
    for target in (run_id, "not-a-uuid"):
        response, elapsed = timed(stranger.detail, target, wait="5")
        assert response.status_code == 404 and elapsed < 2
        assert response.json() == {"error": {"code": "not_found", "message": "run not found"}}
    assert stranger.submit("greet", wait="5", who="ann").status_code == 404  # not its workflow

    nobody = Api(web, "sy_nope_nope")
    assert nobody.detail(run_id, wait="5").status_code == 401
    response = nobody.submit("greet", wait="5", who="ann")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthenticated"


# --- waiting holds no thread ------------------------------------------------------------------


@pytest.fixture
def many_open_files():
    """Room for 300+ client sockets (the web process, started after this, inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def thread_count(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


def _sockets(pid: int) -> int:
    fds = Path(f"/proc/{pid}/fd")
    return sum(1 for fd in fds.iterdir() if os.readlink(fd).startswith("socket:"))


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _all_waiting(cluster, run_id: str) -> bool:
    """The web holds a connection per waiting request, is subscribed to the run, and spent
    next to no CPU for half a second (at most 20 ms of it: timers and heartbeats; every request
    has read what it reads and waits)."""
    pid = cluster.web.pid
    if _sockets(pid) < WAITERS or subscribers(cluster, run_id) < 1:
        return False
    before = _cpu_ticks(pid)
    time.sleep(0.5)
    return _cpu_ticks(pid) - before <= 2


def test_300_waiting_requests_hold_no_thread_and_a_plain_get_is_still_answered(
    owner, cluster, many_open_files, web, tmp_path
):
    api = Api(web, owner.raw_key)
    api.workflow(GREET)
    run_id = api.submit("greet", who="ann").json()["id"]  # no scheduler: it waits forever
    threads_idle = thread_count(cluster.web.pid)

    async def scenario():
        limits = httpx.Limits(max_connections=WAITERS + 20, max_keepalive_connections=WAITERS + 20)
        async with httpx.AsyncClient(
            base_url=web, headers=auth(owner.raw_key), limits=limits, timeout=60
        ) as client:
            waiting = [
                asyncio.create_task(client.get(f"/api/v1/runs/{run_id}/", params={"wait": 50}))
                for _ in range(WAITERS)
            ]
            # All waiting: the web holds every connection, has subscribed to the run (once for
            # all of them: one subscription per run per process, jobs/live.py) and is idle.
            deadline = time.monotonic() + 60
            while not await asyncio.to_thread(_all_waiting, cluster, run_id):
                assert time.monotonic() < deadline, "the waiting requests never all subscribed"
                await asyncio.sleep(0.1)
            threads_waiting = thread_count(cluster.web.pid)

            started = time.monotonic()
            plain = await client.get(f"/api/v1/runs/{run_id}/")
            latency = time.monotonic() - started
            still_waiting = sum(not task.done() for task in waiting)

            # Cancelling the run ends every wait at once, with the run as it ended.
            cancelled = await client.post(f"/api/v1/runs/{run_id}/cancel/")
            started = time.monotonic()
            answers = await asyncio.gather(*waiting)
            release = time.monotonic() - started
            return plain, latency, still_waiting, threads_waiting, cancelled, answers, release

    plain, latency, still_waiting, threads_waiting, cancelled, answers, release = asyncio.run(
        scenario()
    )
    note = (
        f"plain GET /api/v1/runs/{{id}}/ answered in {latency * 1000:.0f} ms with {still_waiting} "
        f"requests waiting on one daphne process; its threads: {threads_idle} idle, "
        f"{threads_waiting} with them waiting; all {len(answers)} released {release:.2f} s "
        f"after the run was cancelled"
    )
    print(note)
    (tmp_path / "plain_get_latency.txt").write_text(note + "\n")

    assert plain.status_code == 200, note
    assert still_waiting == WAITERS, note
    assert latency < 5, note
    # No thread per waiting request: a handful more than idle, nowhere near 300.
    assert threads_waiting <= threads_idle + 20, note
    assert cancelled.status_code == 200
    assert {answer.status_code for answer in answers} == {200}, note
    assert {answer.json()["status"] for answer in answers} == {"cancelled"}, note
    # Woken by the run's end, not by their own 50 s wait running out (no timing bound beyond
    # that: a loaded machine may take a while to write 300 responses).
    assert release < 45, note
    cluster.wait_until(lambda: subscribers(cluster, run_id) == 0, 10, "a wait stayed subscribed")
