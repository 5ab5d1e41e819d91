"""The floor Switchyard is built on: plain Celery no-op tasks on the same RabbitMQ.

A Celery app of its own (no Django, no database), configured the way Switchyard configures its
step queues: acks late, reject on worker lost, prefetch 1, a durable queue with
`x-max-priority`, persistent messages, confirmed publishes, no results. Against it the bench
measures what Switchyard adds: the checkpoint in PostgreSQL, the event log, the scheduler.

- `bench.chain_link`: one link of a chain; it publishes the next link (priority 5) and the last
  one pushes its finishing time to a Redis list, as a Switchyard run's steps follow each other.
- `bench.noop`: does nothing (throughput); `bench.mark` pushes its time to a Redis list, so that
  marks published before and after a batch of no-ops time the batch.

Worker: `celery -A bench.celery_baseline worker -Q <prefix>bench.raw -P threads -c N`.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery
from kombu import Exchange, Queue

QUEUE = "bench.raw"
MAX_PRIORITY = 10
PRIORITY = 5

PREFIX = os.environ.get("SWITCHYARD_QUEUE_PREFIX", "")
QUEUE_NAME = PREFIX + QUEUE

app = Celery(
    "bench_raw", broker=os.environ.get("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
)
app.conf.update(
    broker_transport_options={"confirm_publish": True, "max_retries": 3},
    broker_connection_retry_on_startup=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_serializer="json",
    accept_content=["json"],
    task_default_delivery_mode="persistent",
    task_queue_max_priority=MAX_PRIORITY,
    task_default_priority=PRIORITY,
    task_ignore_result=True,
    task_default_queue=QUEUE_NAME,
    task_queues=[
        Queue(
            QUEUE_NAME,
            Exchange(QUEUE_NAME, type="direct", durable=True),
            routing_key=QUEUE_NAME,
            durable=True,
            queue_arguments={"x-max-priority": MAX_PRIORITY},
        )
    ],
)

_redis: redis.Redis | None = None


def redis_client() -> redis.Redis:
    global _redis
    if _redis is None:
        # redis-py 8 times reads out after 5 s unless told: BLPOP waits longer than that.
        _redis = redis.Redis.from_url(
            os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"), socket_timeout=600
        )
    return _redis


def done_key(name: str) -> str:
    return f"{PREFIX}raw:{name}"


@app.task(name="bench.chain_link", ignore_result=True, acks_late=True)
def chain_link(chain_id: str, index: int, length: int) -> None:
    if index + 1 < length:
        chain_link.apply_async((chain_id, index + 1, length), priority=PRIORITY)
    else:
        redis_client().rpush(done_key(chain_id), f"{time.time():.6f}")


@app.task(name="bench.noop", ignore_result=True, acks_late=True)
def noop() -> None:
    return None


@app.task(name="bench.mark", ignore_result=True, acks_late=True)
def mark(name: str) -> None:
    redis_client().rpush(done_key(name), f"{time.time():.6f}")
