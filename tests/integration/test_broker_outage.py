"""The API never waits on the broker (docs/architecture.md, invariant 7): with RabbitMQ
stopped, a submission still answers 202 at once, and the run completes once RabbitMQ is back,
with the scheduler and the worker pools reconnecting on their own.

This stops the local RabbitMQ application (`rabbitmqctl stop_app`) for a few seconds and always
starts it again, waiting until it accepts AMQP connections. It needs to run as a user allowed
to call rabbitmqctl (root on the project's machines) against a broker on this machine.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import pytest
from django.conf import settings
from kombu import Connection

from jobs.models import Run
from jobs.statuses import RUN_FINAL
from tests.support.workflows import event_types

pytestmark = [pytest.mark.cluster, pytest.mark.serial]

GREET = {
    "name": "greet",
    "steps": [
        {"id": "hello", "kind": "tool", "tool": "echo", "args": {"text": "hi"}},
        {"id": "bye", "kind": "tool", "tool": "echo", "after": ["hello"], "args": {"n": 2}},
    ],
}


def _local_broker() -> tuple[str, int] | None:
    parts = urlsplit(settings.CELERY_BROKER_URL)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        return None
    return parts.hostname, parts.port or 5672


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


def _broker_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            pass
        with Connection(settings.CELERY_BROKER_URL, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1)
        return True
    except Exception:
        return False


@contextmanager
def rabbitmq_stopped() -> Iterator[None]:
    address = _local_broker()
    if address is None or shutil.which("rabbitmqctl") is None or os.geteuid() != 0:
        pytest.skip("needs a local RabbitMQ and root to stop it")
    try:
        _rabbitmqctl("stop_app")
        assert not _broker_answers(*address), "RabbitMQ still answers after stop_app"
        yield
    finally:
        _rabbitmqctl("start_app")
        deadline = time.monotonic() + 60
        while not _broker_answers(*address):
            assert time.monotonic() < deadline, "RabbitMQ did not come back within 60 s"
            time.sleep(0.2)


def test_a_submission_while_rabbitmq_is_stopped_is_accepted_and_runs_once_it_is_back(
    owner, running
):
    assert owner.api.post("/api/v1/workflows/", GREET, format="json").status_code == 201
    with rabbitmq_stopped():
        started = time.monotonic()
        response = owner.api.post("/api/v1/runs/", {"workflow": "greet"}, format="json")
        answered_in = time.monotonic() - started
        assert response.status_code == 202, response.content
        assert answered_in < 2.0, f"submission took {answered_in:.2f}s with the broker down"
        run = Run.objects.get(public_id=response.json()["id"])
        # Nothing can reach a worker while the broker is down.
        time.sleep(3)
        run.refresh_from_db()
        assert run.status not in RUN_FINAL
    finished = running.wait_run(run, timeout=120)
    assert finished.status == "succeeded", finished.error
    assert set(finished.steps.values_list("status", flat=True)) == {"succeeded"}
    for proc in running.procs:
        assert proc.alive(), f"{proc.name} died during the outage\n{proc.log()[-2000:]}"
    # The pools really lost the broker and found it again on their own.
    tool = next(proc for proc in running.procs if proc.name.startswith("tool-"))
    log = tool.log()
    assert "Connection to broker lost" in log, log[-2000:]
    assert log.count("Connected to amqp://") >= 2, log[-2000:]
    # The scheduler's publish during the outage failed; its stale-dispatch sweep re-published.
    assert "step.redispatched" in event_types(finished)
