"""The bench's own world: its database, its processes, its tenants, and the clean-up of all three.

`bootstrap()` must run before Django is imported anywhere: it points `DATABASE_URL` at the
bench's own database (`switchyard_bench` unless `BENCH_DATABASE_NAME` says otherwise), which it
drops and creates afresh, and gives every broker queue and channel-layer group a private prefix,
so that a bench never touches the development database, `make run`'s queues or a test session's.

`BenchCluster` is the integration tests' `Cluster` (real scheduler, worker and daphne
processes) with the bench's settings and the two baselines (gunicorn, raw Celery). Each process
it starts runs in a session of its own, gets SIGTERM if the bench dies (PR_SET_PDEATHSIG), and
is stopped by `stop_all`, which `atexit` also calls.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import http.client
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "dbname": "postgres"}

_PR_SET_PDEATHSIG = 1


def bench_database() -> str:
    return os.environ.get("BENCH_DATABASE_NAME", "switchyard_bench")


def bootstrap(prefix: str, *, connection_limit: int) -> None:
    """Environment for this process (and the processes it starts), then a fresh database.

    The database refuses more than `connection_limit` connections: PostgreSQL's
    max_connections is shared with whoever else uses the server, and a bench must fail its own
    requests rather than other people's.
    """
    import psycopg
    from psycopg import sql

    name = bench_database()
    if not name.startswith("switchyard_bench"):
        sys.exit(f"BENCH_DATABASE_NAME must start with switchyard_bench (it is dropped): {name}")
    os.environ["DATABASE_URL"] = f"postgres://postgres@127.0.0.1:5432/{name}"
    os.environ["DJANGO_SETTINGS_MODULE"] = "orchestrator.settings"
    os.environ["SWITCHYARD_QUEUE_PREFIX"] = prefix
    os.environ["CHANNEL_LAYER_PREFIX"] = f"{prefix}chan"
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    with psycopg.connect(**PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(
            sql.SQL("CREATE DATABASE {} CONNECTION LIMIT {}").format(
                sql.Identifier(name), sql.Literal(connection_limit)
            )
        )
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", "--noinput", verbosity=0)


def drop_database() -> None:
    """Drop the bench's database (this process's connections first)."""
    import psycopg
    from django.db import connections
    from psycopg import sql

    connections.close_all()
    with psycopg.connect(**PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(bench_database())
            )
        )


def dbos_database() -> str:
    """The DBOS baseline's system database: a scratch database beside the bench's own."""
    return f"{bench_database()}_dbos"


def create_dbos_database(*, connection_limit: int) -> str:
    """Create the DBOS baseline's system database afresh (DBOS migrates it at launch)."""
    import psycopg
    from psycopg import sql

    name = dbos_database()
    with psycopg.connect(**PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(
            sql.SQL("CREATE DATABASE {} CONNECTION LIMIT {}").format(
                sql.Identifier(name), sql.Literal(connection_limit)
            )
        )
    return name


def drop_dbos_database() -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(**PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(dbos_database())
            )
        )


