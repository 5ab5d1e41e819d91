"""Scenario 7: scheduler cycle time and submission latency as the ready backlog grows.

The backlog (ready steps of runs not yet started, spread over several tenants and the three
lanes) is seeded with bulk SQL: a template run per tenant is created through `run_create`, then
copied with `INSERT … SELECT` (`bench.seed`). At each size, with no scheduler or worker running:

- one admission decision (`jobs.admission.decide`), timed in this process;
- one whole scheduler cycle (`jobs.scheduler.run_cycle`: recovery sweeps, decide, admit and
  publish a broker's worth of steps), timed in this process; the admitted steps are put back to
  `ready` (and their messages purged) after each cycle, so every cycle has the same work;
- submission latency through the API (one client, one request after another).

The platform backlog limit (`SWITCHYARD_PLATFORM_MAX_BACKLOG`, default 100,000) is raised for
the web process so that the largest backlog is still accepted.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from bench import loadgen
from bench.charts import growth_chart
from bench.seed import clone_runs, template_run
from bench.stats import slope_loglog, summary
from bench.workload import agent_workflow, fan_workflow, install

LANES = ("interactive", "standard", "batch")
# The web's settings here: the largest backlog is past the default platform limit.
WEB_ENV = {"SWITCHYARD_PLATFORM_MAX_BACKLOG": "100000000"}


def run(bench) -> dict[str, Any]:
    from django.db import connection

    p = bench.params.growth
    bench.stop_switchyard()
    url = bench.start_web(**WEB_ENV)
    submitter = bench.tenant("growth-submitter")
    install(submitter.tenant, agent_workflow(bench.params.motivating.scale))
    templates = []
    for index in range(p.tenants):
        handle = bench.tenant(f"backlog-{index}", lane=LANES[index % len(LANES)])
        version = install(handle.tenant, fan_workflow(p.steps_per_run, 0, name="backlog"))
        templates.append(template_run(handle.tenant, version))

    rows = []
    seeded = len(templates) * p.steps_per_run
    for size in p.backlogs:
        started = time.monotonic()
        seeded += _seed(templates, size - seeded, p.steps_per_run)
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE jobs_steprun")
            cursor.execute("ANALYZE jobs_run")
        seed_s = time.monotonic() - started
        decide_ms = _time_decide(p.decides)
        with bench.profiled(f"s7-cycle-{size}", ()):
            cycle_ms, admitted = _time_cycles(bench, p.cycles)
        submit = asyncio.run(_submissions(url, submitter.key, p.submissions))
        rows.append(
            {
                "backlog": _ready_count(),
                "seed_s": round(seed_s, 1),
                "decide_ms": round(statistics.median(decide_ms), 2),
                "cycle_ms": round(statistics.median(cycle_ms), 2),
                "admitted_per_cycle": admitted,
                "submission_ms": summary(submit),
            }
        )
    bench.reset_runs()

    backlogs = [row["backlog"] for row in rows]
    cycle = [row["cycle_ms"] for row in rows]
    decide = [row["decide_ms"] for row in rows]
    submit_p50 = [row["submission_ms"]["p50"] or 0.0 for row in rows]
    first, last = rows[0], rows[-1]
    return {
        "title": "Growth: cycle time and submission latency against the ready backlog",
        "params": {
            "backlogs": ", ".join(f"{size:,}" for size in p.backlogs) + " ready steps",
            "shape": f"{p.tenants} tenants over the 3 lanes, runs of {p.steps_per_run} "
            "parallel steps, not started; seeded by INSERT … SELECT generate_series",
            "cycle": f"median of {p.cycles} run_cycle() calls, each admitting a broker's worth "
            "(then reset)",
            "decide": f"median of {p.decides} admission.decide() calls",
            "submission": f"{p.submissions} API submissions, one client",
        },
        "rows": rows,
        "cycle_growth": round(last["cycle_ms"] / first["cycle_ms"], 2)
        if first["cycle_ms"]
        else None,
        "decide_growth": round(last["decide_ms"] / first["decide_ms"], 2)
        if first["decide_ms"]
        else None,
        "backlog_growth": round(last["backlog"] / first["backlog"], 1)
        if first["backlog"]
        else None,
        "cycle_slope": _round(slope_loglog(backlogs, cycle)),
        "decide_slope": _round(slope_loglog(backlogs, decide)),
        "submission_slope": _round(slope_loglog(backlogs, submit_p50)),
        "chart": growth_chart(
            bench.outdir / "s7-growth.png",
            backlogs,
            {
                "scheduler cycle": cycle,
                "admission decision": decide,
                "submission P50": submit_p50,
            },
        ),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _seed(templates: list[int], steps: int, per_run: int) -> int:
    """Copy the template runs (with their ready steps) until `steps` more steps exist."""
    per_template = max(1, steps // per_run // len(templates))
    if steps <= 0:
        return 0
    for template in templates:
        clone_runs(template, per_template)
    return per_template * per_run * len(templates)


def _ready_count() -> int:
    from jobs.models import StepRun

    return StepRun.objects.filter(status="ready").count()


def _time_decide(count: int) -> list[float]:
    from django.utils import timezone

    from jobs import admission

    admission.decide(timezone.now())  # warm
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        admission.decide(timezone.now())
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def _time_cycles(bench, count: int) -> tuple[list[float], int]:
    from django.db import connection

    from jobs.scheduler import run_cycle

    samples = []
    admitted = 0
    for index in range(count + 1):
        started = time.perf_counter()
        stats = run_cycle()
        elapsed = (time.perf_counter() - started) * 1000
        if index:  # the first cycle warms the broker connection
            samples.append(elapsed)
            admitted = stats.admitted
        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE jobs_steprun SET status = 'ready', dispatch_token = NULL, "
                "dispatched_at = NULL WHERE status = 'queued'"
            )
        bench.cluster.purge_steps()
    return samples, admitted


async def _submissions(url: str, key: str, count: int) -> list[float]:
    async with loadgen.client(url, key=key, connections=1) as http:
        await loadgen.submit(http, "agent", {"ticket": "warm-up"})
        results = [await loadgen.submit(http, "agent", {"ticket": f"t{i}"}) for i in range(count)]
    return [r.latency_ms for r in results if r.run_id]
