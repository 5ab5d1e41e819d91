"""Several daphne processes behind one socket (`orchestrator.web`): the kernel spreads the
connections over all of them, a child that dies is replaced while the others keep answering,
and stopping (or killing) the supervisor leaves no daphne behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support.cluster import ROOT, answering_pids, free_port

pytestmark = pytest.mark.cluster


def gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaped yet counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def healthz(base_url: str) -> int:
    try:
        return httpx.get(f"{base_url}/healthz", timeout=5).status_code
    except httpx.HTTPError:
        return 0


@pytest.fixture
def two(cluster):
    """The web as two daphne processes; (base URL, supervisor, the two children's pids)."""
    base_url = cluster.start_web(processes=2)
    children = cluster.web.children()
    assert len(children) == 2
    return base_url, cluster.web, children


def test_concurrent_connections_are_answered_by_both_processes(cluster, two):
    base_url, _, children = two
    limits = httpx.Limits(max_connections=40)
    with (
        httpx.Client(base_url=base_url, limits=limits, timeout=10) as client,
        ThreadPoolExecutor(max_workers=40) as pool,
    ):
        responses = list(pool.map(lambda _: client.get("/healthz"), range(40)))
    assert [response.status_code for response in responses] == [200] * 40
    # 20 keep-alive connections held open together: each of the two daphnes holds some (the
    # kernel's choice, so a round where one process won every accept is tried again).
    cluster.wait_until(
        lambda: answering_pids(base_url, children) == set(children),
        10,
        "one daphne accepted every connection",
    )


def test_a_killed_process_is_replaced_while_the_port_keeps_answering(cluster, two):
    base_url, supervisor, children = two
    killed, survivor = children
    os.kill(killed, signal.SIGKILL)
    cluster.wait_until(lambda: gone(killed), 5, "the killed daphne did not exit")
    assert [healthz(base_url) for _ in range(10)] == [200] * 10

    def replaced() -> list[int]:
        now = supervisor.children()
        return now if len(now) == 2 and killed not in now else []

    now = cluster.wait_until(replaced, 15, "the killed daphne was not replaced", supervisor)
    assert survivor in now
    cluster.wait_until(
        lambda: answering_pids(base_url, now) == set(now), 15, "the new daphne never answered"
    )
    assert "exited (SIGKILL)" in supervisor.log()


def test_sigterm_to_the_supervisor_stops_every_process(two):
    base_url, supervisor, children = two
    os.kill(supervisor.pid, signal.SIGTERM)  # the supervisor alone, not its process group
    assert supervisor.popen.wait(timeout=15) == 0
    assert [pid for pid in children if not gone(pid)] == []
    assert healthz(base_url) == 0  # nothing listens any more


def test_children_stop_when_the_supervisor_is_killed(cluster, two):
    base_url, supervisor, children = two
    os.kill(supervisor.pid, signal.SIGKILL)
    supervisor.popen.wait(timeout=5)
    cluster.wait_until(
        lambda: all(gone(pid) for pid in children), 10, "a daphne outlived its supervisor"
    )
    assert healthz(base_url) == 0


def test_processes_that_keep_failing_to_start_stop_the_supervisor(cluster):
    argv = ["orchestrator.web", "--processes", "2", "--host", "127.0.0.1", "--port"]
    proc = cluster._spawn(
        "web",
        [sys.executable, "-m", *argv, str(free_port())],
        env={"DATABASE_POOL_MAX_SIZE": "not-a-number"},  # every daphne fails at start
    )
    assert proc.popen.wait(timeout=20) == 1
    assert "giving up: 5 daphne processes in a row exited" in proc.log()
    assert "DATABASE_POOL_MAX_SIZE must be an integer" in proc.log()


def test_a_port_in_use_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "orchestrator.web", "--port", str(port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
