"""Serve the ASGI application from several daphne processes that share one listening socket.

One daphne process runs its event loop and Django's views on one core, and submitting a run is
CPU-bound, so one process caps the API at what one core does. This supervisor is the standard
pre-fork pattern: it binds and listens on the TCP socket itself, then starts N children,
`python -m daphne --fd <fd> orchestrator.asgi:application`, that inherit that socket (Twisted's
`fd:` endpoint adopts a stream socket that is already listening; daphne's `--fd` gives it
AF_INET, so the host must be an IPv4 address or name). Every child accepts on the same socket
and the kernel hands each new connection to one of them.

    python -m orchestrator.web [--host H] [--port P] [--processes N]

The defaults come from HOST (127.0.0.1), PORT (8000) and WEB_PROCESSES (the number of cores, at
most 4). Each child is a whole daphne with its own connection pool (DATABASE_POOL_MAX_SIZE,
passed through with the rest of the environment), so N processes hold up to N times the pool.

The supervisor imports no Django and never accepts a connection. It owns the children's
lifecycle only:

- SIGTERM or SIGINT is forwarded to every child; they get STOP_GRACE_S to finish, then SIGKILL.
- A child that exits while nothing asked it to is started again after a short delay. A child
  that exits within STARTUP_S of starting failed to start (a bad setting, an import error); after
  MAX_EARLY_EXITS of those in a row the supervisor stops the others and exits 1, so a broken
  configuration shows as a stopped process instead of a silent restart loop.
- The children stay in the supervisor's process group (a signal to the group reaches them all)
  and get SIGTERM if the supervisor dies, even by SIGKILL (PR_SET_PDEATHSIG), so no daphne
  outlives it holding the port.

A child stopping does not close the socket for the others: Twisted never shuts down an adopted
socket, it only closes its own descriptor. Connections that arrive while no child is up wait
in the backlog.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from types import FrameType

from orchestrator.env import ConfigError, env_int, env_str

APPLICATION = "orchestrator.asgi:application"
BACKLOG = 2048
MAX_DEFAULT_PROCESSES = 4
STARTUP_S = 10.0
MAX_EARLY_EXITS = 5
# A restart waits this long times the number of early exits in a row (at least once).
RESTART_DELAY_S = 0.5
STOP_GRACE_S = 10.0
POLL_S = 0.1

_PR_SET_PDEATHSIG = 1
try:
    # Loaded here, not in the child between fork and exec, where only the call itself runs.
    _prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
except OSError:  # not Linux with glibc: children then outlive a SIGKILLed supervisor
    _prctl = None


def log(message: str) -> None:
    print(f"web supervisor: {message}", file=sys.stderr, flush=True)


def default_processes() -> int:
    return max(1, min(os.cpu_count() or 1, MAX_DEFAULT_PROCESSES))


def listen(host: str, port: int) -> socket.socket:
    """A listening IPv4 TCP socket on host:port (port 0: one the kernel picks)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(BACKLOG)
    except BaseException:
        listener.close()
        raise
    return listener


def _die_with_supervisor() -> None:  # runs in the child between fork and exec
    # No setsid: the child stays in the supervisor's process group and session.
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _describe(returncode: int) -> str:
    if returncode >= 0:
        return f"code {returncode}"
    with contextlib.suppress(ValueError):
        return signal.Signals(-returncode).name
    return f"signal {-returncode}"


@dataclass
class Slot:
    """One of the N places a daphne child runs in; the child is replaced when it dies."""

    number: int
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restart_at: float = 0.0


