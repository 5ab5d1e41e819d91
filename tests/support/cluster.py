"""Real scheduler, Celery worker and web (daphne) processes for integration tests.

Every process gets the test database, a queue prefix of its own (so tests never consume the
queues of a `make run` on the same machine) and the test tools. Processes run in their own
session so that a test can SIGKILL, SIGSTOP or stop them, and `stop_all` always cleans up. A web
started with several processes is the supervisor `orchestrator.web`, whose daphne children stay
in its process group: what signals the group (`kill`, `stop`, `stop_all`) reaches them too.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
from django.conf import settings
from django.db import connection
from kombu import Connection

ROOT = Path(__file__).resolve().parents[2]
STEP_QUEUES = ("steps.llm", "steps.tool", "steps.retrieval", "steps.control")
OTHER_QUEUES = ("webhooks", "maintenance")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def children(self) -> list[int]:
        """The pids of this process's children (a web supervisor's daphne processes)."""
        with contextlib.suppress(OSError):
            path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
            return [int(pid) for pid in path.read_text().split()]
        return []


def answering_pids(base_url: str, pids: list[int], connections: int = 20) -> set[int]:
    """Which of `pids` accepted connections to `base_url`: `connections` keep-alive
    connections each GET /healthz, one after another, and while all are open the server side
    of each ESTABLISHED connection is looked up in /proc (its socket inode, then the process
    holding it). The kernel spreads connections over the processes, so nothing in the
    application is needed to tell them apart."""
    url = httpx.URL(base_url)
    opened = [
        http.client.HTTPConnection(url.host, url.port, timeout=10) for _ in range(connections)
    ]
    try:
        for conn in opened:
            conn.request("GET", "/healthz")
            conn.getresponse().read()  # answered: a process has accepted the connection
        server_sockets = set()
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            local_port, state, inode = int(fields[1].rsplit(":", 1)[1], 16), fields[3], fields[9]
            if local_port == url.port and state == "01":  # 01: ESTABLISHED
                server_sockets.add(f"socket:[{inode}]")
        answering = set()
        for pid in pids:
            with contextlib.suppress(OSError):
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    with contextlib.suppress(OSError):
                        if os.readlink(fd) in server_sockets:
                            answering.add(pid)
                            break
        return answering
    finally:
        for conn in opened:
            conn.close()


class Cluster:
    def __init__(self, workdir: Path, ledger: Path, **env_overrides: str):
        self.workdir = workdir
        self.ledger = ledger
        self.prefix = f"t{uuid.uuid4().hex[:8]}."
        self.procs: list[Proc] = []
        db = connection.settings_dict
        self.env = {
            **os.environ,
            "DATABASE_URL": (
                f"postgres://{db['USER'] or ''}@{db['HOST'] or '127.0.0.1'}:"
                f"{db['PORT'] or 5432}/{db['NAME']}"
            ),
            "SWITCHYARD_QUEUE_PREFIX": self.prefix,
            "SWITCHYARD_PLUGINS": "tests.support.tools",
            "SWITCHYARD_TEST_LEDGER": str(ledger),
            "SWITCHYARD_SCHEDULER_POLL_S": "0.2",
            "SWITCHYARD_DISPATCH_STALE_S": "3",
            "SWITCHYARD_LEASE_GRACE_S": "1",
            "CHANNEL_LAYER_PREFIX": f"{self.prefix}chan",
            "DATABASE_CONN_MAX_AGE": "0",
            # The pools of start_all_pools, so the scheduler sizes the broker queues to them.
            "SWITCHYARD_POOL_CAPACITY": "steps.llm=8,steps.tool=2,steps.retrieval=2,"
            "steps.control=2",
            "PYTHONUNBUFFERED": "1",
            # Plain http on 127.0.0.1, also for processes started with DEBUG=false (whose
            # production settings would redirect every request to https).
            "SECURE_SSL_REDIRECT": "false",
            **env_overrides,
        }
        if db.get("PASSWORD"):
            self.env["DATABASE_URL"] = self.env["DATABASE_URL"].replace(
                f"{db['USER']}@", f"{db['USER']}:{db['PASSWORD']}@"
            )

    # --- processes ----------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log_path = self.workdir / f"{name}-{len(self.procs)}.log"
        log_file = open(log_path, "wb")  # noqa: SIM115 - owned by the process
        popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**self.env, **(env or {})},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def start_scheduler(self, name: str = "scheduler") -> Proc:
        return self._spawn(name, [sys.executable, "manage.py", "run_scheduler"])

    def start_worker(
        self, queue: str, *, pool: str = "threads", concurrency: int = 4, name: str | None = None
    ) -> Proc:
        before = self.consumers(queue)
        proc = self.spawn_worker(queue, pool=pool, concurrency=concurrency, name=name)
        self.wait_until(
            lambda: self.consumers(queue) > before,
            30,
            f"worker {proc.name} never consumed {queue}",
            proc,
        )
        return proc

    def spawn_worker(
        self, queue: str, *, pool: str = "threads", concurrency: int = 4, name: str | None = None
    ) -> Proc:
        """Start a worker without waiting for it to consume (to start several at once)."""
        name = name or f"{queue.split('.')[-1]}-{uuid.uuid4().hex[:6]}"
        return self._spawn(
            name,
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "orchestrator",
                "worker",
                "-Q",
                self.prefix + queue,
                "-P",
                pool,
                "-c",
                str(concurrency),
                "-n",
                f"{name}@%h",
                "--without-gossip",
                "--without-mingle",
                "-l",
                "info",
            ],
            # As the Procfile: a threads pool borrows from a connection pool; a prefork pool's
            # children must not inherit one.
            env={"DATABASE_POOL_MAX_SIZE": str(min(concurrency, 8)) if pool == "threads" else "0"},
        )

    def start_all_pools(self) -> None:
        self.start_pools(
            [
                ("steps.llm", "threads", 8),
                ("steps.tool", "prefork", 2),
                ("steps.retrieval", "threads", 2),
                ("steps.control", "threads", 2),
                ("webhooks", "threads", 4),
            ]
        )

    def start_pools(self, pools: list[tuple[str, str, int]]) -> list[Proc]:
        """A worker per (queue, pool, concurrency), started together (each takes seconds to
        boot), once every one of them consumes."""
        before = {queue: self.consumers(queue) for queue, _, _ in pools}
        started = [
            (queue, self.spawn_worker(queue, pool=pool, concurrency=concurrency))
            for queue, pool, concurrency in pools
        ]
        for queue, proc in started:
            self.wait_until(
                lambda queue=queue: self.consumers(queue) > before[queue],
                60,
                f"worker {proc.name} never consumed {queue}",
                proc,
            )
        return [proc for _, proc in started]

    def start_web(self, port: int | None = None, *, processes: int = 1, **env: str) -> str:
        """Start the web on 127.0.0.1; returns its base URL once /healthz answers.

        One process is daphne itself. Several are `orchestrator.web`'s supervisor and its
        daphne children (`self.web.children()`), each with a connection pool of 20/processes
        (rounded up), returned once every one of them accepts connections. `env` adds
        variables for this process only (e.g. a short SSE heartbeat).
        """
        port = port or free_port()
        if processes == 1:
            argv = ["daphne", "-b", "127.0.0.1", "-p", str(port), "orchestrator.asgi:application"]
        else:
            argv = ["orchestrator.web", "--processes", str(processes)]
            argv += ["--host", "127.0.0.1", "--port", str(port)]
        proc = self._spawn(
            "web",
            [sys.executable, "-m", *argv],
            # As the Procfile: about 20 connections for the web, whatever its processes.
            env={"DATABASE_POOL_MAX_SIZE": str(-(-20 // processes)), **env},
        )
        base_url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        def all_answer() -> bool:
            children = proc.children()
            if len(children) != processes:
                return False
            try:
                return answering_pids(base_url, children) == set(children)
            except (OSError, http.client.HTTPException):
                return False

        self.wait_until(healthy, 30, f"web on port {port} never answered /healthz", proc)
        if processes > 1:
            self.wait_until(all_answer, 30, f"not all {processes} web processes answered", proc)
        self.web = proc
        return base_url

    def kill(self, proc: Proc, sig: int = signal.SIGKILL) -> None:
        if proc.alive():
            os.killpg(proc.pid, sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                proc.popen.wait(timeout=30)

    def stop(self, proc: Proc) -> None:
        if not proc.alive():
            return
        os.killpg(proc.pid, signal.SIGCONT)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            # A worker's warm shutdown waits for its running steps; tests do not need that.
            proc.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.popen.wait(timeout=15)

    def stop_all(self, grace_s: float = 3.0) -> None:
        """Stop every process at once: SIGTERM to all, SIGKILL to what is left after
        `grace_s` (one at a time, each worker's warm shutdown took seconds)."""
        alive = [proc for proc in self.procs if proc.alive()]
        for proc in alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGCONT)
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in alive:
            try:
                proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in alive:
            # Also whatever the group still holds once its leader is gone (prefork children).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.popen.wait(timeout=15)
        self.delete_queues()

    # --- broker -------------------------------------------------------------------------

    def _broker(self) -> Connection:
        return Connection(settings.CELERY_BROKER_URL, connect_timeout=5)

    def _declare(self, queue: str, passive: bool = True):
        with self._broker() as conn:
            channel = conn.channel()
            try:
                return channel.queue_declare(
                    self.prefix + queue,
                    passive=passive,
                    durable=True,
                    arguments={"x-max-priority": 10},
                )
            except Exception:
                return None

    def consumers(self, queue: str) -> int:
        declared = self._declare(queue)
        return declared.consumer_count if declared else 0

    def depth(self, queue: str) -> int:
        declared = self._declare(queue)
        return declared.message_count if declared else 0

    def purge(self, queue: str) -> int:
        with self._broker() as conn:
            try:
                return conn.channel().queue_purge(self.prefix + queue) or 0
            except Exception:
                return 0

    def delete_queues(self) -> None:
        with self._broker() as conn:
            for queue in (*STEP_QUEUES, *OTHER_QUEUES):
                channel = conn.channel()
                try:
                    channel.queue_delete(self.prefix + queue)
                    channel.exchange_delete(self.prefix + queue)
                except Exception:
                    pass

    # --- waiting ------------------------------------------------------------------------

    def wait_until(self, predicate, timeout: float, message: str, proc: Proc | None = None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if proc is not None and not proc.alive():
                raise AssertionError(f"{message}: {proc.name} exited\n{proc.log()[-3000:]}")
            time.sleep(0.1)
        logs = "\n".join(f"--- {p.name}\n{p.log()[-2000:]}" for p in self.procs)
        raise AssertionError(f"{message} (after {timeout}s)\n{logs}")

    def wait_run(self, run, timeout: float = 60):
        """Wait until `run` is final; returns it refreshed."""
        from jobs.statuses import RUN_FINAL

        def final():
            run.refresh_from_db()
            return run.status in RUN_FINAL

        self.wait_until(final, timeout, f"run {run.public_id} did not finish (is {run.status})")
        return run
