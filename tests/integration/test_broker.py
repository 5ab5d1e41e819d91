"""The RabbitMQ settings that keep clear of Celery's known traps (docs/architecture.md,
invariants 1, 5 and 13), checked against the real broker."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid

import pytest
from amqp.exceptions import PreconditionFailed
from django.conf import settings
from django_celery_results.models import TaskResult
from kombu import Connection

from jobs.scheduler import publish
from jobs.transitions.steps import Dispatch
from orchestrator.celery import app
from tests.support.workflows import submit, tool_step

pytestmark = pytest.mark.cluster


def test_step_queues_are_durable_priority_queues(cluster):
    cluster.start_worker("steps.tool", pool="threads", concurrency=1)
    with Connection(settings.CELERY_BROKER_URL) as conn:
        # Redeclaring with other properties is refused by RabbitMQ: the real queue is durable
        # and has x-max-priority 10.
        with pytest.raises(PreconditionFailed):
            conn.channel().queue_declare(
                cluster.prefix + "steps.tool",
                durable=False,
                auto_delete=False,
                arguments={"x-max-priority": 10},
            )
        with pytest.raises(PreconditionFailed):
            conn.channel().queue_declare(
                cluster.prefix + "steps.tool", durable=True, auto_delete=False
            )
        ok = conn.channel().queue_declare(
            cluster.prefix + "steps.tool",
            durable=True,
            auto_delete=False,
            arguments={"x-max-priority": 10},
        )
        assert ok.consumer_count == 1


def test_step_messages_are_persistent_confirmed_and_carry_only_ids(cluster, monkeypatch):
    monkeypatch.setattr(settings, "SWITCHYARD_QUEUE_PREFIX", cluster.prefix)
    token = uuid.uuid4()
    published, failed = publish([Dispatch(123, token, "steps.llm", "interactive")])
    assert (published, failed) == (1, 0)
    with app.producer_or_acquire() as producer:
        assert producer.channel._confirm_selected  # publisher confirms are on
    with Connection(settings.CELERY_BROKER_URL) as conn:
        message = conn.channel().basic_get(cluster.prefix + "steps.llm", no_ack=True)
    assert message is not None
    assert message.properties["delivery_mode"] == 2  # persistent
    assert message.properties["priority"] == 9  # interactive lane
    assert message.headers["task"] == "jobs.execute_step"
    args, kwargs, _embed = json.loads(message.body)
    assert (args, kwargs) == ([123, str(token)], {})  # ids only, never state
    assert settings.CELERY_TASK_ACKS_LATE and settings.CELERY_TASK_REJECT_ON_WORKER_LOST
    assert settings.CELERY_WORKER_PREFETCH_MULTIPLIER == 1


def test_step_tasks_store_no_celery_result(owner, running):
    run = submit(
        owner.tenant,
        {
            "name": "noresult",
            "steps": [tool_step("a", "test.count", args={"key": "a"})],
        },
    )
    assert running.wait_run(run).status == "succeeded"
    assert TaskResult.objects.count() == 0


def _task_events_of(node: str, action) -> list[str]:
    """The Celery task events that worker `node` sends while `action` runs."""
    seen: list[dict] = []
    ready = threading.Event()
    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": seen.append})
        receiver.on_consume_ready = lambda *args, **kwargs: ready.set()

        def capture() -> None:
            for _ in receiver.consume(safety_interval=0.2):
                pass

        thread = threading.Thread(target=capture, daemon=True)
        thread.start()
        assert ready.wait(10)
        action()
        time.sleep(1.0)  # a worker flushes its events shortly after the task
        receiver.should_stop = True
        thread.join(5)
    return [e["type"] for e in seen if e.get("hostname") == node and e["type"].startswith("task")]


def test_workers_send_no_task_events_until_a_monitor_turns_them_on(owner, cluster, settings):
    """Task events (three more AMQP messages per step) are off by default; a monitor such as
    Flower turns them on in the running workers with the `enable_events` control command."""
    settings.SWITCHYARD_QUEUE_PREFIX = cluster.prefix
    worker = cluster.start_worker("steps.tool", concurrency=1)
    node = f"{worker.name}@{socket.gethostname()}"
    workflow = {"name": "events", "steps": [tool_step("a", "test.count", args={"key": "e"})]}

    def one_run() -> None:
        assert cluster.wait_run(submit(owner.tenant, workflow)).status == "succeeded"

    assert _task_events_of(node, one_run) == []

    app.control.enable_events(destination=[node])
    events = _task_events_of(node, one_run)

    assert "task-received" in events and "task-succeeded" in events
