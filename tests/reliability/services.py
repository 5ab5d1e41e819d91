"""Private PostgreSQL, RabbitMQ and Redis instances for the chaos suite.

Faults are injected into these, never into the shared services on the standard ports (other
test sessions use those). Each instance lives in a temporary directory, listens on a free
port picked at start (so that two chaos runs on one machine do not meet), and is stopped by
`stop()`; everything started is also killed by pid at exit, so an
aborted run leaves nothing behind. Nothing here ever signals a process it did not start.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

from tests.support.cluster import free_port

# RabbitMQ closes a channel whose delivery is unacknowledged for this long; low so
# that a step can outlast it within the chaos run.
CONSUMER_TIMEOUT_MS = 15_000


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait(predicate, timeout: float, what: str) -> float:
    """Wait until `predicate()`; returns the seconds it took."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{what} (after {timeout:.0f}s)")
        time.sleep(0.1)
    return time.monotonic() - started


def _kill_pid(pid: int | None, sig: int = signal.SIGKILL) -> None:
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _owned_tempdir(prefix: str, owner: str | None) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if owner and os.geteuid() == 0:
        shutil.chown(path, owner, owner)
        path.chmod(0o700)
    return path


def _as(user: str | None) -> list[str]:
    """Run as `user` when we are root (initdb and RabbitMQ refuse to run as root)."""
    return ["runuser", "-u", user, "--"] if user and os.geteuid() == 0 else []


