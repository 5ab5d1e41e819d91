"""Real scheduler, Celery worker and web (daphne) processes for integration tests.

Every process gets the test database, a queue prefix of its own (so tests never consume the
queues of a `make run` on the same machine) and the test tools. Processes run in their own
session so that a test can SIGKILL, SIGSTOP or stop them, and `stop_all` always cleans up.
"""

from __future__ import annotations

import contextlib
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

    def start_web(self, port: int | None = None, **env: str) -> str:
        """Start a daphne web process on 127.0.0.1; returns its base URL once /healthz answers.

        `env` adds variables for this process only (e.g. a short SSE heartbeat).
        """
        port = port or free_port()
        proc = self._spawn(
            "web",
            [
                sys.executable,
                "-m",
                "daphne",
                "-b",
                "127.0.0.1",
                "-p",
                str(port),
                "orchestrator.asgi:application",
            ],
            env={"DATABASE_POOL_MAX_SIZE": "20", **env},  # as the Procfile
        )
        base_url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        self.wait_until(healthy, 30, f"web on port {port} never answered /healthz", proc)
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
        from jobs.models import RUN_FINAL

        def final():
            run.refresh_from_db()
            return run.status in RUN_FINAL

        self.wait_until(final, timeout, f"run {run.public_id} did not finish (is {run.status})")
        return run