def raise_file_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE towards `wanted` (1,000 SSE clients need a descriptor each)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _child_setup() -> None:  # runs in the child between fork and exec
    os.setsid()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def rss_mb(pid: int) -> float:
    """Resident memory of a process (MiB), from /proc."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (s), from /proc."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def make_cluster(workdir: Path, prefix: str, **env: str):
    """A BenchCluster (imported late: the tests' harness needs Django set up)."""
    from tests.support.cluster import Cluster, Proc, answering_pids, free_port

    class BenchCluster(Cluster):
        """The tests' Cluster with production-like settings, the bench's prefix and baselines."""

        def __init__(self) -> None:
            super().__init__(workdir, workdir / "ledger", **env)
            self.prefix = prefix
            self.env["SWITCHYARD_QUEUE_PREFIX"] = prefix
            self.env["CHANNEL_LAYER_PREFIX"] = f"{prefix}chan"

        def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
            log_path = self.workdir / f"{name}-{len(self.procs)}.log"
            with open(log_path, "wb") as log_file:
                popen = subprocess.Popen(
                    argv,
                    cwd=ROOT,
                    env={**self.env, **(env or {})},
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_child_setup,
                )
            proc = Proc(name, popen, log_path)
            self.procs.append(proc)
            return proc

        def spawn_pools(self, pools: list[tuple[str, int]]) -> Callable[[], None]:
            """A threads worker per (queue, concurrency) of `pools`, spawned together; returns
            the wait until every one of them consumes (so that other processes can boot
            meanwhile)."""
            wanted = Counter(queue for queue, _ in pools)
            before = {queue: self.consumers(queue) for queue in wanted}
            started = [
                (queue, self.spawn_worker(queue, pool="threads", concurrency=concurrency))
                for queue, concurrency in pools
            ]

            def wait() -> None:
                for queue, proc in started:
                    self.wait_until(
                        lambda queue=queue: self.consumers(queue) >= before[queue] + wanted[queue],
                        60,
                        f"worker {proc.name} never consumed {queue}",
                        proc,
                    )

            return wait

        def spawn_web(self, *, processes: int, **env: str) -> Callable[[], str]:
            """The web on 127.0.0.1, spawned as the tests' `start_web` starts it (one daphne, or
            `orchestrator.web` with `processes` daphne children; the connection pools ~20 in
            all); returns the wait until every process answers, which gives its base URL."""
            port = free_port()
            if processes == 1:
                argv = ["daphne", "-b", "127.0.0.1", "-p", str(port)]
                argv.append("orchestrator.asgi:application")
            else:
                argv = ["orchestrator.web", "--processes", str(processes)]
                argv += ["--host", "127.0.0.1", "--port", str(port)]
            proc = self._spawn(
                "web",
                [sys.executable, "-m", *argv],
                env={"DATABASE_POOL_MAX_SIZE": str(-(-20 // processes)), **env},
            )
            base_url = f"http://127.0.0.1:{port}"

            def all_answer() -> bool:
                children = proc.children() if processes > 1 else [proc.pid]
                if len(children) != processes:
                    return False
                try:
                    return answering_pids(base_url, children) == set(children)
                except (OSError, http.client.HTTPException):
                    return False

            def wait() -> str:
                self.wait_until(
                    lambda: _answers(f"{base_url}/healthz"), 30, f"web on {base_url}", proc
                )
                if processes > 1:
                    self.wait_until(all_answer, 30, f"not all {processes} web processes", proc)
                return base_url

            return wait

        def start_gunicorn(self, *, workers: int, threads: int, **env: str) -> str:
            port = free_port()
            proc = self._spawn(
                "gunicorn",
                [
                    sys.executable,
                    "-m",
                    "gunicorn",
                    "bench.sync_app:application",
                    "--bind",
                    f"127.0.0.1:{port}",
                    "--worker-class",
                    "gthread",
                    "--workers",
                    str(workers),
                    "--threads",
                    str(threads),
                    "--backlog",
                    "2048",
                    "--timeout",
                    "120",
                    "--no-control-socket",
                ],
                env=env,
            )
            base_url = f"http://127.0.0.1:{port}"
            self.wait_until(lambda: _answers(f"{base_url}/healthz"), 30, "gunicorn", proc)
            return base_url

        def spawn_celery_baselines(
            self, count: int, *, concurrency: int, name: str = "raw"
        ) -> Callable[[], list[Proc]]:
            """`count` raw Celery workers, spawned together; returns the wait until all of them
            consume."""
            from bench.celery_baseline import QUEUE

            before = self.consumers(QUEUE)
            started = []
            for _ in range(count):
                node = f"{name}-{uuid.uuid4().hex[:6]}"
                proc = self._spawn(
                    f"celery-{name}",
                    [
                        sys.executable,
                        "-m",
                        "celery",
                        "-A",
                        "bench.celery_baseline",
                        "worker",
                        "-Q",
                        self.prefix + QUEUE,
                        "-P",
                        "threads",
                        "-c",
                        str(concurrency),
                        "-n",
                        f"{node}@%h",
                        "--without-gossip",
                        "--without-mingle",
                        "-l",
                        "info",
                    ],
                )
                proc.node = f"{node}@{socket.gethostname()}"  # for remote control
                started.append(proc)

            def wait() -> list[Proc]:
                for proc in started:
                    self.wait_until(
                        lambda: self.consumers(QUEUE) >= before + count,
                        30,
                        "raw Celery worker",
                        proc,
                    )
                return started

            return wait

        def spawn_dbos(self, executor_id: str, deployment, database: str) -> Proc:
            """A DBOS worker process (`bench.dbos_baseline`): it boots, then waits for SIGUSR1
            to launch DBOS (`wait_dbos` waits for either)."""
            from bench.dbos_baseline import database_url

            return self._spawn(
                "dbos",
                [
                    sys.executable,
                    "-m",
                    "bench.dbos_baseline",
                    "--executor-id",
                    executor_id,
                    "--worker-concurrency",
                    str(deployment.dbos_worker_concurrency),
                    "--threads",
                    str(deployment.dbos_executor_threads),
                    "--pool-size",
                    str(deployment.dbos_pool_size),
                    "--polling-interval-s",
                    str(deployment.dbos_polling_interval_s),
                ],
                env={"DBOS_SYSTEM_DATABASE_URL": database_url(database)},
            )

        def wait_dbos(self, proc: Proc, marker: str) -> None:
            """Until the DBOS worker's log says `marker` (BOOTED or READY)."""
            self.wait_until(lambda: marker in proc.log(), 60, "DBOS worker", proc)

        def purge_steps(self) -> None:
            """Empty the step queues, over one broker connection."""
            from tests.support.cluster import STEP_QUEUES

            with self._broker() as conn:
                for queue in STEP_QUEUES:
                    # A channel each: a queue that does not exist closes its channel.
                    with contextlib.suppress(Exception):
                        conn.channel().queue_purge(self.prefix + queue)

        def stop_named(self, *names: str) -> None:
            self.stop_many(
                [p for p in self.procs if p.name.split("-")[0] in names or p.name in names]
            )

        def stop_many(self, procs: list[Proc], grace_s: float = 1.0) -> None:
            """Stop processes together: SIGTERM to every group, SIGKILL to those still alive
            after `grace_s` (one after another, each worker's warm shutdown took a second)."""
            alive = [proc for proc in procs if proc.alive()]
            for proc in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGCONT)
                    os.killpg(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for proc in alive:
                try:
                    proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.popen.wait(timeout=15)

        def delete_queues(self) -> None:
            super().delete_queues()
            from bench.celery_baseline import QUEUE

            with self._broker() as conn, contextlib.suppress(Exception):
                channel = conn.channel()
                channel.queue_delete(self.prefix + QUEUE)
                channel.exchange_delete(self.prefix + QUEUE)

    cluster = BenchCluster()
    atexit.register(cluster.stop_all)
    return cluster


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def new_prefix() -> str:
    return f"bench{uuid.uuid4().hex[:6]}."


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} (after {timeout:g} s)")
