"""CPU time per process kind, read from /proc, as a delta over a measurement.

A process's CPU is its own `utime + stime` (all its threads) plus `cutime + cstime` (the
children it has waited for) plus the same for each live descendant: the whole process tree, so
the daphne children of the web's supervisor count with the web, and PostgreSQL's backends that
exited during a measurement still count, in their postmaster's `cutime`. PostgreSQL and
RabbitMQ are shared services: their figure is the whole server's (every database, every vhost),
which is the bench's own when nothing else runs on the machine.

`Meter` snapshots every kind before and after a block; `per(units)` divides each kind's delta by
the steps (or submissions) the block completed: CPU milliseconds per unit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(comm, ppid, CPU ticks of the process and its waited-for children)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    head, _, rest = raw.rpartition(")")
    fields = rest.split()
    try:
        ticks = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
        return head.partition("(")[2], int(fields[1]), ticks
    except (IndexError, ValueError):
        return None


def _own_ticks(pid: int) -> int:
    """utime + stime alone (no children): for the bench's own process, whose children are
    every process it started."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


def _processes() -> dict[int, tuple[str, int, int]]:
    found = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                found[int(entry.name)] = stat
    return found


def _descendants(roots: Iterable[int], table: dict[int, tuple[str, int, int]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    seen: set[int] = set()
    stack = [pid for pid in roots if pid in table]
    while stack:
        pid = stack.pop()
        if pid not in seen:
            seen.add(pid)
            stack.extend(children.get(pid, ()))
    return seen


def service_roots(comm: str, table: dict[int, tuple[str, int, int]]) -> list[int]:
    """Processes named `comm` whose parent is not: a server's top processes (PostgreSQL's
    postmaster, RabbitMQ's beam.smp)."""
    return [
        pid
        for pid, (name, ppid, _) in table.items()
        if name == comm and table.get(ppid, ("",))[0] != comm
    ]


# What the bench counts besides its own processes: the services every scenario goes through.
SERVICES = {"postgresql": "postgres", "rabbitmq": "beam.smp", "redis": "redis-server"}


@dataclass
class Meter:
    """`kinds()` returns {kind: root pids} of the bench's processes at the time of a snapshot."""

    kinds: Callable[[], dict[str, list[int]]]
    start: dict[str, dict[int, int]] = field(default_factory=dict)
    end: dict[str, dict[int, int]] = field(default_factory=dict)

    def snapshot(self) -> dict[str, dict[int, int]]:
        table = _processes()
        roots = dict(self.kinds())
        for kind, comm in SERVICES.items():
            roots[kind] = service_roots(comm, table)
        found: dict[str, dict[int, int]] = {"bench": {os.getpid(): _own_ticks(os.getpid())}}
        for kind, pids in roots.items():
            if kind == "bench":
                continue
            found[kind] = {pid: table[pid][2] for pid in _descendants(pids, table)}
        return found

    def __enter__(self) -> Meter:
        self.start = self.snapshot()
        return self

    def __exit__(self, *exc) -> None:
        self.end = self.snapshot()

    def seconds(self) -> dict[str, float]:
        """Each kind's CPU seconds between the snapshots (processes of the kind alive at the end;
        one started in between counts from zero)."""
        spent = {}
        for kind, pids in self.end.items():
            before = self.start.get(kind, {})
            ticks = sum(max(0, now - before.get(pid, 0)) for pid, now in pids.items())
            if pids:
                spent[kind] = ticks / TICK
        return spent

    def per(self, units: int, unit: str = "step") -> dict:
        """CPU ms per unit for each kind that has processes, and the total."""
        spent = self.seconds()
        ms = {kind: round(s * 1000 / units, 3) for kind, s in spent.items()} if units else {}
        if units:
            ms["total"] = round(sum(spent.values()) * 1000 / units, 3)
        return {"unit": unit, "units": units, "ms": ms}
