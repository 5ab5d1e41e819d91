"""A run's live feed (jobs.feeds.RunFeed) against the real Redis (jobs.live) and PostgreSQL:
events that arrive out of order are put back in order without a read of the log, and an event
a lost live message is read from the log (no event is lost from a stream:
docs/architecture.md, invariant 3).
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.db import connection

from jobs import live
from jobs.events import _publisher, event_payload, run_group
from jobs.feeds import GAP_WAIT_S, Idle, RunFeed, StoredEvent
from jobs.models import Event, Run
from tests.support.workflows import submit, tool_step

pytestmark = pytest.mark.django_db(transaction=True)


def _append_events(run: Run, count: int) -> list[dict]:
    """Commit `count` events to the run's log, as a transition would, without publishing."""
    run.refresh_from_db()
    first = run.next_seq
    events = [
        Event.objects.create(run=run, seq=first + i, type="step.retrying", data={"n": i})
        for i in range(count)
    ]
    Run.objects.filter(pk=run.pk).update(next_seq=first + count)
    return [event_payload(event, run.public_id) for event in events]


async def _follow(run: Run, publish, want: int) -> tuple[list[int], int]:
    """Seqs a feed yields (the first `want` stored events) and how many times it read the log
    after its replay. `publish` commits the events and sends them, once the feed listens."""
    async with RunFeed(run, after=run.next_seq - 1, deltas=False) as feed:
        reads = 0
        read_log = feed._read_log

        def counting_read_log(after):
            nonlocal reads
            reads += 1
            return read_log(after)

        feed._read_log = counting_read_log
        seqs: list[int] = []
        items = feed.items(idle_s=30)
        first = asyncio.ensure_future(items.__anext__())  # subscribed; replay done
        await asyncio.sleep(0.2)
        await publish()
        item = await asyncio.wait_for(first, 10)
        while True:
            if isinstance(item, StoredEvent):
                seqs.append(item.seq)
            if len(seqs) == want:
                break
            item = await asyncio.wait_for(items.__anext__(), 10)
        await items.aclose()
        return seqs, reads - 1  # the first read is the replay


@pytest.fixture(autouse=True)
def _close_executor_connections():
    """The feed reads the log on the event loop's executor threads, which are gone after the
    test with their connections still open: end those, or the test database cannot be dropped.
    (No other process uses the test database during these tests.)"""
    yield
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )


@pytest.fixture
def run(owner):
    run = submit(owner.tenant, {"name": "feed", "steps": [tool_step("a", "echo")]})
    run.refresh_from_db()
    return run


def test_events_published_out_of_order_are_delivered_in_order_without_reading_the_log(run):
    group = run_group(run.public_id)
    payloads = []

    async def publish():
        payloads.extend(await database_sync_to_async(_append_events)(run, 2))
        await asyncio.to_thread(
            live.publish, group, {"type": "run.events", "events": [payloads[1]]}
        )
        await asyncio.sleep(GAP_WAIT_S / 4)
        await asyncio.to_thread(
            live.publish, group, {"type": "run.events", "events": [payloads[0]]}
        )

    seqs, log_reads = asyncio.run(_follow(run, publish, want=2))
    assert seqs == [payloads[0]["seq"], payloads[1]["seq"]]
    assert log_reads == 0


def test_an_event_the_channel_layer_dropped_is_read_from_the_log(run):
    group = run_group(run.public_id)
    payloads = []

    async def publish():  # the message carrying the first two events never arrives
        payloads.extend(await database_sync_to_async(_append_events)(run, 3))
        await asyncio.to_thread(
            live.publish, group, {"type": "run.events", "events": [payloads[2]]}
        )

    seqs, log_reads = asyncio.run(_follow(run, publish, want=3))
    assert seqs == [p["seq"] for p in payloads]
    assert log_reads == 1


