"""What every scenario gets: the parameters, the processes, the tenants, and a place to write.

`Bench` starts and stops the Switchyard processes as the scenarios need them, empties the run
tables between scenarios (so that no scenario measures another's leftovers), and, with
`--profile`, records py-spy profiles of the processes while a scenario measures.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.params import Params


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

    # --- processes -----------------------------------------------------------------------

    @property
    def deployment(self):
        return self.params.deployment

    def running(self, name: str) -> list:
        return [p for p in self.cluster.procs if p.alive() and p.name.startswith(name)]

    def start_scheduler(self, **env: str) -> None:
        if self.running("scheduler"):
            return
        proc = self.cluster._spawn(
            "scheduler", [sys.executable, "manage.py", "run_scheduler"], env=env or None
        )
        # Listening means it is between cycles, woken by the next NOTIFY.
        self.cluster.wait_until(_scheduler_listens, 30, "the scheduler never listened", proc)

    def stop_scheduler(self) -> None:
        for proc in self.running("scheduler"):
            self.cluster.stop(proc)

    def start_pools(self) -> None:
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
        if missing:
            self.cluster.start_pools(missing)

    def raw_workers(self) -> list:
        """The raw Celery baseline's workers (the llm pool's processes and threads), started
        once."""
        d = self.deployment
        for _ in range(d.llm_processes - len(self.running("celery-raw"))):
            self.cluster.start_celery_baseline(concurrency=d.raw_threads // d.llm_processes)
        return self.running("celery-raw")

    def stop_raw_workers(self) -> None:
        for proc in self.running("celery-raw"):
            self.cluster.stop(proc)

    def stop_pools(self) -> None:
        for name in ("llm", "tool", "retrieval"):
            for proc in self.running(name):
                self.cluster.stop(proc)

    def start_web(self, *, fresh: bool = False, processes: int | None = None, **env: str) -> str:
        """The web: `processes` daphne processes behind one socket (default: the deployment's
        `web_processes`). The running one is kept when it has the same processes and `env`;
        otherwise, or when `fresh` (a scenario that measures the web starts from a new one),
        it is restarted."""
        processes = processes or self.deployment.web_processes
        if (
            not fresh
            and self.web_url
            and self.running("web")
            and env == self.web_env
            and processes == self.web_processes
        ):
            return self.web_url
        self.stop_web()
        # The cluster sizes the web's connection pools as `make run` does: ~20 in all.
        self.web_url = self.cluster.start_web(processes=processes, **env)
        self.web_env = env
        self.web_processes = processes
        return self.web_url

    def web_pids(self) -> list[int]:
        """The daphne processes serving the API: the web process itself, or the children of
        its supervisor (`orchestrator.web`) when it runs several."""
        web = self.running("web")[0]
        return web.children() if self.web_processes > 1 else [web.pid]

    def stop_web(self) -> None:
        for proc in self.running("web"):
            self.cluster.stop(proc)
        self.web_url = None

    def start_switchyard(self, **scheduler_env: str) -> str:
        self.start_scheduler(**scheduler_env)
        self.start_pools()
        return self.start_web()

    def stop_switchyard(self) -> None:
        self.stop_scheduler()
        self.stop_pools()

    # --- data ----------------------------------------------------------------------------

    def tenant(self, slug: str, *, lane: str = "standard", weight: int = 1) -> TenantHandle:
        from bench.workload import bench_tenant

        tenant, key = bench_tenant(slug, lane=lane, weight=weight)
        return TenantHandle(tenant, key)

    def reset_runs(self) -> None:
        """Empty every table of runs (steps, attempts, events, approvals, webhooks cascade)."""
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute("TRUNCATE jobs_run CASCADE")
            cursor.execute("VACUUM ANALYZE jobs_steprun")
            cursor.execute("VACUUM ANALYZE jobs_run")
        for queue in ("steps.llm", "steps.tool", "steps.retrieval", "steps.control"):
            self.cluster.purge(queue)

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
