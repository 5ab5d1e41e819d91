"""Scenario 5: noisy neighbour. Tenant B floods batch steps; tenant A runs interactive workflows.

Three phases with the same tenant A workload (a run of a short chain of interactive LLM steps
submitted every `a_interval_s` for `a_window_s`): A alone; A while B's flood of batch steps is
in the backlog with the fair scheduler (`SWITCHYARD_ADMISSION_POLICY=fair`, the default); the
same with `fifo`. A's queue wait is each step's ready → running (`StepRun.ready_at` → its
attempt's `started_at`). Both tenants have weight 1 and quotas that do not bind, so only the
admission policy differs.
"""

from __future__ import annotations

import time
from typing import Any

from bench.charts import noisy_chart
from bench.seed import backlog
from bench.stats import summary
from bench.workload import chain_workflow, fan_workflow, install


def run(bench) -> dict[str, Any]:
    from jobs.admission import max_queued

    p = bench.params.noisy
    d = bench.deployment
    bench.start_switchyard()
    a = bench.tenant("tenant-a", lane="interactive")
    b = bench.tenant("tenant-b", lane="batch")
    interactive = install(a.tenant, chain_workflow(p.a_chain, p.a_latency_ms, name="interactive"))
    flood = install(b.tenant, fan_workflow(p.flood_fan_width, p.flood_latency_ms, name="flood"))

    waits: dict[str, list[float]] = {}
    drains: dict[str, float | None] = {}
    splits: dict[str, dict[str, list[float]]] = {}
    cpu: dict[str, dict] = {}
    with bench.cpu_meter() as meter:
        waits["A alone"], _, done, splits["A alone"] = _phase(bench, a.tenant, interactive, None, p)
    cpu["A alone"] = meter.per(done)
    with bench.profiled("s5-fair", ("scheduler",)), bench.cpu_meter() as meter:
        waits["flood, fair"], drains["fair"], done, splits["flood, fair"] = _phase(
            bench, a.tenant, interactive, (b.tenant, flood), p
        )
    cpu["flood, fair"] = meter.per(done)
    bench.stop_scheduler()
    bench.start_scheduler(SWITCHYARD_ADMISSION_POLICY="fifo")
    try:
        with bench.cpu_meter() as meter:
            waits["flood, fifo"], drains["fifo"], done, splits["flood, fifo"] = _phase(
                bench, a.tenant, interactive, (b.tenant, flood), p
            )
        cpu["flood, fifo"] = meter.per(done)
    finally:
        bench.stop_scheduler()
        # The fair scheduler again, for what comes next (which waits until it listens).
        bench.start_scheduler(wait=False)

    stats = {name: summary(values) for name, values in waits.items()}
    alone95 = stats["A alone"]["p95"] or 0.0
    fair95 = stats["flood, fair"]["p95"] or 0.0
    fifo95 = stats["flood, fifo"]["p95"] or 0.0
    return {
        "title": "Noisy neighbour: tenant A's queue wait while tenant B floods",
        "params": {
            "tenant B": f"{p.flood_steps} batch steps ({p.flood_latency_ms:g} ms simulated "
            f"llm, runs of {p.flood_fan_width} step(s)), all ready at once",
            "tenant A": f"an interactive run of {p.a_chain} chained {p.a_latency_ms:g} ms llm "
            f"steps every {p.a_interval_s * 1000:.0f} ms for {p.a_window_s:g} s",
            "pool": f"llm: {d.llm_processes} processes, threads x {d.llm_threads} in all; "
            "broker depth bound "
            f"{max_queued('steps.llm')} admitted steps",
            "phases": "A alone; A under the flood with admission policy fair; with fifo",
            "weights": "A 1, B 1; quotas do not bind",
        },
        "wait_ms": stats,
        # Where A's wait goes: admission (ready → queued) and delivery (queued → its handler
        # starts); the share of A's steps admitted by the transaction that made them ready.
        "wait_split_ms": {
            name: {
                "admission": summary(parts["admission"]),
                "delivery": summary(parts["delivery"]),
                "admitted_directly": parts["direct"],
            }
            for name, parts in splits.items()
        },
        "fair_over_alone_p95": round(fair95 / alone95, 2) if alone95 else None,
        "fifo_over_alone_p95": round(fifo95 / alone95, 1) if alone95 else None,
        "fair_limit_p95_ms": round(1.5 * alone95 + 20, 1),
        "flood_rate_steps_per_s": drains,
        "cpu": cpu,
        "chart": noisy_chart(bench.outdir / "s5-noisy.png", waits),
    }


