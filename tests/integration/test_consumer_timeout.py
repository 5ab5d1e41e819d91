"""Steps longer than RabbitMQ's consumer_timeout (docs/architecture.md, invariant 13).

RabbitMQ closes the channel of a consumer that holds a delivery unacknowledged for longer
than `consumer_timeout`; Celery took that channel error as unrecoverable and the whole worker
exited (found by the chaos suite: both tool workers died of one long step). These tests run
against a private RabbitMQ node with a 3-second consumer_timeout, started for this module
(the shared broker's configuration is never touched); the database is the test database.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid

import pytest
from django.conf import settings
from kombu import Connection

from jobs.models import StepRun
from jobs.scheduler import publish
from jobs.transitions.steps import Dispatch
from tests.support import tools
from tests.support.cluster import free_port
from tests.support.workflows import submit, tool_step

pytestmark = pytest.mark.cluster

CONSUMER_TIMEOUT_S = 3


@pytest.fixture(scope="module")
def strict_rabbit():
    """A RabbitMQ node whose consumer_timeout is 3 s (checked every second)."""
    if os.geteuid() != 0 or shutil.which("rabbitmq-server") is None:
        pytest.skip("needs root and rabbitmq-server to start a private RabbitMQ node")
    from tests.reliability.services import PrivateRabbit

    rabbit = PrivateRabbit(
        node=f"sy-ctimeout-{uuid.uuid4().hex[:6]}@localhost",
        port=free_port(),
        dist_port=free_port(),
        consumer_timeout_ms=CONSUMER_TIMEOUT_S * 1000,
    )
    try:
        rabbit.start()
        yield rabbit
    finally:
        rabbit.stop()


@pytest.fixture
def strict_cluster(cluster, strict_rabbit, monkeypatch):
    """The cluster's processes (and its queue inspection) on the strict broker."""
    cluster.env["BROKER_URL"] = strict_rabbit.url
    monkeypatch.setattr(settings, "CELERY_BROKER_URL", strict_rabbit.url)
    return cluster


def _long_step(key: str, *, sleep_s: float, timeout_s: float, max_attempts: int = 3):
    return {
        "name": f"long-{key}",
        "steps": [
            tool_step(
                "slow",
                "test.count",
                args={"key": key, "sleep_ms": int(sleep_s * 1000)},
                timeout_s=timeout_s,
                retry={"max_attempts": max_attempts, "backoff_s": 0.1},
            )
        ],
    }


def test_a_step_leased_past_the_held_delivery_limit_is_published_unheld(cluster, monkeypatch):
    monkeypatch.setattr(settings, "SWITCHYARD_QUEUE_PREFIX", cluster.prefix)
    monkeypatch.setattr(settings, "SWITCHYARD_HELD_DELIVERY_MAX_S", 60.0)
    short, long = uuid.uuid4(), uuid.uuid4()
    published, failed = publish(
        [
            Dispatch(1, short, "steps.tool", "standard", lease_s=60.0),
            Dispatch(2, long, "steps.tool", "standard", lease_s=61.0),
        ]
    )
    assert (published, failed) == (2, 0)
    tasks = {}
    with Connection(settings.CELERY_BROKER_URL) as conn:
        channel = conn.channel()
        for _ in range(2):
            message = channel.basic_get(cluster.prefix + "steps.tool", no_ack=True)
            args, _kwargs, _embed = json.loads(message.body)
            tasks[args[0]] = message.headers["task"]
    assert tasks == {1: "jobs.execute_step", 2: "jobs.execute_step_unheld"}


