"""Scenario 3: per-step overhead against raw Celery and DBOS chains, and idle dispatch latency.

- Switchyard: runs of a chain of 50 zero-latency simulated LLM steps, one run at a time; the
  run's wall time (created → finished) over 50 is the cost of one step through the engine:
  scheduler admission, publish, claim, handler, checkpoint, graph advance, events.
- Raw Celery: a chain of 50 no-op tasks on the same RabbitMQ, each publishing the next
  (`bench.celery_baseline`: acks late, prefetch 1, priority queue, confirmed publishes): the
  floor, with no checkpoint at all.
- DBOS Transact: a workflow of 50 no-op steps (`bench.dbos_baseline`), enqueued on a DBOS
  queue, one at a time; its wall time is DBOS's own record, enqueued → outcome
  (`workflow_status.created_at` → `completed_at`), over 50: a durable step, checkpointed in
  the same PostgreSQL, when the state machine is a library in the worker.
- All three on the same pool shape: two processes, 24 threads (or concurrent workflows) in
  all.
- Idle dispatch: single-step runs submitted one at a time on an idle system; from the step's
  `ready_at` (the transaction that made it ready) to its attempt's `started_at` (the worker's
  claim, just before the handler runs).

Raw Celery and DBOS go last, so that their workers (booted in scenario 1, or here) serve
scenario 4 first; DBOS's are launched here, when DBOS is measured.
"""

from __future__ import annotations

import statistics
import time
import uuid
from typing import Any

from bench.charts import overhead_chart
from bench.dbos_baseline import new_batch
from bench.stats import summary
from bench.workload import chain_workflow, install


def run(bench) -> dict[str, Any]:
    p = bench.params.overhead
    d = bench.deployment
    bench.start_switchyard()
    chains = bench.tenant("chains", lane="interactive")
    chain = install(chains.tenant, chain_workflow(p.chain_steps, name="chain"))
    single = install(chains.tenant, chain_workflow(1, name="single"))

    dispatch_ms = _idle_dispatch(bench, chains.tenant, single, p)
    with bench.profiled("s3-chain", ("scheduler", "llm")), bench.cpu_meter() as cpu_switchyard:
        walls = _switchyard_chains(bench, chains.tenant, chain, p)
    bench.reset_runs()
    switchyard_ms = statistics.median(walls) / p.chain_steps * 1000

    bench.raw_workers()
    with bench.cpu_meter() as cpu_raw:
        raw_walls = _raw_chains(p)
    raw_ms = statistics.median(raw_walls) / p.chain_steps * 1000

    client = bench.dbos()
    with bench.cpu_meter() as cpu_dbos:
        dbos_walls = _dbos_chains(client, p)
    dbos_ms = statistics.median(dbos_walls) / p.chain_steps * 1000 if dbos_walls else None

    steps = p.chain_steps
    return {
        "title": "Per-step overhead against raw Celery and DBOS chains; idle dispatch",
        "params": {
            "chain": f"{p.chain_steps} zero-latency steps, each after the previous",
            "Switchyard": f"up to {p.switchyard_chains} runs one after another (after one "
            f"warm-up; {len(walls)} within the {p.budget_s:g} s budget), "
            f"llm pool: {d.llm_processes} processes, threads x {d.llm_threads} in all; "
            "scheduler x1",
            "raw Celery": f"{p.raw_chains} chains of no-op tasks (after one warm-up), each "
            f"publishing the next; {d.llm_processes} processes, threads x {d.raw_threads} in "
            "all; acks late, "
            "prefetch 1, x-max-priority 10, confirmed persistent publishes",
            "DBOS": f"{p.dbos_chains} workflows of {p.chain_steps} no-op steps (after one "
            f"warm-up), one at a time, enqueued on a DBOS queue; {_dbos_shape(d)}; wall = "
            "workflow_status.created_at → completed_at",
            "idle dispatch": f"up to {p.idle_dispatch_samples} single-step runs "
            f"({len(dispatch_ms)} within the budget), one at a time, "
            f"{p.idle_gap_s * 1000:.0f} ms apart: StepRun.ready_at → StepAttempt.started_at",
        },
        "switchyard_ms_per_step": round(switchyard_ms, 2),
        "switchyard_chain_walls_s": [round(w, 3) for w in walls],
        "raw_ms_per_step": round(raw_ms, 3),
        "raw_chain_walls_s": [round(w, 4) for w in raw_walls],
        "ratio": round(switchyard_ms / raw_ms, 1) if raw_ms else None,
        "dbos_ms_per_step": round(dbos_ms, 3) if dbos_ms is not None else None,
        "dbos_chain_walls_s": [round(w, 4) for w in dbos_walls],
        "dbos_ratio": round(switchyard_ms / dbos_ms, 2) if dbos_ms else None,
        "idle_dispatch_ms": summary(dispatch_ms),
        "cpu": {
            "Switchyard chain": cpu_switchyard.per((len(walls) + 1) * steps),
            "raw Celery chain": cpu_raw.per(len(raw_walls) * steps + steps),
            "DBOS chain": cpu_dbos.per(len(dbos_walls) * steps + steps),
        },
        "chart": overhead_chart(
            bench.outdir / "s3-overhead.png",
            {"Switchyard": switchyard_ms, "raw Celery": raw_ms, "DBOS": dbos_ms},
            dispatch_ms,
        ),
    }


