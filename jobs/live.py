"""The transport of runs' live messages: Redis pub/sub, one subscription per run per process.

Publishing (`publish`) is synchronous and happens in the thread that committed, from the
transaction's commit hook: one PUBLISH, no hand-over to another thread. A process whose
threads are all busy (a worker pool running steps) used to leave its publisher thread waiting
for the GIL while the commit's events aged; and a message that is in Redis before the commit
returns is in every subscriber's connection before anything that the commit caused (a step
claimed by another process, its own events) can be published.

Subscribing (`run_bus().subscribe`) goes through one hub per event loop, which is one per web
process: the first local subscriber of a run makes the hub SUBSCRIBE on its one connection,
the last one leaving UNSUBSCRIBEs, and each message is decoded once and handed to every local
subscriber from memory. A thousand clients of one run cost Redis one delivery; a thousand runs
cost it one connection. Redis delivers pub/sub messages as they are published, in order, over
a connection the hub only reads: no per-message round trips (a channel-layer `receive` costs
four, one message at a time per process, which bounded a web process to a few hundred
messages a second).

Pub/sub keeps nothing: a message published while a process is not connected is gone. The
run's log in PostgreSQL is the truth (`jobs.feeds`): when the hub loses its connection it
tells every subscriber to read the log (`RESYNC`), keeps trying to reconnect, subscribes
again to every run it serves, and tells them again once it has.

The Redis server and the key prefix are the channel layer's (`CHANNEL_LAYERS["default"]`):
one setting, one Redis.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterable
from typing import Any

import redis
import redis.asyncio
from django.conf import settings
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

# A subscriber is told to read the log instead of waiting for what it may have missed.
RESYNC: dict[str, Any] = {"type": "resync"}
# Messages a subscriber may have waiting before it is told to read the log instead (a client
# that does not read its stream must not hold a run's messages in the web's memory).
MAX_QUEUED = 1_000
# How long a new subscriber waits for Redis to confirm its subscription before it reads the
# log (it polls the log until the hub is subscribed).
CONFIRM_TIMEOUT_S = 5.0
# After a failed publish, this process drops live messages for this long instead of trying
# Redis on every commit (a dead Redis must not slow the engine; the log has every event).
PUBLISH_PAUSE_S = 1.0
# The hub PINGs Redis this often and gives up on a connection silent for READ_TIMEOUT_S: a
# connection that died without closing is found and replaced.
PING_S, READ_TIMEOUT_S = 5.0, 15.0
# The hub's reconnection backoff.
RECONNECT_MIN_S, RECONNECT_MAX_S = 0.1, 2.0


def _layer_config() -> dict[str, Any]:
    return settings.CHANNEL_LAYERS["default"].get("CONFIG", {})


def redis_url() -> str:
    hosts = _layer_config().get("hosts") or [settings.REDIS_URL]
    host = hosts[0]
    return host["address"] if isinstance(host, dict) else str(host)


def channel_name(name: str) -> str:
    """The pub/sub channel of `name` (`jobs.events` names them), under the layer's prefix."""
    return f"{_layer_config().get('prefix', 'switchyard')}:live:{name}"


# --- publishing ------------------------------------------------------------------------------


class _Publisher:
    def __init__(self) -> None:
        self.pid = os.getpid()
        # No retries: a commit hook waits for one attempt at most (PUBLISH_PAUSE_S after).
        self.client = redis.Redis.from_url(
            redis_url(),
            socket_connect_timeout=0.5,
            socket_timeout=1.0,
            retry=Retry(NoBackoff(), 0),
        )
        self.paused_until = 0.0


_publisher: _Publisher | None = None
_publisher_lock = threading.Lock()


def _the_publisher() -> _Publisher:
    global _publisher
    with _publisher_lock:
        if _publisher is None or _publisher.pid != os.getpid():  # a forked child: its own
            _publisher = _Publisher()
        return _publisher