class PrivatePostgres:
    """`initdb` into a temporary directory, trust auth, a Unix socket of its own."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.user = "postgres" if os.geteuid() == 0 else None
        self.bindir = Path(sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1])
        self.root = _owned_tempdir("sy-chaos-pg-", self.user)
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.pid: int | None = None

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/switchyard_chaos"

    def _ctl(self, *args: str, check: bool = True) -> None:
        # The server inherits pg_ctl's output unless told `-l`: never hand it a pipe that
        # subprocess would wait on for EOF.
        with open(self.root / "pg_ctl.log", "ab") as out:
            subprocess.run(
                [*_as(self.user), str(self.bindir / "pg_ctl"), "-D", str(self.data), *args],
                check=check,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=120,
            )

    def start(self) -> float:
        started = time.monotonic()
        if not self.data.exists():
            subprocess.run(
                [
                    *_as(self.user),
                    str(self.bindir / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                ],
                check=True,
                capture_output=True,
                timeout=120,
            )
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=300 -c shared_buffers=64MB"
        )
        self._ctl("-o", options, "-l", str(self.log), "-w", "-t", "60", "start")
        self.pid = _read_pid(self.data / "postmaster.pid")
        _wait(lambda: _port_open(self.port), 30, "private PostgreSQL never listened")
        return time.monotonic() - started

    def create_database(self) -> None:
        subprocess.run(
            [
                str(self.bindir / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "switchyard_chaos",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def restart(self) -> None:
        """A fast restart: every connection is dropped, open transactions roll back."""
        self._ctl("-m", "fast", "-l", str(self.log), "-w", "-t", "60", "restart")
        self.pid = _read_pid(self.data / "postmaster.pid")

    def crash(self) -> None:
        """SIGKILL the postmaster (its backends follow), then start: crash recovery."""
        pid = self.pid
        _kill_pid(pid)
        _wait(lambda: not _pid_alive(pid), 10, "postmaster did not die")
        # Orphaned backends exit once they notice the postmaster is gone; until then a new
        # postmaster refuses to start (the old shared memory is still attached).
        deadline = time.monotonic() + 30
        while True:
            try:
                self.start()
                return
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def stop(self) -> None:
        if self.data.exists():
            self._ctl("-m", "immediate", "-w", "-t", "30", "stop", check=False)
        _kill_pid(_read_pid(self.data / "postmaster.pid"))
        shutil.rmtree(self.root, ignore_errors=True)


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (not yet reaped by its parent) counts as dead.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    return False


class PrivateRabbit:
    """A second RabbitMQ node (`chaos-<random>@localhost`) with its own ports, data and
    config.

    It shares the machine's epmd and Erlang cookie with the standard node, which is how
    rabbitmqctl reaches it; the management and prometheus plugins are off.
    """

    def __init__(
        self,
        *,
        node: str | None = None,
        port: int | None = None,
        dist_port: int | None = None,
        consumer_timeout_ms: int = CONSUMER_TIMEOUT_MS,
    ):
        self.node = node or f"chaos-{uuid.uuid4().hex[:8]}@localhost"
        self.port = port = port or free_port()
        self.dist_port = dist_port = dist_port or free_port()
        self.user = "rabbitmq" if os.geteuid() == 0 else None
        self.root = _owned_tempdir("sy-chaos-rmq-", self.user)
        self.pid_file = self.root / "node.pid"
        config = self.root / "rabbitmq.conf"
        config.write_text(
            f"listeners.tcp.default = 127.0.0.1:{port}\n"
            f"consumer_timeout = {consumer_timeout_ms}\n"
            "loopback_users = none\n"
            "log.console = false\n"
        )
        # RabbitMQ checks consumer timeouts on its channel tick (every 60 s by default): tick
        # every second so that a delivery held past the timeout is caught at once.
        (self.root / "advanced.config").write_text("[{rabbit, [{channel_tick_interval, 1000}]}].\n")
        (self.root / "enabled_plugins").write_text("[].\n")
        (self.root / "rabbitmq-env.conf").write_text("")
        if self.user:
            for path in self.root.iterdir():
                shutil.chown(path, self.user, self.user)
        self.env = {
            "HOME": "/var/lib/rabbitmq" if self.user else os.environ.get("HOME", "/tmp"),
            "RABBITMQ_CONF_ENV_FILE": str(self.root / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_CONFIG_FILE": str(config),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.root / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }
        self.pid: int | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def ctl(self, *args: str, timeout: float = 60) -> str:
        result = subprocess.run(
            ["rabbitmqctl", "-n", self.node, *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return result.stdout

    def start(self) -> float:
        if _port_open(self.port) or _port_open(self.dist_port):
            raise RuntimeError(
                f"port {self.port} or {self.dist_port} is taken: another chaos run, or a "
                f"leftover node (rabbitmqctl -n {self.node} stop)"
            )
        started = time.monotonic()
        subprocess.run(
            [
                *_as(self.user),
                "env",
                *(f"{key}={value}" for key, value in self.env.items()),
                "/usr/lib/rabbitmq/bin/rabbitmq-server",
                "-detached",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        _wait(lambda: _port_open(self.port), 90, "private RabbitMQ never listened")
        self.pid = _read_pid(self.pid_file)
        return time.monotonic() - started

    def restart(self) -> None:
        """Stop and start the RabbitMQ application: every connection drops; durable queues
        and persistent messages survive."""
        self.ctl("stop_app")
        self.ctl("start_app")
        _wait(lambda: _port_open(self.port), 60, "private RabbitMQ did not come back")

    def alarm(self, on: bool) -> None:
        """A memory alarm: RabbitMQ blocks every publishing connection while it lasts."""
        self.ctl("set_vm_memory_high_watermark", "0.0001" if on else "0.4")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.ctl("stop", timeout=30)
        _kill_pid(self.pid)
        shutil.rmtree(self.root, ignore_errors=True)


class PrivateRedis:
    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="sy-chaos-redis-"))
        self.pid_file = self.root / "redis.pid"
        self.pid: int | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> float:
        if _port_open(self.port):
            raise RuntimeError(f"port {self.port} is taken (a leftover chaos Redis?)")
        started = time.monotonic()
        subprocess.run(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "yes",
                "--dir",
                str(self.root),
                "--pidfile",
                str(self.pid_file),
                "--logfile",
                str(self.root / "redis.log"),
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        _wait(lambda: _port_open(self.port), 30, "private Redis never listened")
        _wait(lambda: _read_pid(self.pid_file) is not None, 10, "private Redis wrote no pid")
        self.pid = _read_pid(self.pid_file)
        return time.monotonic() - started

    def restart(self) -> None:
        """SIGKILL and start again: every connection drops and what Redis held is gone."""
        pid = self.pid
        _kill_pid(pid)
        _wait(lambda: not _pid_alive(pid), 10, "private Redis did not die")
        _wait(lambda: not _port_open(self.port), 10, "private Redis port stays open")
        self.pid_file.unlink(missing_ok=True)
        self.start()

    def stop(self) -> None:
        _kill_pid(self.pid)
        shutil.rmtree(self.root, ignore_errors=True)


class PrivateServices:
    """The three private instances, stopped at the end whatever happens."""

    def __init__(self):
        self.postgres = PrivatePostgres()
        self.rabbit = PrivateRabbit()
        self.redis = PrivateRedis()
        self.boot_s: dict[str, float] = {}
        self._rabbit_error: Exception | None = None
        atexit.register(self.stop)

    def start(self) -> None:
        """Start all three; RabbitMQ boots (several seconds) in the background: `wait()`."""
        self._rabbit_boot = threading.Thread(target=self._start_rabbit, daemon=True)
        self._rabbit_boot.start()
        self.boot_s["redis"] = round(self.redis.start(), 2)
        self.boot_s["postgres"] = round(self.postgres.start(), 2)
        self.postgres.create_database()

    def _start_rabbit(self) -> None:
        try:
            self.boot_s["rabbitmq"] = round(self.rabbit.start(), 2)
        except Exception as exc:  # reported by wait()
            self._rabbit_error = exc

    def wait(self) -> None:
        self._rabbit_boot.join(timeout=120)
        if self._rabbit_error is not None or "rabbitmq" not in self.boot_s:
            raise RuntimeError(f"private RabbitMQ did not start: {self._rabbit_error}")

    def env(self) -> dict[str, str]:
        return {
            "DATABASE_URL": self.postgres.url,
            "BROKER_URL": self.rabbit.url,
            "REDIS_URL": self.redis.url,
        }

    def stop(self) -> None:
        for service in (self.rabbit, self.redis, self.postgres):
            with contextlib.suppress(Exception):
                service.stop()