def _dbos_shape(d) -> str:
    return (
        f"{d.dbos_processes} processes, worker_concurrency {d.dbos_worker_concurrency} each, "
        f"{d.dbos_executor_threads} executor threads, system database pool "
        f"{d.dbos_pool_size}, queue polled every {d.dbos_polling_interval_s * 1000:g} ms"
    )


def _wait_final(run, timeout_s: float = 120, poll_s: float = 0.01):
    from jobs.models import Run
    from jobs.statuses import RUN_FINAL

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = Run.objects.filter(pk=run.pk).values_list("status", flat=True).first()
        if status in RUN_FINAL:
            run.refresh_from_db()
            return run
        time.sleep(poll_s)
    raise TimeoutError(f"run {run.public_id} did not finish in {timeout_s:g} s")


def _idle_dispatch(bench, tenant, version, p) -> list[float]:
    from jobs.models import StepAttempt
    from jobs.transitions.runs import run_create

    runs = []
    stop_at = time.monotonic() + p.budget_s
    for index in range(p.idle_dispatch_samples + 3):
        run = _wait_final(run_create(tenant=tenant, version=version, input={}))
        if index >= 3:  # the first runs warm connections and caches
            runs.append(run)
        if len(runs) >= 10 and time.monotonic() > stop_at:
            break
        time.sleep(p.idle_gap_s)
    samples = []
    for attempt in StepAttempt.objects.filter(step_run__run__in=runs, number=1).select_related(
        "step_run"
    ):
        samples.append((attempt.started_at - attempt.step_run.ready_at).total_seconds() * 1000)
    return samples


def _switchyard_chains(bench, tenant, version, p) -> list[float]:
    from jobs.transitions.runs import run_create

    walls = []
    stop_at = time.monotonic() + p.budget_s
    for index in range(p.switchyard_chains + 1):
        run = _wait_final(run_create(tenant=tenant, version=version, input={}), poll_s=0.05)
        if run.status != "succeeded":
            raise RuntimeError(f"chain run {run.public_id} {run.status}: {run.error}")
        if index:
            walls.append((run.finished_at - run.created_at).total_seconds())
        if len(walls) >= 2 and time.monotonic() > stop_at:
            break
    return walls


def _raw_chains(p) -> list[float]:
    from bench.celery_baseline import chain_link, done_key, redis_client

    walls = []
    r = redis_client()
    for index in range(p.raw_chains + 1):
        chain_id = uuid.uuid4().hex
        started = time.time()
        chain_link.apply_async((chain_id, 0, p.chain_steps))
        popped = r.blpop([done_key(chain_id)], timeout=60)
        if popped is None:
            raise TimeoutError("a raw Celery chain did not finish in 60 s")
        if index:
            walls.append(float(popped[1]) - started)
    return walls


def _dbos_chains(client, p) -> list[float]:
    walls = []
    for index in range(p.dbos_chains + 1):
        batch = new_batch("chain")
        client.enqueue(batch, 1, p.chain_steps)
        # Polled as often as Switchyard's runs are (`_wait_final`); the wall is DBOS's record.
        if not client.wait(batch, 1, 60, poll_s=0.05):
            raise TimeoutError("a DBOS chain did not finish in 60 s")
        if client.failed(batch):
            raise RuntimeError(f"the DBOS chain {batch} failed")
        if index:
            walls += client.walls_s(batch)
    return walls
