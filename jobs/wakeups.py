"""Waking the scheduler: at most one NOTIFY per process per `SWITCHYARD_WAKE_INTERVAL_S`.

The scheduler sleeps on `LISTEN switchyard_ready` between cycles (and polls as a fallback).
The transitions that make its work possible (a claim that frees a queued slot while steps
wait, a report or a submission that leaves a step ready) say so in their result, and the
caller asks for a wake-up once its transaction has committed (`wake_after_commit`).

The NOTIFY is not sent inside those transactions: PostgreSQL serialises the commits of every
transaction that notified (a lock held until the commit is on disk), so one per claim and one
per report put a global queue on the hot path. Here a daemon thread of the process sends it
on a connection of its own, as a transaction of its own: the first wake-up after a quiet
interval at once, those that come faster joined into one at the end of the interval. The
scheduler drains every notification when it wakes and then looks at the whole database, so
one NOTIFY per interval loses nothing; a wake-up that cannot be sent (PostgreSQL down, the
process killed) is made up by the scheduler's poll (`SWITCHYARD_SCHEDULER_POLL_S`).
"""

from __future__ import annotations

import logging
import os
import threading

import psycopg
from django.conf import settings
from django.db import connection, transaction

from jobs.events import READY_CHANNEL

log = logging.getLogger(__name__)


class _Waker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = 0
        self._wanted = threading.Event()
        self.sent = 0  # NOTIFYs sent by this process (tests and the bench read it)

    def wake(self) -> None:
        with self._lock:
            if self._pid != os.getpid():  # first use, or a forked child (prefork pools)
                self._wanted = threading.Event()
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="scheduler-waker", daemon=True).start()
        self._wanted.set()

    def _run(self) -> None:
        wanted = self._wanted
        conn: psycopg.Connection | None = None
        while True:
            wanted.wait()
            wanted.clear()
            # A connection that PostgreSQL ended since the last wake-up (a restart, a failover,
            # an operator's pg_terminate_backend) is noticed only when used: try once more on a
            # new one before leaving the wake-up to the scheduler's poll.
            for last_try in (False, True):
                try:
                    if conn is None or conn.closed:
                        conn = channel_connection("switchyard wake-ups")
                    conn.execute("SELECT pg_notify(%s, '')", [READY_CHANNEL])
                    self.sent += 1
                    break
                except Exception as exc:  # noqa: BLE001 - the thread must outlive any failure
                    if conn is not None:
                        conn.close()
                    conn = None
                    if last_try:
                        log.warning(
                            "scheduler wake-up not sent (%s); its poll will see the work", exc
                        )
            # Wake-ups asked for meanwhile are sent together, one interval after this one.
            threading.Event().wait(settings.SWITCHYARD_WAKE_INTERVAL_S)


def channel_connection(name: str) -> psycopg.Connection:
    """An autocommit connection of its own to the settings' database, outside Django's
    connection handling: for LISTEN (the scheduler) and NOTIFY (this module's thread). `name`
    is its `application_name` (what `pg_stat_activity` shows operators)."""
    params = connection.settings_dict
    return psycopg.connect(
        dbname=params["NAME"],
        user=params.get("USER") or None,
        password=params.get("PASSWORD") or None,
        host=params.get("HOST") or None,
        port=params.get("PORT") or None,
        autocommit=True,
        connect_timeout=5,
        application_name=name,
    )


_waker = _Waker()


def wake_after_commit() -> None:
    """Wake the scheduler once the current transaction commits (at once outside one)."""
    transaction.on_commit(_waker.wake)


def notifications_sent() -> int:
    return _waker.sent
