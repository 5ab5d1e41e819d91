"""Scenario 2: submissions from 200 clients, open loop (latency) and closed loop (throughput).

The web alone (the deployment's `web_processes` daphne processes behind one socket; no
scheduler, no workers: the API never waits on them, and on two cores they would only compete
for the CPU), so the figures are the API's own. The submitted workflow is the motivating
scenario's (6 steps).

- One client submitting alone first: the service time.
- Open loop: each of the 200 clients submits once a second at its own phase (200 submissions/s
  offered, evenly spread), for a bounded time. Latency is counted from each request's
  scheduled send time, so a request that left late, behind its client's previous answer or a
  load generator that fell behind, shows that wait (no coordinated omission); the percentiles
  are over every request, a timeout and a request never sent with the time they waited.
  Reported: P50, P99, max, errors, the rate achieved.
- Closed loop: each client submits again as soon as it has its answer, for a bounded time.
  Latency is then clients / throughput (Little's law) whatever the code does, so what is
  reported is the throughput: accepted submissions per second.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from bench import loadgen
from bench.charts import submission_chart
from bench.scenarios.growth import WEB_ENV
from bench.stats import percentile, summary
from bench.workload import agent_workflow, install


def run(bench) -> dict[str, Any]:
    p = bench.params.submission
    d = bench.deployment
    bench.stop_switchyard()
    # Scenario 7's settings (a platform backlog limit it needs raised; the backlog here stays
    # far below the default), so that it goes on with this web.
    url = bench.start_web(fresh=True, processes=d.web_processes, **WEB_ENV)
    submitters = bench.tenant("submitters")
    install(submitters.tenant, agent_workflow(bench.params.motivating.scale))

    single = asyncio.run(_single(url, submitters.key, p.single_client_requests))
    bench.reset_runs()
    # CPU is counted per run the server created, answered in time or not.
    with bench.profiled("s2-open", ("web",)), bench.cpu_meter() as cpu_open:
        opened, open_wall = asyncio.run(_open(url, submitters.key, p))
    open_created = _created(submitters)
    bench.reset_runs()
    with bench.profiled("s2-closed", ("web",)), bench.cpu_meter() as cpu_closed:
        closed, closed_wall = asyncio.run(_closed(url, submitters.key, p))
    closed_created = _created(submitters)
    bench.reset_runs()

    single_ms = [r.latency_ms for r in single if r.run_id]
    open_ok = [r.latency_ms for r in opened if r.run_id]
    # Every request, answered or not: a timeout counts with what it waited.
    open_all = [r.latency_ms for r in opened]
    closed_ok = [r.latency_ms for r in closed if r.run_id]
    offered = p.clients / p.open_interval_s
    return {
        "title": "Submission: open loop (latency) and closed loop (throughput)",
        "params": {
            "clients": p.clients,
            "open loop": f"each client submits every {p.open_interval_s:g} s at its own phase "
            f"({offered:g}/s offered) for {p.open_duration_s:g} s; latency from the scheduled "
            f"send time; no answer within {p.open_timeout_s:g} s, or not sent within the "
            f"{p.open_duration_s:g} s, is an error",
            "closed loop": f"each client submits back to back for {p.closed_duration_s:g} s "
            "(what completed within it)",
            "workflow": "the agent workflow (6 steps)",
            "processes": f"daphne x{d.web_processes} behind one socket (scheduler and workers "
            "stopped)",
            "baseline": f"1 client, {p.single_client_requests} requests one after another",
        },
        "open_loop": {
            "requests": len(opened),
            "latency_ms": summary(open_all),
            "errors": len(opened) - len(open_ok),
            "error_kinds": _errors(opened),
            "runs_created": open_created,
            "offered_per_s": round(offered, 1),
            "achieved_per_s": round(len(open_ok) / open_wall, 1),
            # The load generator's own lag: how late requests left their client (a large
            # figure means this process, not the server, fell behind the schedule).
            "sent_late_ms_p99": _round(
                percentile([r.late_ms for r in opened if r.late_ms is not None], 99)
            ),
        },
        "closed_loop": {
            "requests": len(closed),
            "accepted_per_s": round(len(closed_ok) / closed_wall, 1),
            "latency_ms": summary(closed_ok),
            "errors": len(closed) - len(closed_ok),
            "error_kinds": _errors(closed),
            "runs_created": closed_created,
            # Little's law: with clients submitting back to back, latency = clients / rate.
            "littles_law_mean_ms": round(p.clients / max(1e-9, len(closed) / closed_wall) * 1000),
        },
        "single_client_ms": summary(single_ms),
        "cpu": {
            "open loop": cpu_open.per(open_created, "submission"),
            "closed loop": cpu_closed.per(closed_created, "submission"),
        },
        "chart": submission_chart(
            bench.outdir / "s2-submission.png", open_all, closed_ok, single_ms, clients=p.clients
        ),
    }


def _created(submitters) -> int:
    from jobs.models import Run

    return Run.objects.filter(tenant_id=submitters.pk).count()


def _errors(results: list[loadgen.Submitted]) -> dict[str, int]:
    return dict(Counter(r.error for r in results if not r.run_id))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


async def _single(url: str, key: str, count: int) -> list[loadgen.Submitted]:
    async with loadgen.client(url, key=key, connections=1) as http:
        await loadgen.submit(http, "agent", {"ticket": "warm-up"})
        return [await loadgen.submit(http, "agent", {"ticket": f"t{i}"}) for i in range(count)]


async def _open(url: str, key: str, p):
    async with loadgen.client(url, key=key, connections=p.clients) as http:
        counter = iter(range(10**9))

        async def action(scheduled: float) -> loadgen.Submitted:
            return await loadgen.submit(
                http,
                "agent",
                {"ticket": f"t{next(counter)}"},
                timeout_s=p.open_timeout_s,
                scheduled=scheduled,
            )

        started = time.monotonic()
        results, missed = await loadgen.open_loop(
            p.clients, p.open_interval_s, p.open_duration_s, action
        )
        ended = time.perf_counter()
        # A request its client could not send in time counts as a failure that waited at
        # least until the end.
        results += [
            loadgen.Submitted(None, (ended - due) * 1000, error="not sent", late_ms=None)
            for due in missed
        ]
        return results, time.monotonic() - started


async def _closed(url: str, key: str, p):
    async with loadgen.client(url, key=key, connections=p.clients) as http:
        counter = iter(range(10**9))

        async def action() -> loadgen.Submitted:
            return await loadgen.submit(http, "agent", {"ticket": f"t{next(counter)}"})

        started = time.monotonic()
        results = await loadgen.closed_loop(p.clients, p.closed_duration_s, action)
        return results, time.monotonic() - started