def test_a_step_longer_than_consumer_timeout_runs_once_and_its_worker_survives(
    owner, strict_cluster
):
    strict_cluster.env["SWITCHYARD_HELD_DELIVERY_MAX_S"] = "2"
    strict_cluster.start_scheduler()
    worker = strict_cluster.start_worker("steps.tool", pool="prefork", concurrency=2)
    run = submit(owner.tenant, _long_step("slow", sleep_s=CONSUMER_TIMEOUT_S + 4, timeout_s=20))

    run = strict_cluster.wait_run(run, timeout=60)

    assert run.status == "succeeded", run.error
    assert len(tools.calls("slow")) == 1  # never handed to another worker meanwhile
    assert StepRun.objects.get(run=run).attempt == 1
    assert worker.alive(), worker.log()[-3000:]
    assert "PRECONDITION_FAILED" not in worker.log()


def test_a_worker_whose_held_delivery_outlives_consumer_timeout_keeps_running(
    owner, strict_cluster
):
    # The delivery is held (the default limit is far above this step's lease), so RabbitMQ
    # closes the worker's channel mid-step: the worker must reconnect, not exit.
    strict_cluster.start_scheduler()
    worker = strict_cluster.start_worker("steps.tool", pool="threads", concurrency=2)
    submit(
        owner.tenant,
        _long_step("held", sleep_s=CONSUMER_TIMEOUT_S + 3, timeout_s=20, max_attempts=1),
    )
    strict_cluster.wait_until(
        lambda: "PRECONDITION_FAILED" in worker.log(),
        30,
        "RabbitMQ never closed the channel of the held delivery",
    )
    time.sleep(2)
    assert worker.alive(), worker.log()[-3000:]
    assert "Unrecoverable error" not in worker.log()
    healthy = submit(
        owner.tenant,
        {"name": "after", "steps": [tool_step("ok", "test.count", args={"key": "after"})]},
    )
    assert strict_cluster.wait_run(healthy, timeout=60).status == "succeeded"


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_a_worker_whose_slots_all_run_unheld_steps_takes_no_message_it_cannot_start(
    owner, strict_cluster, pool
):
    # Two steps run unheld on the worker's two slots; their messages are acknowledged, which
    # frees the worker's prefetch credit. Admission believes the queue has room (it is sized
    # for four slots, as when another worker is replacing its children), so it publishes a
    # short held step: RabbitMQ must keep it ready until a slot is free, or it waits in the
    # worker past consumer_timeout and the worker's channel is closed.
    strict_cluster.env["SWITCHYARD_HELD_DELIVERY_MAX_S"] = "2"
    strict_cluster.env["SWITCHYARD_POOL_CAPACITY"] = "steps.tool=4"
    strict_cluster.start_scheduler()
    worker = strict_cluster.start_worker("steps.tool", pool=pool, concurrency=2)
    sleep_s = CONSUMER_TIMEOUT_S + 3
    long = submit(
        owner.tenant,
        {
            "name": "two-long",
            "steps": [
                tool_step(
                    f"long_{k}",
                    "test.count",
                    args={"key": f"long-{k}-{pool}", "sleep_ms": sleep_s * 1000},
                    timeout_s=20,
                )
                for k in "ab"
            ],
        },
    )
    strict_cluster.wait_until(
        lambda: StepRun.objects.filter(run=long, status="running").count() == 2,
        30,
        "the two long steps never ran side by side",
        worker,
    )
    short_key = f"short-{pool}"
    short = submit(
        owner.tenant,
        {
            "name": "short",
            "steps": [tool_step("short", "test.count", args={"key": short_key}, timeout_s=1)],
        },
    )
    # Published, and left in the queue while no slot is free.
    strict_cluster.wait_until(
        lambda: strict_cluster.depth("steps.tool") == 1,
        10,
        "the short step's message never waited in the queue",
    )
    assert not tools.calls(short_key)

    assert strict_cluster.wait_run(short, timeout=60).status == "succeeded"
    assert strict_cluster.wait_run(long, timeout=60).status == "succeeded"
    assert [len(tools.calls(f"long-{k}-{pool}")) for k in "ab"] == [1, 1]
    assert "PRECONDITION_FAILED" not in worker.log()
    assert worker.alive(), worker.log()[-3000:]
