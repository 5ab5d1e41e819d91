"""Every parameter of every scenario, for a full run and for `QUICK=1`.

The full run uses the sizes the targets are stated for (≤ 10 minutes); the quick run keeps
every scenario and shrinks counts and durations so the whole bench fits in two minutes. Both
are written into the report; the targets are `TARGETS`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Deployment:
    """The processes the bench starts, the same for every Switchyard scenario.

    One process of each kind but the web (`web_processes`) and the llm pool (`llm_processes`),
    threads pools (the step kinds are I/O-bound), sized to fit the bench's share of PostgreSQL
    connections
    (`db_connection_limit`): as in the Procfile, the web processes and each threads pool borrow
    from a connection pool (the web 20 in all, a worker at most 8; DATABASE_POOL_MAX_SIZE), the
    scheduler keeps its connections (DATABASE_CONN_MAX_AGE=60).
    """

    # The synchronous baseline runs 2 gunicorn workers (a process per core), so Switchyard's
    # web is 2 daphne processes behind one socket too (orchestrator.web). Together they keep
    # the one process's 20 connections (`Cluster.start_web` gives each 20 / processes, rounded
    # up). The streams scenario keeps one process (its target is "on one web process").
    web_processes: int = 2
    # The llm pool is `llm_processes` threads workers of `llm_threads / llm_processes` threads
    # each: one process's Python runs on one core at a time (the GIL), and a zero-latency
    # step is mostly the worker's own CPU (claim, report), so one process per core (measured:
    # 2 x 12 threads complete ~40 % more steps/s than 1 x 24 on this 2-core machine).
    llm_processes: int = 2
    llm_threads: int = 24
    tool_threads: int = 12
    retrieval_threads: int = 4
    # The raw Celery baseline runs the same pool: `llm_processes` processes, threads, this
    # concurrency in all.
    raw_threads: int = 24
    # The synchronous baseline: gunicorn gthread, workers x threads = the Switchyard worker
    # threads above (40), so both sides have the same number of slots running workflows.
    gunicorn_workers: int = 2
    gunicorn_threads: int = 20
    # The bench's own database refuses connections past this (CREATE DATABASE ... CONNECTION
    # LIMIT), so that a bench never starves other users of the same PostgreSQL.
    db_connection_limit: int = 70
    # The DBOS Transact baseline (bench.dbos_baseline), configured as DBOS's documentation
    # recommends for throughput: as many processes as the llm pool, each with a unique
    # executor id and a per-process worker_concurrency (no global concurrency: the dequeue is
    # then a READ COMMITTED SKIP LOCKED claim), 12 each so that at most 24 workflows run at
    # once, as the llm pool's and raw Celery's 24 threads; executor threads and a system
    # database pool with room for those workflows and DBOS's own threads; and a 50 ms queue
    # polling interval. The default 1 s would admit at most worker_concurrency workflows per
    # second and process; measured here (3 December, 1,500 one-step and 75 twenty-step
    # workflows): 10 ms polls cost half a core idle and gave no more steps/s than 50 ms (whose
    # bound, 2 x 12 / 0.05 = 480 workflows/s, is above what two cores reach), 100 ms capped
    # the one-step workflows, and 24 workflows per process gave fewer steps/s than 12.
    dbos_processes: int = 2
    dbos_worker_concurrency: int = 12
    dbos_executor_threads: int = 16
    dbos_pool_size: int = 16
    dbos_polling_interval_s: float = 0.05

    def pool_capacity(self) -> str:
        return (
            f"steps.llm={self.llm_threads},steps.tool={self.tool_threads},"
            f"steps.retrieval={self.retrieval_threads},steps.control=2"
        )


@dataclass(frozen=True)
class Motivating:
    users: int = 500
    # Every latency of the workflow and the gateway are divided by this. Compressing time
    # multiplies the rates the engine must sustain (submissions and steps per second) by the
    # same factor while the CPU each costs stays the same: at 1/40 this scenario would ask two
    # cores for ~125 submissions/s and ~750 steps/s, measuring the machine rather than the
    # architecture. At 1/10 (~31 submissions/s, ~190 steps/s) it asks 2.5x the steps/s this
    # machine completes (scenario 4: ~75/s), and Switchyard's queue outgrows the 60 s a client
    # follows a run (29 November: 46 results lost, 319 timeouts; docs/performance.md). At 1/4
    # (12.5 submissions/s, 75 steps/s, 5 s workflows, a 7.5 s gateway) the engine keeps up on
    # this machine, and the synchronous deployment (40 slots of 5 s: 8 workflows/s) is still
    # overloaded by the same arrivals. The quick run keeps 1/10 with 30 users.
    time_divisor: float = 4
    gateway_timeout_real_s: float = 30
    # Users arrive uniformly over this window (real time before scaling: 160 s).
    arrival_real_s: float = 160
    # The gateway's read timeout on a stream (nginx proxy_read_timeout: 60 s) and the SSE
    # heartbeat an operator sets below it (SWITCHYARD_SSE_HEARTBEAT_S), before scaling. Each
    # heartbeat also re-reads the run's log, so it is not set lower than it needs to be.
    proxy_idle_real_s: float = 60
    heartbeat_real_s: float = 40
    # No client waits longer than this for a Switchyard run's end, nor the bench for the
    # server's side of the work (scaled seconds: a bound on the scenario's time).
    follow_deadline_s: float = 60

    @property
    def scale(self) -> float:
        return 1 / self.time_divisor

    @property
    def gateway_timeout_s(self) -> float:
        return self.gateway_timeout_real_s * self.scale

    @property
    def arrival_s(self) -> float:
        return self.arrival_real_s * self.scale


@dataclass(frozen=True)
class Submission:
    clients: int = 200
    # Closed loop: every client submits again as soon as it has its answer (throughput).
    closed_duration_s: float = 15
    # Open loop: every client submits once every `open_interval_s`, at its own phase (200
    # submissions/s offered), whatever the answers; latency from each scheduled send time.
    open_interval_s: float = 1.0
    open_duration_s: float = 20
    # An open-loop request not answered within this counts as an error (a timeout); it bounds
    # how long the open loop outlives its duration when the server falls behind.
    open_timeout_s: float = 5
    single_client_requests: int = 100


@dataclass(frozen=True)
class Overhead:
    chain_steps: int = 50
    switchyard_chains: int = 5
    raw_chains: int = 20
    dbos_chains: int = 20
    idle_dispatch_samples: int = 60
    idle_gap_s: float = 0.05
    # Each Switchyard measurement stops taking samples after this long (at least 2 chains,
    # 10 dispatches), so a slow machine shortens the sample instead of the bench running long.
    budget_s: float = 30


@dataclass(frozen=True)
class Throughput:
    zero_latency_steps: int = 2000
    llm_latency_ms: float = 50
    llm_steps: int = 1500
    fan_width: int = 20
    raw_tasks: int = 10000
    # DBOS: this many no-op steps as one-step workflows, and again as workflows of
    # `fan_width` steps (a DBOS workflow runs its steps one after another).
    dbos_steps: int = 3000
    # The longest a saturation measurement waits; the rate is over what finished by then.
    budget_s: float = 30


@dataclass(frozen=True)
class Noisy:
    flood_steps: int = 5000
    flood_fan_width: int = 1
    flood_latency_ms: float = 50
    # Tenant A: interactive runs of `a_chain` llm steps, one submitted every `a_interval_s`
    # for `a_window_s` after the flood starts. A asks for 10 steps/s: well under half of what
    # the engine completes on two cores, so that under the flood A's fair share covers its
    # demand and what is measured is isolation, not capacity.
    a_chain: int = 3
    a_latency_ms: float = 20
    a_interval_s: float = 0.3
    a_window_s: float = 10
    # How long a phase waits for A's runs; a step of A not started by then counts with the
    # wait it had so far (so a percentile past that is a lower bound). Under FIFO, A's steps
    # wait for the whole flood: 45 s shows that (≥ 5x fair) and keeps the run ≤ 10 min.
    drain_deadline_s: float = 45


@dataclass(frozen=True)
class Streams:
    clients: int = 1000
    steps_per_run: int = 2
    step_latency_ms: float = 100
    deadline_s: float = 60


@dataclass(frozen=True)
class Growth:
    backlogs: tuple[int, ...] = (1_000, 10_000, 100_000)
    tenants: int = 10
    steps_per_run: int = 10
    cycles: int = 15
    decides: int = 15
    submissions: int = 60


@dataclass(frozen=True)
class Targets:
    """What the engine is asked to do on this machine (the report says met or missed)."""

    # Submission (scenario 2).
    closed_loop_per_s: float = 500
    open_loop_p50_ms: float = 15
    open_loop_p99_ms: float = 60
    # Idle dispatch: ready → the handler starts (scenario 3).
    idle_dispatch_p50_ms: float = 5
    idle_dispatch_p99_ms: float = 25
    # A 50-step chain's ms per step, at most this many times raw Celery's (scenario 3).
    overhead_vs_raw: float = 3
    # Zero-latency throughput (scenario 4): steps/s, and the share of raw Celery's no-ops/s.
    throughput_steps_per_s: float = 500
    throughput_share_of_raw: float = 0.35
    # Streams (scenario 6) and growth (scenario 7).
    streams_p99_ms: float = 250
    growth_cycle_ratio: float = 2


TARGETS = Targets()


@dataclass(frozen=True)
class Params:
    quick: bool = False
    deployment: Deployment = field(default_factory=Deployment)
    motivating: Motivating = field(default_factory=Motivating)
    submission: Submission = field(default_factory=Submission)
    overhead: Overhead = field(default_factory=Overhead)
    throughput: Throughput = field(default_factory=Throughput)
    noisy: Noisy = field(default_factory=Noisy)
    streams: Streams = field(default_factory=Streams)
    growth: Growth = field(default_factory=Growth)

    def as_dict(self) -> dict:
        return asdict(self)


FULL = Params()

QUICK = Params(
    quick=True,
    motivating=Motivating(users=30, time_divisor=10, arrival_real_s=12, follow_deadline_s=15),
    submission=Submission(
        closed_duration_s=3, open_duration_s=8, open_timeout_s=2, single_client_requests=20
    ),
    overhead=Overhead(
        switchyard_chains=2, raw_chains=5, dbos_chains=5, idle_dispatch_samples=10, budget_s=4
    ),
    throughput=Throughput(
        zero_latency_steps=200, llm_steps=150, raw_tasks=1000, dbos_steps=400, budget_s=6
    ),
    noisy=Noisy(flood_steps=200, a_window_s=2, drain_deadline_s=4),
    streams=Streams(clients=100, deadline_s=12),
    growth=Growth(backlogs=(200, 2_000, 20_000), cycles=3, decides=3, submissions=10),
)
