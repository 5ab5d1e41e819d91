"""What every scenario gets: the parameters, the processes, the tenants, and a place to write.

`Bench` starts and stops the Switchyard processes as the scenarios need them, empties the run
tables between scenarios (so that no scenario measures another's leftovers), and, with
`--profile`, records py-spy profiles of the processes while a scenario measures.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.cpu import Meter
from bench.params import Params

# The kind of each process the bench starts, by the first part of its name (`Proc.name`).
PROCESS_KINDS = {"celery": "celery_raw"}


@dataclass
class TenantHandle:
    tenant: Any
    key: str

    @property
    def pk(self) -> int:
        return self.tenant.pk


@dataclass
class Bench:
    params: Params
    cluster: Any
    outdir: Path
    workdir: Path
    profile: bool = False
    web_url: str | None = None
    web_env: dict[str, str] = field(default_factory=dict)
    web_processes: int = 0
    profiles: list[dict[str, Any]] = field(default_factory=list)
    dbos_database: str | None = None
    dbos_client: Any = None
    # The scenarios of this run (`spawn_ahead` boots what the later ones need).
    scenarios: list[str] = field(default_factory=list)

    # --- processes -----------------------------------------------------------------------

    @property
    def deployment(self):
        return self.params.deployment

    def running(self, name: str) -> list:
        return [p for p in self.cluster.procs if p.alive() and p.name.startswith(name)]

    def start_scheduler(self, *, wait: bool = True, **env: str) -> None:
        """The scheduler, unless one runs; with `wait`, once it listens (the next call waits
        for one started without)."""
        self._spawn_scheduler(**env)
        if wait:
            self._wait_scheduler()

    def _spawn_scheduler(self, **env: str) -> None:
        if not self.running("scheduler"):
            self.cluster._spawn(
                "scheduler", [sys.executable, "manage.py", "run_scheduler"], env=env or None
            )

    def _wait_scheduler(self) -> None:
        (proc,) = self.running("scheduler")
        # Listening means it is between cycles, woken by the next NOTIFY.
        self.cluster.wait_until(_scheduler_listens, 30, "the scheduler never listened", proc)

    def stop_scheduler(self) -> None:
        self.cluster.stop_many(self.running("scheduler"))

    def start_pools(self) -> None:
        wait = self._spawn_pools()
        if wait is not None:
            wait()

    def _spawn_pools(self) -> Callable[[], None] | None:
        """The worker pools not running, spawned; the wait until they consume (or None)."""
        d = self.deployment
        per_llm = d.llm_threads // d.llm_processes
        wanted = [("steps.llm", per_llm)] * d.llm_processes + [
            ("steps.tool", d.tool_threads),
            ("steps.retrieval", d.retrieval_threads),
        ]
        missing = []
        for queue in dict(wanted):
            have = len(self.running(queue.split(".")[-1]))
            missing += [item for item in wanted if item[0] == queue][have:]
        return self.cluster.spawn_pools(missing) if missing else None

    def raw_workers(self) -> list:
        """The raw Celery baseline's workers (the llm pool's processes and threads), started
        once."""
        wait = self._spawn_raw_workers()
        if wait is not None:
            wait()
        return self.running("celery-raw")

    def _spawn_raw_workers(self) -> Callable[[], Any] | None:
        d = self.deployment
        missing = d.llm_processes - len(self.running("celery-raw"))
        if missing <= 0:
            return None
        return self.cluster.spawn_celery_baselines(
            missing, concurrency=d.raw_threads // d.llm_processes
        )

    def stop_raw_workers(self) -> None:
        self.cluster.stop_many(self.running("celery-raw"))

    def dbos_workers(self) -> list:
        """The DBOS baseline's worker processes, on its scratch system database (created with
        the first of them), booted once and launched: polling their queue from then on."""
        from bench.dbos_baseline import READY

        wait = self._spawn_dbos_workers()
        if wait is not None:
            wait()
        workers = self.running("dbos")
        waiting = [proc for proc in workers if READY not in proc.log()]
        for proc in waiting:
            os.kill(proc.pid, signal.SIGUSR1)
        for proc in waiting:
            self.cluster.wait_dbos(proc, READY)
        return workers

    def _spawn_dbos_workers(self) -> Callable[[], None] | None:
        """DBOS workers not running, spawned; the wait until they have booted (not launched)."""
        from bench import harness
        from bench.dbos_baseline import BOOTED

        d = self.deployment
        missing = d.dbos_processes - len(self.running("dbos"))
        if missing <= 0:
            return None
        if self.dbos_database is None:
            self.dbos_database = harness.create_dbos_database(
                connection_limit=d.dbos_processes * d.dbos_pool_size + 10
            )
        # Spawned together; each has an executor id of its own.
        started = [
            self.cluster.spawn_dbos(f"dbos-{index + 1}", d, self.dbos_database)
            for index in range(d.dbos_processes - missing, d.dbos_processes)
        ]

        def wait() -> None:
            for proc in started:
                self.cluster.wait_dbos(proc, BOOTED)

        return wait

    def spawn_ahead(self) -> Callable[[], None]:
        """Spawn now the baselines' workers that later scenarios (3 and 4) need, so that they
        boot (seconds of CPU each) while nothing is measured; returns the wait until they have.
        Idle, they cost nothing: raw Celery's wait on the broker, DBOS's wait to be launched
        (`dbos_workers`)."""
        waits = []
        if {"s3", "s4"} & set(self.scenarios):
            waits = [self._spawn_raw_workers(), self._spawn_dbos_workers()]

        def wait() -> None:
            for each in waits:
                if each is not None:
                    each()

        return wait

    def dbos(self):
        """The bench's DBOS client (`bench.dbos_baseline.Client`), once the workers are
        launched (the first created DBOS's tables)."""
        from bench.dbos_baseline import Client

        self.dbos_workers()
        if self.dbos_client is None:
            self.dbos_client = Client(self.dbos_database)
        return self.dbos_client

    def stop_dbos_workers(self) -> None:
        self.cluster.stop_many(self.running("dbos"))

    def close_dbos(self) -> None:
        """Stop the DBOS workers, close the client and drop DBOS's scratch database."""
        from bench import harness

        self.stop_dbos_workers()
        if self.dbos_client is not None:
            self.dbos_client.close()
            self.dbos_client = None
        if self.dbos_database is not None:
            harness.drop_dbos_database()
            self.dbos_database = None

    def stop_pools(self) -> None:
        self.cluster.stop_many([p for n in ("llm", "tool", "retrieval") for p in self.running(n)])

    def start_web(self, *, fresh: bool = False, processes: int | None = None, **env: str) -> str:
        """The web: `processes` daphne processes behind one socket (default: the deployment's
        `web_processes`). The running one is kept when it has the same processes and, if `env`
        is given, the same `env` (a scenario that sets nothing takes the web as it runs);
        otherwise, or when `fresh` (a scenario that measures the web starts from a new one),
        it is restarted."""
        wait = self._spawn_web(fresh=fresh, processes=processes, **env)
        return wait() if wait is not None else self.web_url

    def _spawn_web(
        self, *, fresh: bool = False, processes: int | None = None, **env: str
    ) -> Callable[[], str] | None:
        """As `start_web`, but returns the wait for a web it spawned (None: the running one
        is kept)."""
        processes = processes or self.deployment.web_processes
        if (
            not fresh
            and self.web_url
            and self.running("web")
            and (not env or env == self.web_env)
            and processes == self.web_processes
        ):
            return None
        self.stop_web()
        wait_web = self.cluster.spawn_web(processes=processes, **env)
        self.web_env = env
        self.web_processes = processes

        def wait() -> str:
            self.web_url = wait_web()
            return self.web_url

        return wait

    def web_pids(self) -> list[int]:
        """The daphne processes serving the API: the web process itself, or the children of
        its supervisor (`orchestrator.web`) when it runs several."""
        web = self.running("web")[0]
        return web.children() if self.web_processes > 1 else [web.pid]

    def stop_web(self) -> None:
        self.cluster.stop_many(self.running("web"))
        self.web_url = None

    def start_switchyard(self, **web_env: Any) -> str:
        """The scheduler, the pools and the web (`web_env` as `start_web`), those not running
        started together: each takes seconds to boot. Returns the web's URL."""
        return self.spawn_switchyard(**web_env)()

    def spawn_switchyard(self, **web_env: Any) -> Callable[[], str]:
        """As `start_switchyard`, but returns at once the wait until everything is ready
        (which gives the web's URL), so that the bench can start something else meanwhile."""
        self._spawn_scheduler()
        wait_pools = self._spawn_pools()
        wait_web = self._spawn_web(**web_env)

        def wait() -> str:
            if wait_pools is not None:
                wait_pools()
            url = wait_web() if wait_web is not None else self.web_url
            self._wait_scheduler()
            return url

        return wait

    def stop_switchyard(self) -> None:
        self.cluster.stop_many(
            [p for n in ("scheduler", "llm", "tool", "retrieval") for p in self.running(n)]
        )

    # --- CPU -----------------------------------------------------------------------------

    def cpu_meter(self) -> Meter:
        """CPU per process kind over a block (`with bench.cpu_meter() as cpu: ...`, then
        `cpu.per(steps)`)."""
        return Meter(self._process_kinds)

    def _process_kinds(self) -> dict[str, list[int]]:
        kinds: dict[str, list[int]] = {}
        for proc in self.cluster.procs:
            if proc.alive():
                prefix = proc.name.split("-")[0]
                kinds.setdefault(PROCESS_KINDS.get(prefix, prefix), []).append(proc.pid)
        return kinds

    # --- data ----------------------------------------------------------------------------

    def tenant(self, slug: str, *, lane: str = "standard", weight: int = 1) -> TenantHandle:
        from bench.workload import bench_tenant

        tenant, key = bench_tenant(slug, lane=lane, weight=weight)
        return TenantHandle(tenant, key)

    def reset_runs(self) -> None:
        """Empty every table of runs (steps, attempts, events, approvals, webhooks cascade).

        A step still reporting (a phase that ran out of time) can deadlock with the TRUNCATE,
        which PostgreSQL resolves by failing one side: the TRUNCATE is tried again."""
        from django.db import OperationalError, connection

        for attempt in range(5):
            try:
                with connection.cursor() as cursor:
                    cursor.execute("TRUNCATE jobs_run CASCADE")
                break
            except OperationalError:
                if attempt == 4:
                    raise
                time.sleep(0.5)
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE jobs_steprun")
            cursor.execute("VACUUM ANALYZE jobs_run")
        self.cluster.purge_steps()

    @staticmethod
    def wake_scheduler() -> None:
        from django.db import connection

        from jobs.events import READY_CHANNEL

        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, '')", [READY_CHANNEL])

    # --- profiling -----------------------------------------------------------------------

    @contextlib.contextmanager
    def profiled(self, label: str, names: tuple[str, ...]) -> Iterator[None]:
        """With --profile: py-spy records the named processes while the block runs."""
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not self.profile or not Path(spy).exists():
            yield
            return
        folder = self.outdir / "profiles"
        folder.mkdir(exist_ok=True)
        targets = []
        for name in names:
            for proc in self.running(name):
                # The web's supervisor does no work; its daphne children do.
                pids = self.web_pids() if name == "web" else [proc.pid]
                for index, pid in enumerate(pids):
                    suffix = f"-{index + 1}" if len(pids) > 1 else ""
                    targets.append((folder / f"{label}-{proc.name}{suffix}.txt", pid))
        recorders = []
        for path, pid in targets:
            recorders.append(
                (
                    path,
                    subprocess.Popen(
                        [
                            spy,
                            "record",
                            "-p",
                            str(pid),
                            "-f",
                            "raw",
                            "-r",
                            "100",
                            "-o",
                            str(path),
                            "--nonblocking",
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        start_new_session=True,
                    ),
                )
            )
        try:
            yield
        finally:
            for path, recorder in recorders:
                with contextlib.suppress(ProcessLookupError):
                    recorder.send_signal(2)  # SIGINT: py-spy writes what it has
                try:
                    recorder.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    recorder.kill()
                    recorder.wait()
                if path.exists() and path.stat().st_size:
                    from bench.profiles import summarise

                    self.profiles.append(
                        {"file": str(path.relative_to(self.outdir)), **summarise(path)}
                    )


def _scheduler_listens() -> bool:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND query LIKE 'LISTEN %%' AND pid <> pg_backend_pid()"
        )
        return cursor.fetchone()[0] > 0
