"""Stalling a process while it holds database locks: the worst instant to SIGSTOP it.

A process stopped between two statements of a transaction keeps that transaction open, and
with it every row lock it took, until PostgreSQL's idle-in-transaction timeout ends the
session. `stop_inside_transaction` SIGSTOPs a process at such an instant: it stops the
process, looks its database sessions up in `pg_stat_activity` and `pg_locks`, and keeps it
stopped if one of them is inside a transaction that has written or locked rows (of given
tables, if asked); if not, it lets the process go on for a few milliseconds and tries again.

A process's sessions are found without anything in the application: each TCP connection it
holds to PostgreSQL's port is looked up in /proc (its socket inodes, then their local ports),
and PostgreSQL reports each session's client port.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from django.db import connection


@dataclass(frozen=True)
class HeldTransaction:
    backend_pid: int  # PostgreSQL's process serving the stalled session
    state: str
    wait_event: str | None  # ClientRead: waiting for the (stopped) client
    query: str  # the last statement it was given
    tables: tuple[str, ...]  # tables whose rows it wrote or locked
    advisory_locks: tuple[int, ...]  # keys of the advisory locks it holds

    def writes(self, prefix: str) -> bool:
        """Whether it wrote or locked rows of a table whose name starts with `prefix`."""
        return any(table.startswith(prefix) for table in self.tables)


def client_ports(pid: int, db_port: int) -> set[int]:
    """Local ports of `pid`'s TCP connections to `db_port` (on any address)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, remote, inode = fields[1], fields[2], fields[9]
                if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == db_port:
                    ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def held_transactions(pid: int) -> list[HeldTransaction]:
    """`pid`'s database sessions that are inside a transaction holding a transaction id
    (it wrote or locked rows), read from `pg_stat_activity` through this process's
    connection."""
    ports = client_ports(pid, int(connection.settings_dict["PORT"] or 5432))
    if not ports:
        return []
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT a.pid, a.state, a.wait_event, left(a.query, 200),
                   array_agg(DISTINCT c.relname::text ORDER BY c.relname::text)
                       FILTER (WHERE c.relname IS NOT NULL),
                   array_agg(DISTINCT (l.classid::bigint << 32) | l.objid::bigint)
                       FILTER (WHERE l.locktype = 'advisory' AND l.granted)
            FROM pg_stat_activity a
            LEFT JOIN pg_locks l ON l.pid = a.pid AND (
                 l.locktype = 'advisory'
                 OR (l.locktype = 'relation' AND l.mode IN ('RowShareLock', 'RowExclusiveLock')))
            LEFT JOIN pg_class c ON c.oid = l.relation AND c.relkind IN ('r', 'p')
            WHERE a.datname = current_database() AND a.client_port = ANY(%s)
              AND a.backend_xid IS NOT NULL
            GROUP BY a.pid, a.state, a.wait_event, a.query
            """,
            [sorted(ports)],
        )
        return [
            HeldTransaction(pid, state, wait, query, tuple(tables or ()), tuple(advisory or ()))
            for pid, state, wait, query, tables, advisory in cursor.fetchall()
        ]


def backends_alive(backend_pids: list[int]) -> list[int]:
    """Which of these PostgreSQL backends still serve a session."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", [list(backend_pids)])
        return [row[0] for row in cursor.fetchall()]


def stop_inside_transaction(
    pid: int, *, timeout: float, prefer: Callable[[HeldTransaction], bool] | None = None
) -> list[HeldTransaction]:
    """SIGSTOP the process group of `pid` at an instant when one of its sessions holds row
    locks in an open transaction; returns those transactions. The group stays stopped (the
    caller sends SIGCONT).

    With `prefer`, the first half of `timeout` waits for a transaction that `prefer` accepts
    (the worst instant the caller knows of); after that, any open transaction with row locks
    will do. Raises TimeoutError, with the group running, if no such instant came within
    `timeout` seconds.
    """
    started = time.monotonic()
    rng = random.Random(pid)
    while time.monotonic() - started < timeout:
        picky = prefer is not None and time.monotonic() - started < timeout / 2
        os.killpg(pid, signal.SIGSTOP)
        try:
            if any(not picky or prefer(held) for held in held_transactions(pid)):
                # A statement caught running may have been the COMMIT: keep the stop only if
                # the transaction is still open once the server has finished what it was given
                # and waits for the client (idle in transaction, or between the statements of
                # a pipeline).
                time.sleep(0.05)
                held = [
                    held
                    for held in held_transactions(pid)
                    if held.wait_event == "ClientRead" and (not picky or prefer(held))
                ]
                if held:
                    return held
        except BaseException:
            os.killpg(pid, signal.SIGCONT)
            raise
        os.killpg(pid, signal.SIGCONT)
        time.sleep(rng.uniform(0.005, 0.05))
    raise TimeoutError(f"process {pid} was never caught inside a transaction")