def publish(name: str, message: dict[str, Any]) -> None:
    """Send `message` (JSON-serialisable) to the subscribers of `name`, now. Never raises.

    Costs one round trip to Redis on the calling thread. A message that cannot be sent is
    dropped: subscribers read the log for it.
    """
    try:
        publisher = _the_publisher()
        if time.monotonic() < publisher.paused_until:
            return
        data = json.dumps(message, separators=(",", ":"))
        publisher.client.publish(channel_name(name), data)
    except redis.RedisError as exc:
        publisher.paused_until = time.monotonic() + PUBLISH_PAUSE_S
        log.warning("live publish to %s failed, paused %.0f s: %s", name, PUBLISH_PAUSE_S, exc)
    except Exception:
        log.warning("live publish to %s failed", name, exc_info=True)


# --- subscribing -----------------------------------------------------------------------------


class Subscription:
    """One local subscriber's messages, in the order Redis delivered them."""

    def __init__(self, bus: RunBus, channels: tuple[str, ...]) -> None:
        self.bus = bus
        self.channels = channels
        self._messages: collections.deque[dict[str, Any]] = collections.deque()
        self._arrived = asyncio.Event()

    @property
    def live(self) -> bool:
        """Whether the hub is subscribed to all of this subscriber's channels right now."""
        return self.bus.connected and all(c in self.bus.confirmed for c in self.channels)

    def put(self, message: dict[str, Any]) -> None:
        if len(self._messages) >= MAX_QUEUED:
            self._messages.clear()
            message = RESYNC
        self._messages.append(message)
        self._arrived.set()

    async def get(self, timeout: float) -> dict[str, Any] | None:
        """The next message, or None after `timeout` seconds."""
        if not self._messages:
            self._arrived.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._arrived.wait()
            except TimeoutError:
                return None
        return self._messages.popleft()