def test_a_burst_for_many_subscribers_of_one_process_is_not_dropped():
    """All the consumers of one process share one Redis key; a burst for more subscribers than
    the default capacity (1,000 pending messages) reaches every one of them (it used to drop
    the rest, leaving those streams to their next heartbeat)."""
    subscribers = 1_500

    async def burst() -> int:
        layer = get_channel_layer()
        channels = [await layer.new_channel() for _ in range(subscribers)]
        for index, channel in enumerate(channels):
            await layer.group_add(f"burst-{index}", channel)
        try:
            for index in range(subscribers):
                await layer.group_send(f"burst-{index}", {"type": "run.events", "n": index})
            received = 0
            for channel in channels:
                async with asyncio.timeout(5):
                    message = await layer.receive(channel)
                received += message["type"] == "run.events"
            return received
        finally:
            for index, channel in enumerate(channels):
                await layer.group_discard(f"burst-{index}", channel)

    assert asyncio.run(burst()) == subscribers


def test_a_burst_of_live_publishes_from_one_worker_reaches_its_subscriber():
    """A worker's transitions hand their live messages to one publisher per process. A burst
    of them (hundreds of reports at once) is sent, not refused: sends at once exceed the
    Redis pool's connections (100), which raised on each one past it (the message was lost
    and its stream waited for the next heartbeat)."""
    burst = 600

    async def subscribe_and_receive(ready: threading.Event, done: list[int]) -> None:
        layer = get_channel_layer()
        channel = await layer.new_channel()
        await layer.group_add("publisher-burst", channel)
        ready.set()
        try:
            while len(done) < burst:
                async with asyncio.timeout(10):
                    message = await layer.receive(channel)
                done.append(message["n"])
        finally:
            await layer.group_discard("publisher-burst", channel)

    ready, received = threading.Event(), []
    subscriber = threading.Thread(
        target=lambda: asyncio.run(subscribe_and_receive(ready, received)), daemon=True
    )
    subscriber.start()
    assert ready.wait(10)
    publisher = _publisher()
    for n in range(burst):
        publisher.send("publisher-burst", {"type": "burst.message", "n": n})
    subscriber.join(30)

    assert sorted(received) == list(range(burst))


def test_the_heartbeat_is_not_held_back_by_a_slow_log_read(run):
    """A stream's heartbeat keeps a proxy from closing it; it goes out when the feed is idle,
    before the log is read again, however long that read waits (a busy connection pool)."""
    read_may_finish = threading.Event()

    async def follow() -> bool:
        async with RunFeed(run, after=run.next_seq - 1, deltas=False) as feed:
            items = feed.items(idle_s=0.2)
            read_log = feed._read_log

            def slow_read_log(after):
                read_may_finish.wait(10)
                return read_log(after)

            first = asyncio.ensure_future(items.__anext__())
            await asyncio.sleep(0.1)  # the replay is done: later reads are slow
            feed._read_log = slow_read_log
            try:
                item = await asyncio.wait_for(first, 5)
                return isinstance(item, Idle) and not read_may_finish.is_set()
            finally:
                read_may_finish.set()
                await items.aclose()

    assert asyncio.run(follow())


def test_messages_that_add_nothing_do_not_hold_the_heartbeat_back(run):
    """Live messages carrying only events already sent (the log was read first) yield nothing;
    the heartbeat is due `idle_s` after the last thing sent, however many of them arrive."""
    group = run_group(run.public_id)
    stale = event_payload(Event.objects.filter(run=run).order_by("-seq").first(), run.public_id)

    async def follow() -> bool:
        async with RunFeed(run, after=run.next_seq - 1, deltas=False) as feed:
            items = feed.items(idle_s=0.3)
            first = asyncio.ensure_future(items.__anext__())
            try:
                for _ in range(30):  # 3 s of a stale message every 100 ms
                    await asyncio.to_thread(
                        live.publish, group, {"type": "run.events", "events": [stale]}
                    )
                    await asyncio.sleep(0.1)
                    if first.done():
                        return isinstance(first.result(), Idle)
                return False
            finally:
                first.cancel()
                await items.aclose()

    assert asyncio.run(follow())
