"""The chaos run: a steady mixed load on real processes while faults are injected, then the
invariants are checked over everything that was accepted (docs/reliability.md).

    python -m tests.reliability.chaos --profile full    # `make chaos`, under 10 minutes
    python -m tests.reliability.chaos --profile short   # inside `make test`, about 2 minutes

It is a process of its own, not a pytest session: it starts private PostgreSQL, RabbitMQ and
Redis instances (tests/reliability/services.py), and Django in this process must talk to that
PostgreSQL, so DATABASE_URL and friends are set before Django is set up. The shared services
on the standard ports are never touched. The report (JSON and text) goes to
`reliability/results/`; the exit status is 0 only when every invariant held.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "reliability" / "results"


@dataclass(frozen=True)
class Profile:
    name: str
    rate_per_s: float  # submissions per second, all clients together
    clients: int
    followers: int
    faults: tuple[str, ...]
    gap_s: float  # steady load between two faults
    hold_s: float  # how long an alarm or a second scheduler lasts
    warmup_s: float
    drain_s: float
    recovery_timeout_s: float
    budget_s: float  # the fault phase stops injecting after this long (the run is bounded)
    # Seconds after the load starts at which one tenant submits a burst of map runs, more
    # than its default quota of concurrent steps (workload.MAP_BURST).
    map_bursts: tuple[float, ...] = ()


ALL_FAULTS = (
    "kill_llm_worker",
    "kill_tool_child",
    "kill_tool_worker",
    "kill_retrieval_worker",
    "kill_control_worker",
    "kill_scheduler",
    "two_schedulers",
    "restart_rabbitmq",
    "purge_queues",
    "restart_postgres",
    "crash_postgres",
    "restart_redis",
    "kill_web",
    "pause_worker",
    "pause_worker_long",
    "rabbitmq_alarm",
)

PROFILES = {
    "full": Profile(
        name="full",
        rate_per_s=1.2,
        clients=4,
        followers=3,
        faults=ALL_FAULTS * 3,
        gap_s=2.0,
        hold_s=5.0,
        warmup_s=8.0,
        drain_s=100.0,
        recovery_timeout_s=45.0,
        budget_s=400.0,
        map_bursts=(10.0, 100.0, 190.0, 280.0),
    ),
    "short": Profile(
        name="short",
        rate_per_s=1.0,
        clients=3,
        followers=2,
        # Two schedulers race throughout instead of "two_schedulers"; Redis restarts, memory
        # alarms and the short pause of a tool worker are left to the full profile (the long
        # pause of an LLM worker outlasts the leases too, so its late reports are refused).
        faults=(
            "kill_llm_worker",
            "kill_tool_child",
            "kill_scheduler",
            "purge_queues",
            "restart_rabbitmq",
            "restart_postgres",
            "kill_web",
            "pause_worker_long",
        ),
        gap_s=0.5,
        hold_s=3.0,
        warmup_s=3.0,
        drain_s=90.0,
        recovery_timeout_s=45.0,
        budget_s=150.0,
        map_bursts=(5.0,),
    ),
}

LOAD_TENANTS = ("acme", "globex", "initech")
WORKER_POOLS = {
    # queue: (pool, concurrency, how many workers)
    "steps.llm": ("threads", 4, 2),
    "steps.tool": ("prefork", 2, 2),
    "steps.retrieval": ("threads", 2, 1),
    "steps.control": ("threads", 2, 1),
}


def _log(message: str) -> None:
    print(f"[chaos {datetime.now(UTC):%H:%M:%S}] {message}", flush=True)


@dataclass
class FaultResult:
    name: str
    started_s: float  # since the load started
    recovery_s: float | None
    notes: dict[str, Any] = field(default_factory=dict)
    error: str = ""


class Chaos:
    def __init__(self, profile: Profile, services, workdir: Path, seed: int):
        from tests.support.cluster import Cluster

        self.profile = profile
        self.services = services
        self.workdir = workdir
        self.rng = random.Random(seed)
        self.cluster = Cluster(
            workdir,
            workdir / "ledger",
            SWITCHYARD_PLUGINS="tests.support.tools,tests.reliability.plugin",
            # The production default: connections kept for a minute and health-checked, which
            # is what has to survive a PostgreSQL restart.
            DATABASE_CONN_MAX_AGE="60",
            SWITCHYARD_POOL_CAPACITY=",".join(
                f"{queue}={concurrency * count}"
                for queue, (_, concurrency, count) in WORKER_POOLS.items()
            ),
            LOG_LEVEL="INFO",
            # Steps leased for longer than this are acknowledged when they start: the long
            # step below (it outlasts consumer_timeout) is one, the load's steps are not.
            SWITCHYARD_HELD_DELIVERY_MAX_S=str(self.consumer_timeout_s() * 2 / 3),
        )
        # This process's own transactions (canaries, the special runs, map bursts) leave their
        # steps to the scheduler: its settings are not the cluster's (queue prefix, pool
        # capacity, leases), and what it admitted itself would be published to queues nobody
        # consumes (then re-published by the stale-dispatch sweep, seconds later).
        from django.conf import settings

        settings.SWITCHYARD_DIRECT_ADMISSION = False
        self.workers: dict[str, list] = {queue: [] for queue in WORKER_POOLS}
        self.schedulers: list = []
        self.killed: set[int] = set()  # pids this run SIGKILLed on purpose
        self.stuck: list[str] = []
        self.web_port = 0
        self.base_url = ""
        self.keys: dict[str, str] = {}
        self.special_runs: dict[str, list[str]] = {"poison": [], "long": [], "canary": []}
        self.results: list[FaultResult] = []
        self.t0 = time.monotonic()
        self.canary_baseline: list[float] = []
        self.clients = None
        self.followers = None
        self.map_bursts: list[dict[str, Any]] = []
        self.map_burst_runs: set[str] = set()
        self.seed = seed

    # --- set-up --------------------------------------------------------------------------

    def prepare_database(self) -> None:
        from django.core.management import call_command
        from django.db import connection

        from jobs.services.documents import documents_add
        from jobs.services.workflows import workflow_version_create
        from tenants.services import tenant_create
        from tests.reliability import plugin, workload

        call_command("migrate", verbosity=0, interactive=False)
        with connection.cursor() as cursor:
            cursor.execute(plugin.LEDGER_DDL)
        for slug in (*LOAD_TENANTS, "canary", "special"):
            tenant, issued = tenant_create(slug=slug, name=slug.title(), weight=1)
            self.keys[slug] = issued.raw_key
            documents_add(tenant=tenant, documents=workload.DOCUMENTS)
            for definition in (
                *workload.LOAD_WORKFLOWS,
                workload.CANARY,
                workload.POISON,
                workload.long_step(self.long_step_s()),
            ):
                workflow_version_create(tenant=tenant, document=definition)

    @staticmethod
    def consumer_timeout_s() -> float:
        from tests.reliability.services import CONSUMER_TIMEOUT_MS

        return CONSUMER_TIMEOUT_MS / 1000

    def long_step_s(self) -> float:
        return self.consumer_timeout_s() + 5

    def start_processes(self) -> None:
        self.schedulers.append(self.cluster.start_scheduler("scheduler"))
        if "two_schedulers" not in self.profile.faults:
            self.schedulers.append(self.cluster.start_scheduler("scheduler-2"))
        for queue, (pool, concurrency, count) in WORKER_POOLS.items():
            for _ in range(count):
                self.workers[queue].append(
                    self.cluster.spawn_worker(queue, pool=pool, concurrency=concurrency)
                )
        from tests.support.cluster import free_port

        self.web_port = free_port()
        self.base_url = self.cluster.start_web(self.web_port, SWITCHYARD_SSE_HEARTBEAT_S="2")
        for queue, (_, _, count) in WORKER_POOLS.items():
            self.cluster.wait_until(
                lambda queue=queue, count=count: self.cluster.consumers(queue) >= count,
                60,
                f"the {queue} workers never consumed",
            )

    # --- database access that survives PostgreSQL restarts --------------------------------

    @staticmethod
    def db(func: Callable[[], Any], timeout: float = 60) -> Any:
        from django.db import DatabaseError, InterfaceError, connections

        deadline = time.monotonic() + timeout
        while True:
            try:
                return func()
            except (DatabaseError, InterfaceError):
                connections.close_all()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def submit_direct(self, workflow: str, tenant: str = "canary", **fields) -> str:
        from jobs.selectors import workflow_version_for
        from jobs.transitions.runs import run_create
        from tenants.models import Tenant

        def create() -> str:
            owner = Tenant.objects.get(slug=tenant)
            version = workflow_version_for(tenant=owner, name=workflow, version=None)
            return str(run_create(tenant=owner, version=version, input={}, **fields).public_id)

        return self.db(create)

    def run_status(self, run_id: str) -> str:
        from jobs.models import Run

        return self.db(lambda: Run.objects.get(public_id=run_id).status)

    def in_flight(self) -> dict[int, tuple[str, int]]:
        """Load steps waiting in the broker or running now, with their attempt."""
        from jobs.models import StepRun

        rows = self.db(
            lambda: list(
                StepRun.objects.filter(
                    status__in=("queued", "running"), tenant__slug__in=LOAD_TENANTS
                )
                # A map's own row is `running` while its items run: no worker holds it.
                .exclude(kind="map")
                .values_list("id", "status", "attempt")
            )
        )
        return {pk: (status, attempt) for pk, status, attempt in rows}

    def progressed(self, snapshot: dict[int, tuple[str, int]]) -> bool:
        from jobs.models import StepRun

        if not snapshot:
            return True
        now = self.db(
            lambda: {
                pk: (status, attempt)
                for pk, status, attempt in StepRun.objects.filter(pk__in=snapshot).values_list(
                    "id", "status", "attempt"
                )
            }
        )
        return all(now.get(pk) != before for pk, before in snapshot.items())

    def recovery(self, since: float, snapshot: dict[int, tuple[str, int]]) -> float | None:
        """Seconds from `since` until a canary run has completed and every step that was in
        flight when the fault hit has moved on; None if that takes longer than allowed."""
        canary = self.submit_direct("canary", lane="interactive")
        self.special_runs["canary"].append(canary)
        deadline = since + self.profile.recovery_timeout_s
        canary_done = steps_done = False
        while time.monotonic() < deadline:
            canary_done = canary_done or self.run_status(canary) in ("succeeded", "failed")
            steps_done = steps_done or self.progressed(snapshot)
            if canary_done and steps_done:
                return time.monotonic() - since
            time.sleep(0.1)
        self.stuck = self.describe_stuck(snapshot, canary)
        return None

    def describe_stuck(self, snapshot: dict[int, tuple[str, int]], canary: str) -> list[str]:
        """What kept a recovery from completing (for the report)."""
        from jobs.models import StepRun

        def read() -> list[str]:
            rows = StepRun.objects.filter(pk__in=snapshot) | StepRun.objects.filter(
                run__public_id=canary
            )
            stuck = []
            for step in rows.select_related("run"):
                unmoved = snapshot.get(step.pk) == (step.status, step.attempt)
                if not unmoved and str(step.run.public_id) != canary:
                    continue
                lease = f"{step.lease_expires_at:%H:%M:%S}" if step.lease_expires_at else "-"
                stuck.append(
                    f"{step.run.public_id}:{step.key} {step.status} attempt {step.attempt} "
                    f"worker {step.worker or '-'} lease {lease}"
                )
            return stuck

        return self.db(read)

    # --- processes ---------------------------------------------------------------------------

    def sigkill(self, proc) -> None:
        self.killed.add(proc.pid)
        self.cluster.kill(proc, signal.SIGKILL)

    def replace_worker(self, queue: str, proc) -> None:
        pool, concurrency, _ = WORKER_POOLS[queue]
        self.workers[queue].remove(proc)
        self.workers[queue].append(
            self.cluster.spawn_worker(queue, pool=pool, concurrency=concurrency)
        )

    def busy_worker(self, queue: str, kind: str | None = None):
        """A live worker of `queue` that is running steps now (waits a little for one)."""
        from jobs.models import StepRun

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            running = self.db(
                lambda: list(
                    StepRun.objects.filter(
                        status="running", queue=queue, tenant__slug__in=LOAD_TENANTS
                    )
                    .filter(**({"kind": kind} if kind else {}))
                    .values_list("worker", flat=True)
                )
            )
            for proc in self.workers[queue]:
                if proc.alive() and any(w.startswith(f"{proc.name}@") for w in running):
                    return proc
            time.sleep(0.05)
        alive = [proc for proc in self.workers[queue] if proc.alive()]
        if not alive:
            raise RuntimeError(f"no live worker of {queue} (they died)")
        return alive[0]

    @staticmethod
    def children(pid: int) -> list[int]:
        path = Path(f"/proc/{pid}/task/{pid}/children")
        with contextlib.suppress(OSError):
            return [int(child) for child in path.read_text().split()]
        return []

    # --- faults ------------------------------------------------------------------------------

    def inject(self, name: str) -> FaultResult:
        snapshot = self.in_flight()
        started = time.monotonic()
        result = FaultResult(name, round(started - self.t0, 1), None)
        try:
            since = getattr(self, f"fault_{name}")(result) or started
            result.recovery_s = self.recovery(since, snapshot)
            if result.recovery_s is not None:
                result.recovery_s = round(result.recovery_s, 2)
            else:
                result.error = (
                    f"not recovered within {self.profile.recovery_timeout_s:.0f}s; "
                    f"still stuck: {self.stuck[:6]}"
                )
        except Exception as exc:  # a fault that could not be injected is a failed check
            result.error = f"{type(exc).__name__}: {exc}"
        self.results.append(result)
        _log(f"{name}: recovery {result.recovery_s}s {result.notes} {result.error}")
        return result

    def _kill_worker(self, queue: str, result: FaultResult, kind: str | None = None) -> None:
        proc = self.busy_worker(queue, kind)
        result.notes["running_steps"] = self._running_on(proc)
        self.sigkill(proc)
        self.replace_worker(queue, proc)

    def _running_on(self, proc) -> int:
        from jobs.models import StepRun

        return self.db(
            lambda: StepRun.objects.filter(
                status="running", worker__startswith=f"{proc.name}@"
            ).count()
        )

    def fault_kill_llm_worker(self, result: FaultResult) -> None:
        """SIGKILL a threads-pool worker while it streams LLM deltas."""
        self._kill_worker("steps.llm", result, kind="llm")

    def fault_kill_tool_worker(self, result: FaultResult) -> None:
        self._kill_worker("steps.tool", result)

    def fault_kill_retrieval_worker(self, result: FaultResult) -> None:
        self._kill_worker("steps.retrieval", result)

    def fault_kill_control_worker(self, result: FaultResult) -> None:
        self._kill_worker("steps.control", result)

    def fault_kill_tool_child(self, result: FaultResult) -> None:
        """SIGKILL one child of a prefork pool (its parent replaces it)."""
        from jobs.models import StepRun

        proc = self.busy_worker("steps.tool")
        children = self.children(proc.pid)
        holders = self.db(
            lambda: list(
                StepRun.objects.filter(
                    status="running", worker__startswith=f"{proc.name}@"
                ).values_list("worker", "tenant__slug")
            )
        )
        # The child running a step of the load (not the long step beside it).
        busy = [int(w.rsplit("/", 1)[1]) for w, slug in holders if slug in LOAD_TENANTS]
        victims = [pid for pid in busy if pid in children] or children
        result.notes["running_steps"] = len(busy)
        if victims:
            os.kill(self.rng.choice(victims), signal.SIGKILL)
        result.notes["children"] = len(children)

    def fault_kill_scheduler(self, result: FaultResult) -> float:
        """SIGKILL every scheduler (mid-cycle, maybe between commit and publish)."""
        victims, self.schedulers = self.schedulers, []
        for victim in victims:
            self.sigkill(victim)
        time.sleep(1.0)  # a moment without any scheduler
        for victim in victims:
            self.schedulers.append(self.cluster.start_scheduler(victim.name))
        return time.monotonic()

    def fault_two_schedulers(self, result: FaultResult) -> float:
        """A second scheduler races the first for a while; then one of them is killed."""
        self.schedulers.append(self.cluster.start_scheduler("scheduler-2"))
        time.sleep(self.profile.hold_s)
        victim = self.schedulers.pop(self.rng.randrange(2))
        self.sigkill(victim)
        return time.monotonic()

    def fault_restart_rabbitmq(self, result: FaultResult) -> float:
        self.services.rabbit.restart()
        return time.monotonic()

    def fault_purge_queues(self, result: FaultResult) -> float:
        """Drop every message waiting in the step queues.

        The broker is shallow (a message waits only until a worker slot frees), so the tool
        workers stop consuming (Celery's `cancel_consumer`) until admitted steps pile up in
        their queue; then every step queue is purged and the workers consume again.
        """
        import socket

        from orchestrator.celery import app
        from tests.support.cluster import STEP_QUEUES

        queue = self.cluster.prefix + "steps.tool"
        nodes = [
            f"{proc.name}@{socket.gethostname()}"
            for proc in self.workers["steps.tool"]
            if proc.alive()
        ]
        # A connection of its own: this process's pooled ones may be stale after a RabbitMQ
        # restart, and the first use of one then fails with a reset.
        with app.connection_for_write() as connection:
            control = {"destination": nodes, "reply": True, "timeout": 3}
            app.control.cancel_consumer(queue, connection=connection, **control)
            try:
                until = time.monotonic() + 4.0
                while time.monotonic() < until and self.cluster.depth("steps.tool") < 2:
                    time.sleep(0.1)
                result.notes["purged"] = sum(self.cluster.purge(name) for name in STEP_QUEUES)
            finally:
                app.control.add_consumer(queue, connection=connection, **control)
        return time.monotonic()

    def fault_restart_postgres(self, result: FaultResult) -> float:
        self.services.postgres.restart()
        return time.monotonic()

    def fault_crash_postgres(self, result: FaultResult) -> float:
        self.services.postgres.crash()
        return time.monotonic()

    def fault_restart_redis(self, result: FaultResult) -> float:
        self.services.redis.restart()
        return time.monotonic()

    def fault_kill_web(self, result: FaultResult) -> float:
        """SIGKILL the web process with submissions in flight; clients retry with their key."""
        burst = [
            threading.Thread(target=self._one_submission, args=(tenant,), daemon=True)
            for tenant in LOAD_TENANTS * 3
        ]
        for thread in burst:
            thread.start()
        time.sleep(0.05)
        self.sigkill(self.cluster.web)
        self.cluster.start_web(self.web_port, SWITCHYARD_SSE_HEARTBEAT_S="2")
        back = time.monotonic()
        for thread in burst:
            thread.join(timeout=60)
        return back

    def _one_submission(self, tenant: str) -> None:
        import httpx

        from tests.reliability.workload import load_request

        with httpx.Client(base_url=self.base_url, timeout=10) as client:
            self.clients.submit(client, tenant, load_request(random.Random()))

    def fault_pause_worker(self, result: FaultResult) -> float:
        """SIGSTOP a worker with running steps past their lease, then SIGCONT it: its late
        reports must be refused (fencing)."""
        from jobs.models import AttemptOutcome, StepAttempt
        from tests.reliability.workload import STEP_TIMEOUT_S

        def refused_count() -> int:
            return StepAttempt.objects.filter(outcome=AttemptOutcome.REFUSED).count()

        proc = self.busy_worker("steps.tool")
        result.notes["running_steps"] = self._running_on(proc)
        refused_before = self.db(refused_count)
        os.killpg(proc.pid, signal.SIGSTOP)
        try:
            time.sleep(STEP_TIMEOUT_S + 1 + 3)  # the lease (timeout + grace) and a sweep
        finally:
            os.killpg(proc.pid, signal.SIGCONT)
        resumed = time.monotonic()
        deadline = resumed + 15
        while time.monotonic() < deadline:
            refused = self.db(refused_count)
            if refused > refused_before or not result.notes["running_steps"]:
                break
            time.sleep(0.2)
        result.notes["late_results_refused"] = refused - refused_before
        return resumed

    def fault_pause_worker_long(self, result: FaultResult) -> float:
        """SIGSTOP an LLM worker inside a transaction holding locks (best: a report that
        recorded its tenant's usage and holds the admission lock) for longer than
        PostgreSQL's idle-in-transaction timeout, then SIGCONT it. Meanwhile the other LLM
        worker must keep completing steps, and PostgreSQL must end the stalled transaction
        (progress isolation); the stopped worker's leases run out, so its late reports are
        refused.

        Three times the timeout, as tests/integration/test_worker_pause.py pauses, but short
        of this broker's consumer_timeout: a delivery the stopped worker holds must not
        outlive it (check_special counts that as a failure)."""
        from django.conf import settings
        from django.utils import timezone

        from jobs.models import StepAttempt
        from tests.support.stall import backends_alive, stop_inside_transaction

        idle_s = settings.DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_MS / 1000
        pause_s = min(3 * idle_s, self.consumer_timeout_s() - 5)
        victim = self.busy_worker("steps.llm", kind="llm")
        others = [p.name for p in self.workers["steps.llm"] if p is not victim and p.alive()]
        try:
            held = self.db(
                lambda: stop_inside_transaction(
                    victim.pid,
                    timeout=20,
                    prefer=lambda held: held.writes("tenants_") and bool(held.advisory_locks),
                )
            )
        except TimeoutError:
            held = []
            os.killpg(victim.pid, signal.SIGSTOP)
        paused = timezone.now()
        try:
            time.sleep(pause_s)
            still_open = self.db(lambda: backends_alive([h.backend_pid for h in held]))
        finally:
            os.killpg(victim.pid, signal.SIGCONT)
        resumed_at = time.monotonic()
        resumed = timezone.now()

        def completed_by_others() -> int:
            return StepAttempt.objects.filter(
                worker__regex=r"^(" + "|".join(others) + ")@",
                outcome="succeeded",
                finished_at__gte=paused,
                finished_at__lt=resumed,
            ).count()

        result.notes["paused_s"] = round((resumed - paused).total_seconds(), 1)
        result.notes["held"] = [
            {"tables": len(h.tables), "advisory_locks": len(h.advisory_locks)} for h in held
        ]
        result.notes["others_completed"] = self.db(completed_by_others) if others else 0
        result.notes["stalled_transaction_ended"] = not still_open
        if not result.notes["others_completed"]:
            result.error = f"no other LLM worker completed a step in the {pause_s:.0f}s pause"
        elif still_open:
            result.error = "the stalled transaction outlived the idle-in-transaction timeout"
        return resumed_at

    def fault_rabbitmq_alarm(self, result: FaultResult) -> float:
        """A memory alarm: publishers block. The API must keep accepting runs meanwhile."""
        self.services.rabbit.alarm(True)
        began = time.monotonic()
        try:
            time.sleep(self.profile.hold_s)
        finally:
            self.services.rabbit.alarm(False)
        during = [latency for sent, latency in self.clients.latencies if sent >= began]
        result.notes["submissions_during_alarm"] = len(during)
        result.notes["max_submit_latency_s"] = round(max(during), 3) if during else None
        return time.monotonic()

    # --- map bursts --------------------------------------------------------------------------

    def run_map_bursts(self) -> None:
        """At each of the profile's `map_bursts` offsets, one load tenant (in turn) has
        MAP_BURST_RUNS map runs accepted at once (one transaction: all their map rows wait
        from the same instant, more than the tenant's quota has slots); until they are all
        final (or the next burst), its waiting map rows and its steps in flight are sampled."""
        from django.db import connections

        try:
            self._map_bursts(random.Random(self.seed + 1), self.profile.map_bursts)
        finally:
            connections.close_all()  # this thread's

    def _map_bursts(self, rng: random.Random, offsets: tuple[float, ...]) -> None:
        from django.db import connections

        from tests.reliability.workload import MAP_BURST_RUNS, TOPICS

        for index, offset in enumerate(offsets):
            if self.clients.stopping.wait(max(0.0, self.t0 + offset - time.monotonic())):
                return
            tenant = LOAD_TENANTS[index % len(LOAD_TENANTS)]
            _log(f"map burst: {MAP_BURST_RUNS} runs for {tenant}")
            inputs = [
                {"items": [rng.choice(TOPICS) for _ in range(3)]} for _ in range(MAP_BURST_RUNS)
            ]
            began = time.monotonic()
            run_ids = self.db(lambda tenant=tenant, inputs=inputs: self._accept(tenant, inputs))
            self.map_burst_runs.update(run_ids)
            burst: dict[str, Any] = {
                "tenant": tenant,
                "at_s": round(began - self.t0, 1),
                "runs": len(run_ids),
                "peak_waiting_maps": 0,
                "peak_in_flight": 0,
                "final_after_s": None,
            }
            self.map_bursts.append(burst)
            until = self.t0 + offsets[index + 1] if index + 1 < len(offsets) else began + 120
            while time.monotonic() < until and not self.clients.stopping.is_set():
                try:
                    waiting, in_flight, open_runs = self._burst_sample(tenant, run_ids)
                except Exception:  # PostgreSQL is being restarted: sample again shortly
                    connections.close_all()
                else:
                    burst["peak_waiting_maps"] = max(burst["peak_waiting_maps"], waiting)
                    burst["peak_in_flight"] = max(burst["peak_in_flight"], in_flight)
                    if not open_runs:
                        burst["final_after_s"] = round(time.monotonic() - began, 1)
                        break
                time.sleep(0.25)

    @staticmethod
    def _accept(tenant: str, inputs: list[dict[str, Any]]) -> list[str]:
        """Runs of MAP_BURST for `tenant`, one per input, accepted in one transaction."""
        from django.db import transaction

        from jobs.selectors import workflow_version_for
        from jobs.transitions.runs import run_create
        from tenants.models import Tenant

        owner = Tenant.objects.get(slug=tenant)
        version = workflow_version_for(tenant=owner, name="mapburst", version=None)
        with transaction.atomic():
            return [
                str(run_create(tenant=owner, version=version, input=item).public_id)
                for item in inputs
            ]

    @staticmethod
    def _burst_sample(tenant: str, run_ids: list[str]) -> tuple[int, int, int]:
        """(the tenant's map rows waiting for their items, its steps in flight, the burst's
        runs not final yet)."""
        from django.db.models import Count, Q

        from jobs.models import Run, StepRun
        from jobs.statuses import RUN_FINAL

        counts = StepRun.objects.filter(
            tenant__slug=tenant, status__in=("queued", "running")
        ).aggregate(
            waiting=Count("id", filter=Q(kind="map", map_index__isnull=True)),
            in_flight=Count("id", filter=~Q(kind="map")),
        )
        open_runs = Run.objects.filter(public_id__in=run_ids).exclude(status__in=RUN_FINAL)
        return counts["waiting"], counts["in_flight"], open_runs.count()

    def check_map_bursts(self) -> tuple[dict[str, Any], list[str]]:
        """Every run of a burst succeeded (its workflow injects no failure), and the tenant
        never had more steps in flight than its quota while it was sampled."""
        from jobs.models import Run
        from tenants.models import Tenant

        problems = []
        for burst in self.map_bursts:
            quota = Tenant.objects.get(slug=burst["tenant"]).max_concurrent_steps
            if burst["peak_in_flight"] > quota:
                problems.append(
                    f"{burst['tenant']} had {burst['peak_in_flight']} steps in flight "
                    f"(quota {quota})"
                )
        not_succeeded = Run.objects.filter(public_id__in=self.map_burst_runs).exclude(
            status="succeeded"
        )
        problems += [
            f"map burst run {run.public_id} {run.status}: {run.error[:120]}"
            for run in not_succeeded
        ]
        return {"bursts": self.map_bursts}, problems

    # --- the run -----------------------------------------------------------------------------

    def measure_baseline(self) -> None:
        for _ in range(3):
            started = time.monotonic()
            canary = self.submit_direct("canary", lane="interactive")
            self.special_runs["canary"].append(canary)
            while self.run_status(canary) not in ("succeeded", "failed"):
                time.sleep(0.05)
            self.canary_baseline.append(round(time.monotonic() - started, 2))

    def run(self) -> dict[str, Any]:
        from tests.reliability.workload import Clients, Followers

        profile = self.profile
        _log("preparing the private database")
        self.prepare_database()
        self.services.wait()
        _log("starting web, scheduler and worker pools")
        self.start_processes()
        load_keys = {slug: self.keys[slug] for slug in LOAD_TENANTS}
        self.clients = Clients(
            self.base_url, load_keys, threads=profile.clients, rate_per_s=profile.rate_per_s
        )
        self.followers = Followers(
            self.base_url, load_keys, self.clients, threads=profile.followers
        )
        self.measure_baseline()
        self.t0 = time.monotonic()
        self.clients.start()
        self.followers.start()
        bursts = threading.Thread(target=self.run_map_bursts, daemon=True)
        bursts.start()
        # A poison step and a step longer than consumer_timeout run beside the load.
        for _ in range(2 if profile.name == "full" else 1):
            self.special_runs["poison"].append(self.submit_direct("poison", tenant="special"))
            self.special_runs["long"].append(self.submit_direct("long", tenant="special"))
        time.sleep(profile.warmup_s)
        faults = list(profile.faults)
        if profile.name == "full":
            self.rng.shuffle(faults)
        self.skipped: list[str] = []
        for index, name in enumerate(faults):
            if time.monotonic() - self.t0 > profile.budget_s:
                self.skipped = faults[index:]
                _log(f"time budget spent; skipping {len(self.skipped)} faults")
                break
            _log(f"injecting {name}")
            self.inject(name)
            time.sleep(profile.gap_s)
        load_s = time.monotonic() - self.t0
        _log("stopping the load; draining")
        self.clients.stop()
        bursts.join(timeout=120)
        drained = self.drain()
        self.followers.stop(timeout=30)
        _log("checking the invariants")
        report = self.check()
        report["load_s"] = round(load_s, 1)
        report["drain_s"] = drained
        return report

    def drain(self) -> float | None:
        from jobs.models import Run
        from jobs.statuses import RUN_FINAL

        started = last_note = time.monotonic()
        while time.monotonic() - started < self.profile.drain_s:
            open_runs = self.db(lambda: Run.objects.exclude(status__in=RUN_FINAL).count())
            if not open_runs:
                return round(time.monotonic() - started, 1)
            if time.monotonic() - last_note > 10:
                last_note = time.monotonic()
                _log(f"draining: {open_runs} runs open; steps {self.open_steps()}")
            time.sleep(0.5)
        return None

    def open_steps(self) -> dict[str, int]:
        from django.db.models import Count

        from jobs.models import StepRun

        rows = self.db(
            lambda: list(
                StepRun.objects.exclude(
                    status__in=("succeeded", "failed", "skipped", "cancelled", "pending")
                )
                .values_list("status")
                .annotate(n=Count("id"))
            )
        )
        return dict(rows)

    def check(self) -> dict[str, Any]:
        from jobs.models import Run
        from tests.reliability import checks

        submissions = list(self.clients.submissions)
        special = {run for runs in self.special_runs.values() for run in runs}
        figures: dict[str, Any] = {}
        violations: dict[str, list[str]] = {}
        for name, check in (
            ("runs", lambda: checks.check_runs_final(submissions)),
            ("idempotency", lambda: checks.check_idempotency(submissions)),
            ("ledger", lambda: checks.check_ledger(set())),
            ("event_logs", checks.check_event_logs),
            ("outputs", lambda: checks.check_outputs(special)),
            ("left_behind", checks.check_nothing_left_behind),
            ("api_counts", lambda: checks.check_api_counts(self.base_url, self.keys)),
            (
                "api_details",
                lambda: checks.check_run_details(self.base_url, self.keys, submissions),
            ),
            ("streams", lambda: checks.check_streams(self.followers.followed)),
            ("special", self.check_special),
            ("map_bursts", self.check_map_bursts),
            ("processes", self.check_processes),
        ):
            try:
                figures[name], problems = self.db(check)
            except Exception as exc:
                figures[name], problems = {}, [f"the check raised {type(exc).__name__}: {exc}"]
            if problems:
                violations[name] = problems
        by_fault: dict[str, list[FaultResult]] = {}
        for result in self.results:
            by_fault.setdefault(result.name, []).append(result)
        recovery = {}
        for name, results in by_fault.items():
            times = [r.recovery_s for r in results if r.recovery_s is not None]
            recovery[name] = {
                "injected": len(results),
                "recovered": len(times),
                "p50_s": round(statistics.median(times), 2) if times else None,
                "max_s": max(times) if times else None,
                "notes": [r.notes for r in results],
                "errors": [r.error for r in results if r.error],
            }
            if len(times) < len(results):
                violations.setdefault("recovery", []).extend(
                    f"{name}: {r.error}" for r in results if r.error
                )
            # A fault's own check failed although the system recovered from it.
            failed_checks = [r for r in results if r.error and r.recovery_s is not None]
            if failed_checks:
                violations.setdefault("faults", []).extend(
                    f"{name}: {r.error}" for r in failed_checks
                )
        runs = figures.get("runs", {})
        return {
            "profile": self.profile.name,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "runs_accepted": runs.get("accepted"),
            "runs_completed": runs.get("completed"),
            "runs_lost": runs.get("lost"),
            "duplicate_committed_executions": figures.get("ledger", {}).get(
                "duplicate_committed_executions"
            ),
            "runs_in_database": Run.objects.count(),
            "canary_baseline_s": self.canary_baseline,
            "boot_s": self.services.boot_s,
            "recovery": recovery,
            "faults_skipped": getattr(self, "skipped", []),
            "figures": figures,
            "violations": violations,
            "passed": not violations,
        }

    def check_special(self) -> tuple[dict[str, Any], list[str]]:
        """The poison step failed after its attempts; the long step ran once and succeeded."""
        from jobs.models import Run, StepRun
        from tests.reliability.workload import POISON

        problems = []
        figures: dict[str, Any] = {}
        for run_id in self.special_runs["poison"]:
            run = Run.objects.get(public_id=run_id)
            pill = StepRun.objects.get(run=run, step_id="pill")
            figures.setdefault("poison", []).append(
                {"status": run.status, "attempts": pill.attempt, "error": run.error[:120]}
            )
            # Its worker's death is seen either way: the redelivered message finds the step
            # still running under its token (counted as lost), or, when no worker picks the
            # message up in time (the pool was being restarted), the lease runs out.
            seen_dead = any(
                sign in run.error for sign in ("lost on each", "did not finish within its lease")
            )
            attempts = POISON["steps"][0]["retry"]["max_attempts"]
            if run.status != "failed" or not seen_dead or pill.attempt != attempts:
                problems.append(f"poison run {run_id}: {run.status} {run.error!r}")
        for run_id in self.special_runs["long"]:
            run = Run.objects.get(public_id=run_id)
            slow = StepRun.objects.get(run=run, step_id="slow")
            figures.setdefault("long", []).append(
                {"status": run.status, "attempts": slow.attempt, "duration_s": _duration(slow)}
            )
            if run.status != "succeeded":
                problems.append(f"long-step run {run_id}: {run.status} {run.error!r}")
        # No delivery was held past consumer_timeout (RabbitMQ would have closed the channel
        # and handed the step to another worker while the first still ran it). The long step
        # may still take a second attempt when a fault kills the worker it runs on.
        timed_out = [
            proc.name
            for proc in self.cluster.procs
            if "delivery acknowledgement on channel" in proc.log()
        ]
        figures["consumer_timeouts"] = timed_out
        problems += [f"{name}: a delivery outlived consumer_timeout" for name in timed_out]
        canaries = Run.objects.filter(public_id__in=self.special_runs["canary"])
        failed = [str(run.public_id) for run in canaries if run.status != "succeeded"]
        problems += [f"canary run {run_id} did not succeed" for run_id in failed]
        figures["canaries"] = len(self.special_runs["canary"])
        return figures, problems

    def check_processes(self) -> tuple[dict[str, Any], list[str]]:
        """No process died that the run did not kill (a consumer_timeout, a lost database)."""
        killed = self.killed
        alive = [p for p in self.cluster.procs if p.alive()]
        dead = [p for p in self.cluster.procs if not p.alive() and p.pid not in killed]
        problems = [f"{p.name} exited ({p.popen.returncode}):\n{p.log()[-1500:]}" for p in dead]
        return {"alive": len(alive), "killed_by_the_run": len(killed)}, problems


def _duration(step) -> float | None:
    if step.started_at and step.finished_at:
        return round((step.finished_at - step.started_at).total_seconds(), 1)
    return None


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"Switchyard chaos report ({report['profile']} profile, {report['finished_at']})",
        f"runs accepted: {report['runs_accepted']}   completed: {report['runs_completed']}   "
        f"lost: {report['runs_lost']}   duplicate committed executions: "
        f"{report['duplicate_committed_executions']}",
        f"load {report.get('load_s')}s, drained in {report.get('drain_s')}s; canary baseline "
        f"{report['canary_baseline_s']}s; boot {report['boot_s']}",
        "",
        f"{'fault':<24}{'n':>3}{'ok':>4}{'P50 s':>8}{'max s':>8}  notes",
    ]
    for name, row in sorted(report["recovery"].items()):
        notes = "; ".join(json.dumps(n, sort_keys=True) for n in row["notes"] if n)
        lines.append(
            f"{name:<24}{row['injected']:>3}{row['recovered']:>4}"
            f"{_num(row['p50_s']):>8}{_num(row['max_s']):>8}  {notes[:150]}"
        )
    lines.append("")
    for name, figures in report["figures"].items():
        lines.append(f"{name}: {json.dumps(figures, sort_keys=True, default=str)[:300]}")
    lines.append("")
    if report["violations"]:
        lines.append("VIOLATIONS")
        for name, problems in report["violations"].items():
            for problem in problems[:10]:
                lines.append(f"  {name}: {problem[:400]}")
            if len(problems) > 10:
                lines.append(f"  {name}: ... and {len(problems) - 10} more")
    else:
        lines.append("every invariant held")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="short")
    parser.add_argument("--report", type=Path, default=None, help="JSON report path")
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--keep", action="store_true", help="keep the process logs")
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]

    from tests.reliability.services import PrivateServices

    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="sy-chaos-"))
    services = PrivateServices()
    chaos = None
    try:
        _log(f"starting private PostgreSQL, RabbitMQ and Redis ({profile.name} profile)")
        services.start()
        os.environ.update(services.env())
        os.environ["SWITCHYARD_PLUGINS"] = "tests.support.tools,tests.reliability.plugin"
        # Development mode and a shared key for this process and the ones it starts.
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
        import logging

        import django

        django.setup()
        logging.getLogger("httpx").setLevel(logging.WARNING)
        chaos = Chaos(profile, services, workdir, args.seed)
        report = chaos.run()
    finally:
        if chaos is not None:
            with contextlib.suppress(Exception):
                chaos.cluster.stop_all()
            if chaos.clients is not None:
                chaos.clients.stopping.set()
            if chaos.followers is not None:
                chaos.followers.stopping.set()
        with contextlib.suppress(Exception):
            from django.db import connections

            connections.close_all()
        services.stop()
    report["wall_s"] = round(time.monotonic() - started, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = args.report or RESULTS / f"chaos-{profile.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
    text = format_report(report)
    path.with_suffix(".txt").write_text(text + "\n")
    print(text, flush=True)
    if args.keep or not report["passed"]:
        print(f"process logs: {workdir}", flush=True)
    else:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