def _phase(bench, tenant_a, interactive, flood, p):
    """A's waits, the flood's rate, the steps (A's and the flood's) that finished, and A's waits
    split in two: ready → queued (admission) and queued → started (the broker and a worker)."""
    from django.utils import timezone

    from jobs.models import Run, StepAttempt, StepRun
    from jobs.transitions.runs import run_create
    from tenants.services import tenant_pause, tenant_resume

    flood_runs: list[int] = []
    split: dict[str, Any] = {"admission": [], "delivery": []}
    tenant_b = None
    if flood is not None:
        tenant_b, version = flood
        tenant_pause(tenant=tenant_b)
        flood_runs = backlog(tenant_b, version, max(1, p.flood_steps // p.flood_fan_width))
        tenant_resume(tenant=tenant_b)
        bench.wake_scheduler()
        time.sleep(0.5)  # the flood fills the pool and the broker's admitted slots

    flood_started = time.time()
    a_runs = []
    next_at = time.monotonic()
    stop_at = next_at + p.a_window_s
    while next_at < stop_at:
        a_runs.append(run_create(tenant=tenant_a, version=interactive, input={}).pk)
        next_at += p.a_interval_s
        time.sleep(max(0.0, next_at - time.monotonic()))

    deadline = time.monotonic() + p.drain_deadline_s
    open_runs = Run.objects.filter(pk__in=a_runs).exclude(
        status__in=["succeeded", "failed", "cancelled"]
    )
    while open_runs.exists() and time.monotonic() < deadline:
        time.sleep(0.2)

    flood_rate = None
    if flood_runs:
        done = StepRun.objects.filter(run_id__in=flood_runs, status="succeeded")
        elapsed = time.time() - flood_started
        flood_rate = round(done.count() / elapsed, 1) if elapsed > 0 else None

    attempts = StepAttempt.objects.filter(step_run__run_id__in=a_runs, number=1).select_related(
        "step_run"
    )
    waits = []
    for attempt in attempts:
        step = attempt.step_run
        waits.append((attempt.started_at - step.ready_at).total_seconds() * 1000)
        if step.dispatched_at is not None and step.attempt == 1:
            admission = (step.dispatched_at - step.ready_at).total_seconds() * 1000
            split["admission"].append(admission)
            split["delivery"].append(
                (attempt.started_at - step.dispatched_at).total_seconds() * 1000
            )
    split["direct"] = _admitted_directly(a_runs)
    # Steps of A still waiting at the deadline count with the wait they have had so far.
    now = timezone.now()
    waits += [
        (now - ready_at).total_seconds() * 1000
        for ready_at in StepRun.objects.filter(
            run_id__in=a_runs, status__in=["ready", "queued"], ready_at__isnull=False
        ).values_list("ready_at", flat=True)
    ]
    if flood_runs:
        # The flood's leftovers (fifo: what A's wait ran out on) stop being admitted; the
        # steps in flight report, then the tables are emptied.
        tenant_pause(tenant=tenant_b)
        time.sleep(1.0)
    done = StepRun.objects.filter(run_id__in=[*a_runs, *flood_runs], status="succeeded").count()
    bench.reset_runs()
    return waits, flood_rate, done, split


def _admitted_directly(run_ids: list[int]) -> float | None:
    """The share of the runs' steps queued by the transaction that made them ready (their
    `step.ready` and `step.queued` events written by one transaction: the same `xmin`)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT count(*) FILTER (WHERE r.xmin::text = q.xmin::text), count(*)
              FROM jobs_event r
              JOIN jobs_event q ON q.run_id = r.run_id AND q.step_id = r.step_id
                               AND q.map_index IS NOT DISTINCT FROM r.map_index
                               AND q.type = 'step.queued'
             WHERE r.run_id = ANY(%s) AND r.type = 'step.ready'
            """,
            [run_ids],
        )
        direct, total = cursor.fetchone()
    return round(direct / total, 2) if total else None