class RunBus:
    """The subscriptions of one event loop, on one Redis connection (see the module's doc)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.local: dict[str, set[Subscription]] = {}
        self.confirmed: set[str] = set()
        self.pending: dict[str, list[asyncio.Future[None]]] = {}
        self.connected = False
        self.lost = False
        self.connection: redis.asyncio.Connection | None = None
        self.wanted = asyncio.Event()
        # Set while connected, and after each failed attempt: what a new subscriber waits for.
        self.settled = asyncio.Event()
        self.runner: asyncio.Task | None = None

    async def subscribe(self, names: Iterable[str]) -> Subscription:
        """A local subscription to `names` (`jobs.events` names); returns once Redis has
        confirmed it, or after CONFIRM_TIMEOUT_S with `live` false (the caller polls)."""
        channels = tuple(channel_name(name) for name in names)
        subscription = Subscription(self, channels)
        waits: list[asyncio.Future[None]] = []
        new: list[str] = []
        for channel in channels:
            self.local.setdefault(channel, set()).add(subscription)
            if channel in self.confirmed:
                continue
            waiting = asyncio.get_running_loop().create_future()
            if channel not in self.pending:
                new.append(channel)
            self.pending.setdefault(channel, []).append(waiting)
            waits.append(waiting)
        self._start()
        if not self.connected:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CONFIRM_TIMEOUT_S):
                    await self.settled.wait()
        if not self.connected:
            return subscription  # Redis is down: the subscriber polls until RESYNC
        if new:
            # (If the hub has just connected, its own SUBSCRIBE named these already: Redis
            # confirms twice, harmlessly.)
            await self._send("SUBSCRIBE", *new)
        if waits:
            await asyncio.wait(waits, timeout=CONFIRM_TIMEOUT_S)
        return subscription

    async def unsubscribe(self, subscription: Subscription) -> None:
        gone = []
        for channel in subscription.channels:
            subscribers = self.local.get(channel)
            if subscribers is None:
                continue
            subscribers.discard(subscription)
            if not subscribers:
                del self.local[channel]
                self.confirmed.discard(channel)
                gone.append(channel)
        if gone and self.connected:
            await self._send("UNSUBSCRIBE", *gone)

    # --- internals ------------------------------------------------------------------------

    def _start(self) -> None:
        self.wanted.set()
        if self.runner is None or self.runner.done():
            self.runner = asyncio.get_running_loop().create_task(self._run())

    async def _send(self, *command: str) -> None:
        connection = self.connection
        if connection is None:
            return
        try:
            await connection.send_command(*command, check_health=False)
        except (redis.RedisError, OSError):
            # The reader sees the connection fail too, and subscribes again after.
            log.warning("live hub: %s failed", command[0], exc_info=True)

    async def _run(self) -> None:
        delay = RECONNECT_MIN_S
        while True:
            if not self.local:
                self.wanted.clear()
                await self.wanted.wait()
            try:
                await self._connect_and_read()
                delay = RECONNECT_MIN_S
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever failed, the hub must go on
                log.warning("live hub: no Redis (%s); subscribers read the log", exc)
                self.settled.set()
                await asyncio.sleep(delay)
                self.settled.clear()
                delay = min(delay * 2, RECONNECT_MAX_S)

    async def _connect_and_read(self) -> None:
        pool = redis.asyncio.ConnectionPool.from_url(
            self.url,
            protocol=2,  # pub/sub messages as plain replies (RESP3 would push them aside)
            # Generous: under load the event loop itself is late to finish a connection.
            socket_connect_timeout=5,
            socket_timeout=READ_TIMEOUT_S,
            socket_keepalive=True,
        )
        connection = pool.make_connection()
        pinging: asyncio.Task | None = None
        try:
            await connection.connect()
            self.connection = connection
            self.connected = True
            self.settled.set()
            channels = list(self.local)
            for channel in channels:
                self.pending.setdefault(channel, [])
            if channels:
                await connection.send_command("SUBSCRIBE", *channels, check_health=False)
            # After a loss, what was published meanwhile is in the log only.
            resubscribing = set(channels) if self.lost else set()
            self.lost = False
            pinging = asyncio.get_running_loop().create_task(self._ping())
            while True:
                reply = await connection.read_response()
                if not isinstance(reply, list):
                    continue  # PONG, when no channel is subscribed
                kind = reply[0]
                if kind == b"pong":
                    continue
                channel = reply[1].decode()
                if kind == b"message":
                    self._deliver(channel, reply[2])
                elif kind == b"subscribe":
                    if channel in self.local:
                        self.confirmed.add(channel)
                    for waiting in self.pending.pop(channel, []):
                        if not waiting.done():
                            waiting.set_result(None)
                    if channel in resubscribing:
                        resubscribing.discard(channel)
                        for subscription in self.local.get(channel, ()):
                            subscription.put(RESYNC)
        finally:
            if pinging is not None:
                pinging.cancel()
            if self.connected:
                self.connected = False
                self._lost()
            self.connection = None
            await connection.disconnect()
            await pool.disconnect()

    async def _ping(self) -> None:
        while True:
            await asyncio.sleep(PING_S)
            await self._send("PING")

    def _deliver(self, channel: str, data: bytes) -> None:
        subscribers = self.local.get(channel)
        if not subscribers:
            return
        try:
            message = json.loads(data)
        except ValueError:
            log.warning("live hub: a message on %s is not JSON", channel)
            return
        for subscription in subscribers:
            subscription.put(message)

    def _lost(self) -> None:
        self.lost = True
        self.confirmed.clear()
        for subscribers in self.local.values():
            for subscription in subscribers:
                subscription.put(RESYNC)


_buses: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, RunBus] = weakref.WeakKeyDictionary()


def run_bus() -> RunBus:
    """The hub of the running event loop (one per web process)."""
    loop = asyncio.get_running_loop()
    bus = _buses.get(loop)
    if bus is None:
        bus = _buses[loop] = RunBus(redis_url())
    return bus