class Supervisor:
    """Keeps `processes` daphne children serving `listener` (the module docstring says how)."""

    def __init__(self, listener: socket.socket, processes: int):
        self.listener = listener
        self.slots = [Slot(number) for number in range(1, processes + 1)]
        self.stop_signal: int | None = None
        self.early_exits = 0

    def run(self) -> int:
        """Start the children and keep them running until SIGTERM/SIGINT (0) or until they
        keep failing to start (1)."""
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        for slot in self.slots:
            self._start(slot)
        while self.stop_signal is None:
            if not self._tend(time.monotonic()):
                self._stop_children(signal.SIGTERM)
                return 1
            time.sleep(POLL_S)
        self._stop_children(self.stop_signal)
        return 0

    def _tend(self, now: float) -> bool:
        """Start the children whose (re)start is due, replace those that exited; False to
        give up."""
        for slot in self.slots:
            if slot.process is None:
                if now >= slot.restart_at:
                    self._start(slot)
                continue
            returncode = slot.process.poll()
            if returncode is not None and not self._replace(slot, returncode, now):
                return False
        return True

    def _request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop_signal = signum

    def _start(self, slot: Slot) -> None:
        fd = self.listener.fileno()
        slot.process = subprocess.Popen(
            [sys.executable, "-m", "daphne", "--fd", str(fd), APPLICATION],
            pass_fds=(fd,),  # inherited by the child, with the same number
            preexec_fn=_die_with_supervisor,
        )
        slot.started_at = time.monotonic()
        log(f"daphne {slot.number}/{len(self.slots)} started, pid {slot.process.pid}")

    def _replace(self, slot: Slot, returncode: int, now: float) -> bool:
        """Schedule the restart of a child that exited unasked; False to give up."""
        assert slot.process is not None
        lived_s = now - slot.started_at
        self.early_exits = self.early_exits + 1 if lived_s < STARTUP_S else 0
        exited = (
            f"daphne {slot.number}/{len(self.slots)}, pid {slot.process.pid}, exited "
            f"({_describe(returncode)}) after {lived_s:.1f} s"
        )
        slot.process = None
        if self.early_exits >= MAX_EARLY_EXITS:
            log(
                f"{exited}; giving up: {self.early_exits} daphne processes in a row exited "
                f"within {STARTUP_S:g} s of starting (their output is above)"
            )
            return False
        delay_s = RESTART_DELAY_S * max(1, self.early_exits)
        slot.restart_at = now + delay_s
        log(f"{exited}; restarting it in {delay_s:g} s")
        return True

    def _stop_children(self, signum: int) -> None:
        running = [slot for slot in self.slots if slot.process is not None]
        for slot in running:
            slot.process.send_signal(signum)
        deadline = time.monotonic() + STOP_GRACE_S
        for slot in running:
            try:
                slot.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log(f"daphne pid {slot.process.pid} still running after {STOP_GRACE_S:g} s")
                slot.process.kill()
                slot.process.wait()
            log(
                f"daphne {slot.number}/{len(self.slots)}, pid {slot.process.pid}, stopped "
                f"({_describe(slot.process.returncode)})"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.web",
        description="Serve Switchyard from several daphne processes sharing one socket.",
    )
    try:
        host = env_str("HOST", "127.0.0.1")
        port = env_int("PORT", 8000, minimum=0)
        processes = env_int("WEB_PROCESSES", default_processes(), minimum=1)
    except ConfigError as error:
        parser.error(str(error))
    parser.add_argument("--host", default=host, help=f"IPv4 address or name (default {host})")
    parser.add_argument("--port", type=int, default=port, help=f"TCP port (default {port})")
    parser.add_argument(
        "--processes",
        type=int,
        default=processes,
        help=f"daphne processes (default {processes}: WEB_PROCESSES, or the cores up to "
        f"{MAX_DEFAULT_PROCESSES})",
    )
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error("--processes must be at least 1")

    try:
        listener = listen(args.host, args.port)
    except OSError as error:
        print(
            f"web supervisor: cannot listen on {args.host}:{args.port}: {error.strerror or error}"
            + (" (IPv4 only: daphne --fd adopts AF_INET sockets)" if ":" in args.host else ""),
            file=sys.stderr,
        )
        return 1
    bound_host, bound_port = listener.getsockname()
    log(f"listening on {bound_host}:{bound_port}, {args.processes} daphne processes")
    with contextlib.closing(listener):
        return Supervisor(listener, args.processes).run()


if __name__ == "__main__":
    sys.exit(main())
