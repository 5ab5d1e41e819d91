"""Scenario 4: completed steps per second at saturation, against raw Celery and DBOS.

A backlog is created while its tenant is paused (one run through `run_create`, the rest its
copies in SQL: `bench.seed`), then released at once, so the workers are never short of work.
The rate is counted over the middle 80 % of the completions (the pipeline filling and draining
left out), from the steps' own `finished_at` checkpoints.

- zero-latency simulated LLM steps, each in a run of its own: the engine's own cost bounds
  the rate;
- the same steps as runs of `fan_width` parallel steps: what sharing a run costs (every
  transition of a run's steps holds the run's row lock);
- 50 ms simulated LLM steps, each in a run of its own: the pool's concurrency bounds it
  (threads / 50 ms at best);
- raw Celery: no-op tasks pre-filled in the queue while the worker does not consume it, then
  drained by the same pool (two processes, same threads) with the same broker settings; timed
  by marker tasks before and after;
- DBOS Transact: no-op steps through a DBOS queue, as one-step workflows and as workflows of
  `fan_width` steps (one after another: a DBOS workflow is one thread), enqueued in one
  transaction (one through DBOS's client, the rest copies of its rows) and drained by two
  worker processes of 12 concurrent workflows each; the rate over the middle 80 % of the
  steps' own checkpoints (`operation_outputs.completed_at_epoch_ms`).

The baselines go first, on the workers scenario 3 used: DBOS, then raw Celery, each
stopped before the next measurement (DBOS's workers poll their queue 20 times a second even
when it is empty; raw Celery's wait on the broker and cost nothing idle).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from bench.charts import DBOS_COLOUR, RAW_COLOUR, SWITCHYARD_COLOUR, bars_chart
from bench.dbos_baseline import new_batch
from bench.seed import backlog
from bench.stats import rate_between
from bench.workload import fan_workflow, install


def run(bench) -> dict[str, Any]:
    p = bench.params.throughput
    d = bench.deployment
    bench.start_switchyard()
    tenant = bench.tenant("throughput")
    zero = install(tenant.tenant, fan_workflow(1, 0, name="zero"))
    fan = install(tenant.tenant, fan_workflow(p.fan_width, 0, name="fan-zero"))
    slow = install(tenant.tenant, fan_workflow(1, p.llm_latency_ms, name="llm"))
    cpu: dict[str, dict] = {}

    client = bench.dbos()
    with bench.cpu_meter() as meter:
        dbos_rate, dbos_n = _dbos(client, p.dbos_steps, 1, p)
    cpu["DBOS one-step workflows"] = meter.per(dbos_n)
    with bench.cpu_meter() as meter:
        dbos_fan_rate, dbos_fan_n = _dbos(client, p.dbos_steps, p.fan_width, p)
    cpu[f"DBOS {p.fan_width}-step workflows"] = meter.per(dbos_fan_n)
    bench.stop_dbos_workers()

    bench.raw_workers()
    with bench.cpu_meter() as meter:
        raw_rate = _raw(bench, p.raw_tasks)
    cpu["raw Celery no-op"] = meter.per(p.raw_tasks + 2)
    bench.stop_raw_workers()

    with bench.profiled("s4-zero", ("scheduler", "llm")), bench.cpu_meter() as meter:
        zero_rate, zero_n = _saturate(bench, tenant.tenant, zero, p.zero_latency_steps, 1, p)
    cpu["Switchyard zero-latency"] = meter.per(zero_n)
    bench.reset_runs()
    fan_steps = p.zero_latency_steps // 3
    with bench.cpu_meter() as meter:
        fan_rate, fan_n = _saturate(bench, tenant.tenant, fan, fan_steps, p.fan_width, p)
    cpu[f"Switchyard runs of {p.fan_width}"] = meter.per(fan_n)
    bench.reset_runs()
    with bench.cpu_meter() as meter:
        slow_rate, slow_n = _saturate(bench, tenant.tenant, slow, p.llm_steps, 1, p)
    cpu[f"Switchyard {p.llm_latency_ms:g} ms llm"] = meter.per(slow_n)
    bench.reset_runs()

    ceiling = d.llm_threads / (p.llm_latency_ms / 1000)
    return {
        "title": "Throughput at saturation",
        "params": {
            "backlog": "created while the tenant is paused (bulk copies of a run_create run), "
            "then released at once",
            "zero-latency": f"{p.zero_latency_steps} steps, one per run",
            "zero-latency fan-out": f"{fan_steps} steps, runs of {p.fan_width} parallel steps",
            f"{p.llm_latency_ms:g} ms llm": f"{p.llm_steps} steps, one per run (pool ceiling "
            f"{d.llm_threads} threads / {p.llm_latency_ms:g} ms = {ceiling:.0f} steps/s)",
            "pool": f"llm: {d.llm_processes} processes, threads x {d.llm_threads} in all; "
            "scheduler x1",
            "raw Celery": f"{p.raw_tasks} no-op tasks pre-filled, {d.llm_processes} processes, "
            "threads x "
            f"{d.raw_threads}, same broker settings",
            "DBOS": f"{p.dbos_steps} no-op steps as one-step workflows, then as "
            f"{p.dbos_steps // p.fan_width} workflows of {p.fan_width} steps, enqueued at once; "
            f"{d.dbos_processes} processes, worker_concurrency {d.dbos_worker_concurrency} "
            f"each, queue polled every {d.dbos_polling_interval_s * 1000:g} ms",
            "rate": "completions per second over the middle 80 % of completions (within "
            f"{p.budget_s:g} s; what is left then is dropped)",
        },
        "fan_width": p.fan_width,
        "zero_latency_steps_per_s": round(zero_rate, 1),
        "zero_latency_steps_done": zero_n,
        "fan_out_steps_per_s": round(fan_rate, 1),
        "fan_out_steps_done": fan_n,
        "llm_steps_per_s": round(slow_rate, 1),
        "llm_steps_done": slow_n,
        "llm_ceiling_steps_per_s": round(ceiling, 1),
        "raw_celery_tasks_per_s": round(raw_rate, 1),
        "share_of_raw": round(zero_rate / raw_rate, 3) if raw_rate else None,
        "dbos_steps_per_s": round(dbos_rate, 1),
        "dbos_steps_done": dbos_n,
        "dbos_fan_steps_per_s": round(dbos_fan_rate, 1),
        "dbos_fan_steps_done": dbos_fan_n,
        "dbos_ratio": round(zero_rate / dbos_rate, 2) if dbos_rate else None,
        "dbos_fan_ratio": round(fan_rate / dbos_fan_rate, 2) if dbos_fan_rate else None,
        "cpu": cpu,
        "chart": bars_chart(
            bench.outdir / "s4-throughput.png",
            "Completed steps per second at saturation",
            [
                "Switchyard\nzero-latency",
                f"Switchyard\nruns of {p.fan_width}",
                f"Switchyard\n{p.llm_latency_ms:g} ms llm",
                "raw Celery\nno-op",
                "DBOS\none-step",
                f"DBOS\n{p.fan_width}-step",
            ],
            [zero_rate, fan_rate, slow_rate, raw_rate, dbos_rate, dbos_fan_rate],
            "steps / s",
            [SWITCHYARD_COLOUR] * 3 + [RAW_COLOUR, DBOS_COLOUR, DBOS_COLOUR],
            log=True,
        ),
    }


def _dbos(client, steps: int, width: int, p) -> tuple[float, int]:
    """`steps` no-op steps as workflows of `width` steps, released at once; (rate, done)."""
    batch = new_batch(f"w{width}")
    count = max(1, steps // width)
    client.enqueue(batch, count, width)
    if not client.wait(batch, count, p.budget_s, poll_s=0.2):
        client.cancel_rest(batch)  # out of time: the rate is over what finished
    times = client.step_times(batch)
    return rate_between(times) or 0.0, len(times)


def _saturate(bench, tenant, version, steps: int, width: int, p) -> tuple[float, int]:
    from jobs.models import StepRun
    from tenants.services import tenant_pause, tenant_resume

    tenant_pause(tenant=tenant)
    runs = backlog(tenant, version, max(1, steps // width))
    tenant_resume(tenant=tenant)
    bench.wake_scheduler()
    total = len(runs) * width
    deadline = time.monotonic() + p.budget_s
    finished = StepRun.objects.filter(run_id__in=runs, finished_at__isnull=False)
    while finished.count() < total and time.monotonic() < deadline:
        time.sleep(0.2)
    times = [t.timestamp() for t in finished.values_list("finished_at", flat=True)]
    if len(times) < total:  # out of time: the rate is over what finished; stop the rest
        tenant_pause(tenant=tenant)
        time.sleep(1.0)  # the steps in flight report before the tables are emptied
    return rate_between(times) or 0.0, len(times)


def _raw(bench, tasks: int) -> float:
    """Pre-fill the queue while the worker does not consume it, then let it drain."""
    from bench.celery_baseline import QUEUE_NAME, app, done_key, mark, noop, redis_client

    destination = [worker.node for worker in bench.raw_workers()]
    app.control.cancel_consumer(QUEUE_NAME, destination=destination, reply=True, timeout=10)
    name = uuid.uuid4().hex
    with app.producer_or_acquire() as producer:
        mark.apply_async((f"{name}-start",), producer=producer)
        for _ in range(tasks):
            noop.apply_async(producer=producer)
        mark.apply_async((f"{name}-end",), producer=producer)
    app.control.add_consumer(QUEUE_NAME, destination=destination, reply=True, timeout=10)
    r = redis_client()
    start = r.blpop([done_key(f"{name}-start")], timeout=60)
    end = r.blpop([done_key(f"{name}-end")], timeout=bench.params.throughput.budget_s)
    if start is None or end is None:
        return 0.0
    return tasks / (float(end[1]) - float(start[1]))
